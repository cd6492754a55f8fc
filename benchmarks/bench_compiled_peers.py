"""The peers of benchmarks/bench_compiled.py that need more than odegrad.peers offers: torchode
with the rk4 tableau and torch.compile (as its README compiles it), and diffrax under jax.jit
with the same fields written in JAX (P1's MLP, compare's MLP and conv block).

Each case is built from the benchmark's Problem (its field, y0, loss, method, steps or
tolerances) and returns (run, flat): run() is one forward + backward and returns the gradients
w.r.t. (y0, the parameters in f.parameters() order); flat(gradients) is them as one float64
CPU tensor, for the gradient errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Run = Callable[[], Any]


def torch_flat(grads) -> Tensor:
    return torch.cat([g.detach().reshape(-1).to("cpu", torch.float64) for g in grads])


# ---- torchode ---------------------------------------------------------------------------------


def _torchode_rk4():
    """torchode's ExplicitRungeKutta with the classical rk4 tableau (torchode ships none)."""
    from torchode.interpolation import ThirdOrderPolynomialInterpolation
    from torchode.single_step_methods.runge_kutta import ButcherTableau, ExplicitRungeKutta

    class RK4(ExplicitRungeKutta):
        TABLEAU = ButcherTableau.from_lists(
            c=[0.0, 0.5, 0.5, 1.0], a=[[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
            b=[1 / 6, 1 / 3, 1 / 3, 1 / 6], b_err=[0.0, 0.0, 0.0, 0.0])

        def __init__(self, term=None):
            super().__init__(term, RK4.TABLEAU)

        def convergence_order(self):
            return 4

        def build_interpolation(self, data):
            return ThirdOrderPolynomialInterpolation.from_k(
                data.t0, data.dt, data.y0, data.y1, data.k)

    return RK4


def torchode_case(problem, compiled: bool) -> tuple[Run, float | None]:
    """torchode's AutoDiffAdjoint (autograd through its loop), eager or compiled; returns (run,
    seconds of the first call when compiled). Its README's torch.compile(solver) compiles the
    module's forward, which solve() never calls (solve runs eagerly); so the bound method
    solve itself is compiled, what the README means to do."""
    import torchode

    f, y0 = problem.field, problem.y0
    batch, shape = y0.shape[0], y0.shape

    def flat_field(t: Tensor, y: Tensor) -> Tensor:  # t: one time per batch element
        return f(t, y.reshape(shape)).reshape(batch, -1)

    term = torchode.ODETerm(flat_field)
    dt0 = None
    if problem.steps is not None:
        if problem.method != "rk4":
            raise NotImplementedError(f"torchode case for fixed {problem.method}")
        step = _torchode_rk4()(term=term)
        controller = torchode.FixedStepController()
        dt0 = torch.full((batch,), problem.step_size, dtype=y0.dtype, device=y0.device)
    else:
        if problem.method != "dopri5":
            raise NotImplementedError(f"torchode case for adaptive {problem.method}")
        step = torchode.Dopri5(term=term)
        controller = torchode.IntegralController(atol=problem.atol, rtol=problem.rtol, term=term)
    solver = torchode.AutoDiffAdjoint(step, controller)
    solve = torch.compile(solver.solve) if compiled else solver.solve
    t_eval = problem.t.expand(batch, 2)

    def run():
        y = y0.detach().clone().requires_grad_()
        sol = solve(torchode.InitialValueProblem(y0=y.reshape(batch, -1), t_eval=t_eval),
                           dt0=dt0)
        loss = problem.loss(sol.ys[:, -1].reshape(shape))
        return torch.autograd.grad(loss, [y, *problem.params()])

    first = None
    if compiled:
        start = time.perf_counter()
        run()
        problem.sync()
        first = time.perf_counter() - start
    return run, first


# ---- diffrax ----------------------------------------------------------------------------------


def _jax_field(kind: str):
    """f(t, y, p) in JAX for the benchmark's field kinds, p the torch state_dict as arrays."""
    import jax
    import jax.numpy as jnp

    def linear(x, p, name):
        return x @ p[f"{name}.weight"].T + p[f"{name}.bias"]

    def conv(x, p, name):
        out = jax.lax.conv_general_dilated(x, p[f"{name}.weight"], (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NCHW", "OIHW", "NCHW"))
        return out + p[f"{name}.bias"][None, :, None, None]

    def p1(t, y, p):
        z = jnp.concatenate([y, jnp.broadcast_to(t, (y.shape[0], 1)).astype(y.dtype)], -1)
        return linear(jnp.tanh(linear(z, p, "l1")), p, "l2")

    def mlp(t, y, p):
        z = jnp.concatenate([y, jnp.broadcast_to(t, (y.shape[0], 1)).astype(y.dtype)], -1)
        return linear(jnp.tanh(linear(jnp.tanh(linear(z, p, "l1")), p, "l2")), p, "l3")

    def conv_block(t, y, p):
        tt = jnp.broadcast_to(t, (y.shape[0], 1, *y.shape[2:])).astype(y.dtype)
        h = jnp.tanh(conv(jnp.concatenate([y, tt], 1), p, "c1"))
        return conv(jnp.concatenate([h, tt], 1), p, "c2")

    return {"p1": p1, "mlp": mlp, "conv": conv_block}[kind]


def _diffrax_rk4():
    import diffrax
    import numpy as np

    class RK4(diffrax.AbstractERK):
        """The classical rk4 tableau (diffrax ships none), as its docs build custom ERKs."""

        tableau = diffrax.ButcherTableau(
            c=np.array([0.5, 0.5, 1.0]), b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
            b_error=np.zeros(4),
            a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
        )
        interpolation_cls = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

        def order(self, terms):
            return 4

    return RK4


# the diffrax configurations: (solver, adjoint) by name; "scheme" is the solver's own
DIFFRAX_CONFIGS = {
    "checkpoint": ("scheme", "RecursiveCheckpointAdjoint"),
    # the state reconstructed exactly, the adjoint the continuous one (no discrete one in 0.7)
    "reversible": ("ReversibleHeun", "BacksolveAdjoint"),
    "backsolve": ("scheme", "BacksolveAdjoint"),
}


def diffrax_case(problem, config: str, stats_out: dict | None = None
                 ) -> tuple[Run, Callable, float, str]:
    """value_and_grad w.r.t. (y0, the weights) under jax.jit, on the CPU; returns (run, flat,
    the seconds of the first call (compilation), a label). `stats_out` (if given) gets the
    solve's accepted and rejected steps (diffrax's sol.stats, from a jitted forward of its own,
    so the timed function is left as it was) as n_accepted and n_rejected."""
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    if problem.y0.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)
    solver_name, adjoint_name = DIFFRAX_CONFIGS[config]
    if solver_name == "ReversibleHeun":
        solver = diffrax.ReversibleHeun()
    elif problem.method == "rk4":
        solver = _diffrax_rk4()()
        solver_name = "RK4"
    elif problem.method == "dopri5":
        solver, solver_name = diffrax.Dopri5(), "Dopri5"
    else:
        raise NotImplementedError(f"diffrax case for {problem.method}")
    adjoint = getattr(diffrax, adjoint_name)()
    t0, t1 = (float(x) for x in problem.t)
    if problem.steps is not None:
        dt0, controller, max_steps = (t1 - t0) / problem.steps, diffrax.ConstantStepSize(), \
            problem.steps + 1
    else:
        dt0, max_steps = None, 100_000
        controller = diffrax.PIDController(rtol=problem.rtol, atol=problem.atol)
    field = _jax_field(problem.kind)
    w = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in problem.field.state_dict().items()}
    weight = None if problem.weight is None else jnp.asarray(problem.weight.cpu().numpy())

    def solve(y, p):
        return diffrax.diffeqsolve(diffrax.ODETerm(field), solver, t0, t1, dt0, y, args=p,
                                   stepsize_controller=controller, max_steps=max_steps,
                                   adjoint=adjoint)

    def loss(y, p):
        y_end = solve(y, p).ys[-1]
        return (y_end ** 2).sum() if weight is None else (weight * y_end).sum()

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    y = jnp.asarray(problem.y0.detach().cpu().numpy())
    start = time.perf_counter()
    jax.block_until_ready(step(y, w))
    compile_s = time.perf_counter() - start
    if stats_out is not None:
        stats = jax.jit(lambda y, p: solve(y, p).stats)(y, w)
        stats_out.update(n_accepted=int(stats["num_accepted_steps"]),
                         n_rejected=int(stats["num_rejected_steps"]))
    names = list(w)

    def run():
        return jax.block_until_ready(step(y, w))[1]

    def flat(grads) -> Tensor:
        gy, gp = grads
        parts = [np.asarray(gy).reshape(-1)] + [np.asarray(gp[k]).reshape(-1) for k in names]
        return torch.from_numpy(np.concatenate(parts).astype(np.float64))

    adjoint_label = "" if config == "checkpoint" else f" {adjoint_name}"  # P1's label kept
    label = f"diffrax {diffrax.__version__} {solver_name}{adjoint_label} under jax.jit"
    return run, flat, compile_s, label
