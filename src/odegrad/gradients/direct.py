"""gradient="direct": autograd through every operation of the solver (the baseline).

Memory O(N·s·graph); exact for the discretisation. The step-size controller's decisions are
made on detached values, so they are constants of the differentiated scheme.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem

OPTIONS = ("count_graph_bytes",)


def solve(problem: Problem, count_graph_bytes: bool = False) -> Tensor:
    """Run the loop with autograd recording; optionally count the bytes the graph saves."""
    if not count_graph_bytes:
        outputs, _ = problem.integrate()
        problem.stats["checkpoint_bytes"] = None
        return torch.stack(outputs)
    seen: set = set()
    total = 0

    def pack(x: Tensor) -> Tensor:
        nonlocal total
        key = (x.untyped_storage().data_ptr(), x.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        outputs, _ = problem.integrate()
    problem.stats["checkpoint_bytes"] = total
    return torch.stack(outputs)
