"""Double backward through the custom gradient methods (ALGORITHMS.md §10, option (a)).

The backward pass of a custom method is a function B(y0, θ, ȳ) → (ȳ0, θ̄) computed from
detached checkpoints, so differentiating its own operations would hold the stored states
constant and drop every ∂y_n/∂θ term (the silent error of §10). When autograd asks for a graph
of the backward pass (`create_graph=True`: `torch.autograd.grad(..., create_graph=True)`,
`torch.autograd.functional.hessian`/`hvp`, gradient penalties, meta-learning), the forward solve
is re-run under autograd with the same scheme and the same step decisions and differentiated
with `create_graph=True`. That is exact at every order for the discretisation, so:

- discrete and reversible give exactly direct's first and second derivatives through the
  same scheme (their first-order gradients are those too, up to round-off);
- backsolve and interpolated then give direct's derivatives through the forward scheme, which
  differ from their own first-order gradient by O(tol) and converge with the tolerance.

The cost of such a call is that of `gradient="direct"`: its memory, O(N·s·graph), for that
backward call only. Evaluations of f count into stats["nfe_backward"].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..problem import Problem


def graph_requested() -> bool:
    """Whether the running backward pass must itself be differentiable (create_graph=True):
    autograd runs a Function's backward with grad mode on exactly then."""
    return torch.is_grad_enabled()


def differentiable_backward(
    problem: Problem,
    grad_ys: Tensor,
    inputs: Sequence[Tensor | None],
    needs: Sequence[bool],
    f: Callable | None = None,
) -> list[Tensor | None]:
    """∂L/∂inputs with a graph: the forward solve re-run under autograd (with `f` in place of
    problem.f when given, e.g. one that replays recorded random streams) and differentiated
    against `grad_ys` with create_graph=True. `inputs` are the Function's tensor inputs (None
    for non-tensor ones); an entry comes back None where `needs` is False."""
    wanted = [k for k, (x, need) in enumerate(zip(inputs, needs))
              if need and isinstance(x, Tensor) and x.requires_grad]
    rerun = problem if f is None else replace(problem, f=f)
    with torch.enable_grad():
        outputs, _ = rerun.integrate()
        ys = torch.stack(outputs)
        grads = torch.autograd.grad(
            ys, [inputs[k] for k in wanted], grad_ys, create_graph=True, allow_unused=True,
            materialize_grads=True,
        ) if wanted and ys.requires_grad else [None] * len(wanted)
    result: list[Tensor | None] = [None] * len(inputs)
    for k, g in zip(wanted, grads):
        result[k] = g
    return result

