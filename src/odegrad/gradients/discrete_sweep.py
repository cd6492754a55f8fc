"""The reverse sweep of the discrete adjoint (ALGORITHMS.md §1, §2): λ = ∂L/∂y_{n+1} pulled back
through steps N−1, …, 0 over the checkpoints that gradients/discrete.py kept, recomputing
what the schedule says, one step at a time (explicit Runge–Kutta stage recurrence, a solver's
own step_vjp, or a replay of any solver's step under autograd)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..checkpointing import Delete, Forward, Load, Reverse, Save, Schedule, reverse_segments
from ..loop import _TABLE_DTYPES, _StageTimeRows, replay_rejected, stage_time_table
from ..solvers.base import Solver
from ..solvers.explicit import combine
from .checkpoint_store import _INIT, _Kept, _tensors

if TYPE_CHECKING:
    from .discrete import _Run


class _Acc:
    """A running sum Σ α_k x_k that adds in place only into tensors it allocated itself."""

    def __init__(self):
        self.value: Tensor | None = None
        self._owned = False

    def add(self, x: Tensor | None, alpha: float = 1.0) -> None:
        if x is None or alpha == 0.0:
            return
        if self.value is None:
            self.value, self._owned = (x, False) if alpha == 1.0 else (x * alpha, True)
        elif self._owned:
            self.value.add_(x, alpha=alpha)
        else:
            self.value, self._owned = torch.add(self.value, x, alpha=alpha), True


class _SavedBytes:
    """Within it, the bytes autograd saves for backward passes (saved_tensors_hooks)."""

    def __enter__(self) -> _SavedBytes:
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._hooks.__enter__()
        return self

    def _pack(self, x: Tensor) -> Tensor:
        self.total += x.numel() * x.element_size()
        return x

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Backward:
    """The reverse sweep: λ = ∂L/∂y_{n+1} pulled back through steps N−1, …, 0 (ALGORITHMS §1)."""

    def __init__(self, run: _Run, grad_ys: Tensor, time: bool):
        self.run_ = run
        self.problem = run.problem
        self.solver = run.solver
        self.f = run.problem.f
        self.params = list(run.problem.params)
        self.grad_ys = grad_ys
        self.time = time
        t = run.problem.t
        self.t = t.detach()
        self.t_bar = torch.zeros_like(self.t) if time else None
        self.steps = run.trajectory.steps
        self.ends: dict[int, list[int]] = {}
        self.inside: dict[int, list[tuple[int, float]]] = {}
        for out in run.trajectory.outputs:
            if out.step < 0:
                continue
            if out.index == self.steps[out.step].end_anchor:
                self.ends.setdefault(out.step, []).append(out.index)
            else:
                self.inside.setdefault(out.step, []).append((out.index, out.theta))
        self.lam: Tensor | None = None  # ∂L/∂state_{n+1}
        self.carry_bar: Any = None  # ∂L/∂(carry of step n+1): FSAL stage or solver carry
        self.param_bars: list[Tensor | None] = [None] * len(self.params)
        self.param_owned = [False] * len(self.params)  # param_bars[k] allocated here
        self.all_owned = False
        self.fsal_bar: tuple[Tensor, float] | None = None  # κ_1 of step n+1 = c v, as (v, c)
        self.rows = None  # explicit RK: the stage times of every step (stage_times)
        if run.rk:
            s = len(run.c)
            # κ_i reads ȳ_j of the later stages j with a_ji ≠ 0
            self.later = [[(j, run.a[j][i]) for j in range(i + 1, s) if run.a[j][i] != 0.0]
                          for i in range(s)]
            if self.steps and t.dtype in _TABLE_DTYPES:
                plan = [(r.h, r.end_anchor, r.start_anchor, r.start_offset) for r in self.steps]
                times = [float(v) for v in self.t.cpu().tolist()]
                self.rows = _StageTimeRows(stage_time_table(times, plan, run.c, self.t))
        self.current: tuple[int, Tensor, Any] | None = None  # (n, state, carry)
        self.recomputed = 0
        # compile=True: the replay runs whole compiled blocks of steps (reverse_block)
        self.block = getattr(self.solver, "block", 1) \
            if getattr(self.solver, "compiled_block", None) is not None else 1
        self.block_table: Tensor | None = None  # the stage times of every step, (N, s)
        if (self.block > 1 and self.steps and not time and run.streams is None
                and t.dtype in _TABLE_DTYPES):
            plan = [(r.h, r.end_anchor, r.start_anchor, r.start_offset) for r in self.steps]
            times = [float(v) for v in self.t.cpu().tolist()]
            self.block_table = stage_time_table(times, plan, self.solver.stage_nodes, self.t)
        self.block_from: int | None = None  # steps block_from, … already pulled back
        # compile=True on the CPU: runs of steps instead of blocks (reverse_run)
        self.runs = self.block_table is not None and \
            getattr(self.solver, "compiled_run", None) is not None
        self.run_rows = None  # RunRows of every step, made at the first run

    # ---- the sweep --------------------------------------------------------------------------

    def run(self) -> tuple:
        run, store, n_steps = self.run_, self.run_.store, len(self.steps)
        if n_steps:
            slots = run.policy.slots if run.policy.kind in ("binomial", "budget") else 0
            schedule = reverse_segments(sorted(store.kept), n_steps, max(slots, len(store.kept)))
            self.execute(schedule)
        state0 = self.problem.solver.initial_state(self.problem.y0.detach())
        lam = self.lam
        if run.rk and run.fsal and self.fsal_bar is not None:
            key = run.stage_keys[0][0] if run.streams is not None else None
            v, c = self.fsal_bar
            g_y, g_t = self.vjp(self.t[0], state0, v, key, c)
            lam = _sum(lam, None if g_y is None else g_y * c)
            if g_t is not None:
                self.t_bar[0] += g_t * c
        y0_bar = _sum(self.grad_ys[0], self.initial_state_vjp(lam))
        self.problem.stats["n_recomputed_steps"] += self.recomputed
        return (y0_bar, self.t_bar, *self.param_bars)

    def execute(self, schedule: Schedule) -> None:
        store = self.run_.store
        for action in schedule.actions:
            if isinstance(action, Load):
                kept = store.kept[action.n]
                self.current = (action.n, kept.state, kept.carry)
            elif isinstance(action, Forward):
                self.advance(action.n0, action.n1)
            elif isinstance(action, Save):
                n, state, carry = self.current
                store.save(n, _Kept(state=state, carry=None if self.run_.rk else carry))
            elif isinstance(action, Delete):
                store.delete(action.n)
            elif isinstance(action, Reverse):
                kept = store.kept.get(action.n)
                self.reverse(action.n, kept)
                self.current = None

    def t_n(self, n: int) -> Tensor:
        record = self.steps[n]
        return self.t[record.start_anchor] + record.start_offset

    def retried(
        self, n: int, state: Tensor, carry: Any, graph: bool = False, t_n: Tensor | None = None
    ) -> Any:
        """The carry step n's accepted attempt started from: the forward loop's rejected
        attempts at t_n replayed (loop.replay_rejected). A solver whose retry carry is the
        incoming one (explicit) gets `carry` back unchanged; one whose retry carry is computed
        in the attempt (the first stage f(t_n, z_n) of a reversible Runge–Kutta step) gets it
        recomputed, with a graph back to `state` and the parameters when `graph` is set (the
        replay that differentiates the step needs it: without it the carry's dependence on
        the state would be dropped); an implicit solver gets the refreshed Jacobian its retry
        used, so the replay is exact. Rejected attempts of a stochastic f are replayed with
        fresh randomness. `t_n`: the step's time as the caller differentiates it."""
        if not self.steps[n].rejected:
            return carry
        t_n = self.t_n(n) if t_n is None else t_n
        with torch.enable_grad() if graph else torch.no_grad():
            return replay_rejected(self.solver, self.f, t_n, self.steps[n], state, carry)

    def keyed(self, keys) -> Callable:
        streams = self.run_.streams
        return self.f if streams is None else streams.replaying(self.f, keys)

    # ---- recomputation ----------------------------------------------------------------------

    def first_stage(self, n: int, y: Tensor) -> Tensor:
        """K_1 of step n as the forward pass evaluated it (the FSAL stage of step n − 1)."""
        run = self.run_
        f = self.keyed(run.stage_keys[n][:1] if run.streams is not None else ())
        if n == 0:
            return f(self.t[0], y)
        if run.fsal:
            prev = self.steps[n - 1]
            return f(self.t_n(n - 1) + run.c[-1] * prev.h, y)
        return f(self.t_n(n), y)

    def advance(self, n0: int, n1: int) -> None:
        """Recompute steps n0, …, n1 − 1 without a graph from the current state (at n0)."""
        run = self.run_
        n, state, carry = self.current
        assert n == n0, (n, n0)
        for m in range(n0, n1):
            record = self.steps[m]
            if run.rk:
                k1 = carry if carry is not None else self.first_stage(m, state)
                keys = run.stage_keys[m][1:] if run.streams is not None else ()
                step = self.solver.step(self.keyed(keys), self.t_n(m), record.h, state, k1)
                carry = step.carry
            else:
                keys = run.step_keys[m] if run.streams is not None else ()
                f = self.keyed(keys)
                if carry is _INIT:
                    carry = self.solver.init(f, self.t[0], state)
                carry = self.retried(m, state, carry)
                step = self.solver.step(f, self.t_n(m), record.h, state, carry)
                carry = step.carry
            state = step.y
            self.recomputed += 1
        self.current = (n1, state, carry)

    def reverse(self, n: int, kept: _Kept | None) -> None:
        run = self.run_
        if run.rk:
            if kept is not None and kept.stages is not None:
                y, ks = kept.state, kept.stages
            else:
                m, y, carry = self.current
                assert m == n, (m, n)
                k1 = carry if carry is not None else self.first_stage(n, y)
                keys = run.stage_keys[n][1:] if run.streams is not None else ()
                ks, _ = self.solver.stages_from(
                    self.keyed(keys), self.t_n(n), self.steps[n].h, y, k1
                )
                self.recomputed += 1
            self.reverse_rk(n, y, ks)
        elif run.has_step_vjp:
            self.reverse_step_vjp(n, kept)
        else:
            if self.block_from is not None and n >= self.block_from:
                return  # pulled back with the block above it
            self.block_from = None
            if self.runs and self.reverse_run(n):
                return
            # (with runs on, no blocks: the first step replayed singly is measured, and a
            # block would hold BLOCK steps' replay where a run of that many was refused)
            if not self.runs and self.block_table is not None and self.reverse_block(n):
                return
            m, state, carry = self.current
            assert m == n, (m, n)
            if self.runs and self.solver.replay_bytes(state) is None:
                # what one step's replay holds for its backward, which bounds runs' length
                with _SavedBytes() as saved:
                    self.reverse_replay(n, state, carry)
                self.solver.note_replay_bytes(state, saved.total)
                return
            self.reverse_replay(n, state, carry)

    def reverse_run(self, n: int) -> bool:
        """compile=True on the CPU: pull the cotangents back through steps first, …, n at
        once, by one compiled replay of the run from the kept state of step `first`
        (CompiledRungeKutta.run_vjp): the longest stretch of steps ending at n with no
        rejected attempt and no output inside a step (outputs at step ends are cotangents of
        the run's states), its first state kept, whose replay holds at most
        RUN_REPLAY_MAX_BYTES for its backward (one step's, measured on the first step replayed
        singly, times the steps: the discrete adjoint's memory stays its checkpoints and a
        bounded replay). False: blocks or step by step. The steps below n in the run are then
        skipped by `reverse`."""
        from ..compiled import RUN_MIN, RUN_REPLAY_MAX_BYTES, RunRows

        solver, steps, kept = self.solver, self.steps, self.run_.store.kept
        if (not kept or steps[n].rejected or n in self.inside
                or (type(solver).observe is not Solver.observe
                    and (self.ends or self.lam is not None))):
            return False
        # (every kept state has the state's shape: any one tells the measured bytes)
        per_step = solver.replay_bytes(next(iter(kept.values())).state)
        if per_step is None:  # not measured yet: this step singly, measured
            return False
        longest = RUN_REPLAY_MAX_BYTES // max(per_step, 1)
        if longest < RUN_MIN:
            return False
        m = n
        while m > 0 and n - m + 2 <= longest and not steps[m - 1].rejected \
                and (m - 1) not in self.inside:
            m -= 1
        while m <= n - RUN_MIN + 1 and (
                m not in kept or (solver.fsal and not isinstance(kept[m].carry, Tensor))):
            m += 1
        if n - m + 1 < RUN_MIN:
            return False
        first, start = m, kept[m]
        carry_bar = self.carry_bar[0] if solver.fsal and self.carry_bar else None
        ys_bar = torch.zeros((n - first + 1, *start.state.shape), dtype=start.state.dtype,
                             device=start.state.device)
        lam = self.lam
        if lam is not None:
            ys_bar[-1] = lam
        for k in range(first, n + 1):
            for i in self.ends.get(k, ()):
                ys_bar[k - first] += self.grad_ys[i]
        if self.run_rows is None:
            self.run_rows = RunRows.of(self.block_table, [r.h for r in steps], start.state)
        out = solver.run_vjp(self.run_rows.between(first, n + 1), start.state,
                             start.carry if solver.fsal else None, ys_bar, carry_bar,
                             self.params)
        if out is None:
            self.runs = False
            return False
        self.pulled_back_to(first, out)
        return True

    def reverse_block(self, n: int) -> bool:
        """compile=True: pull the cotangents back through steps n − BLOCK + 1, …, n at once,
        by one compiled replay of the block from its kept first state (CompiledRungeKutta.
        block_vjp), when those steps share one step size, have no output inside and no
        rejected attempt (else False: step by step). The steps below n in the block are then
        skipped by `reverse`."""
        first = n - self.block + 1
        if first < 0:
            return False
        kept = self.run_.store.kept.get(first)
        solver, steps = self.solver, self.steps
        if kept is None or (solver.fsal and not isinstance(kept.carry, Tensor)):
            return False
        h = steps[n].h
        for m in range(first, n + 1):
            if (steps[m].h != h or steps[m].rejected or m in self.inside
                    or (m != n and m in self.ends)):
                return False
        lam = self.lam
        for i in self.ends.get(n, ()):
            lam = _sum(lam, self.grad_ys[i])
        if lam is not None and type(solver).observe is not Solver.observe:
            return False
        carry_bar = None
        if solver.fsal and self.carry_bar:
            carry_bar = self.carry_bar[0]
        if lam is None and carry_bar is None:
            return False
        out = solver.block_vjp(self.block_table[first:n + 1], h, kept.state,
                               kept.carry if solver.fsal else None, lam, carry_bar,
                               self.params)
        if out is None:
            return False
        self.pulled_back_to(first, out)
        return True

    def pulled_back_to(self, first: int, out: tuple) -> None:
        """Take a run's or a block's pull-back (∂/∂y_first, ∂/∂K_1, the parameters'
        gradients): `reverse` then skips the steps down to `first`."""
        self.lam, k1_bar, param_grads = out
        self.carry_bar = [k1_bar] if self.solver.fsal else []
        self.add_params(list(param_grads))
        self.block_from = first

    # ---- one step back: explicit Runge–Kutta ------------------------------------------------

    def reverse_rk(self, n: int, y: Tensor, ks: list[Tensor]) -> None:
        """κ_i = h(b_i λ + Σ_o b_i(θ_o) ȳ_o + Σ_{j>i} a_ji J_j^T κ_j),
        λ_n = λ + Σ_o ȳ_o + Σ_i J_i^T κ_i (ALGORITHMS §1). The FSAL stage's cotangent from
        step n + 1 is added to κ_s; κ_1 of an FSAL scheme goes back to step n − 1 instead of
        through a VJP here.

        Each κ_i is kept as a pair (v, c) with κ_i = c v, and each VJP is taken of v and scaled
        by c where it is accumulated (J^T is linear): a κ of one term then costs no tensor op
        and one of m terms m − 1 fused adds, instead of a scaling per term."""
        run, record = self.run_, self.steps[n]
        h, s = record.h, len(ks)
        lam = self.lam
        for i in self.ends.get(n, ()):
            lam = _sum(lam, self.grad_ys[i])
        inside = [(i, theta, self.grad_ys[i], self.solver.dense_weights(theta))
                  for i, theta in self.inside.get(n, ())]
        times = self.stage_times(n)
        keys = run.stage_keys[n] if run.streams is not None else None
        lam_n = _Acc()
        lam_n.add(lam)
        for _, _, g, _ in inside:
            lam_n.add(g)
        y_bars: list[tuple[Tensor, float] | None] = [None] * s  # ȳ_j = c u_j as (u_j, c)
        t_n_bar = h_bar = None
        fsal_bar = None
        for i in range(s - 1, -1, -1):
            terms = [] if lam is None or run.b[i] == 0.0 else [(lam, h * run.b[i])]
            for _, _, g, w in inside:
                if w[i] != 0.0:
                    terms.append((g, h * w[i]))
            for j, a in self.later[i]:
                if y_bars[j] is not None:
                    terms.append((y_bars[j][0], h * a * y_bars[j][1]))
            kappa = _scaled_sum(terms)
            if self.time and kappa is not None:  # ∂/∂h of the h Σ_j (·) K_j terms
                h_bar = _sum(h_bar, (ks[i] * kappa[0]).sum() * (kappa[1] / h))
            if i == s - 1 and run.fsal and self.fsal_bar is not None:
                kappa = _scaled_sum(([kappa] if kappa is not None else []) + [self.fsal_bar])
            if i == 0 and run.fsal:
                fsal_bar = kappa
                continue
            if kappa is None:
                continue
            v, c = kappa
            point = y if i == 0 else combine(y, h, run.a_terms[i], ks)
            u, g_t = self.vjp(times[i], point, v, None if keys is None else keys[i], c)
            if u is not None:
                y_bars[i] = (u, c)
                lam_n.add(u, c)
            if g_t is not None:
                g_t = g_t * c
                t_n_bar = _sum(t_n_bar, g_t)
                h_bar = _sum(h_bar, run.c[i] * g_t)
        if self.time:
            theta_bars = []
            for i, theta, g, _ in inside:
                slopes = self.dense_slopes(theta)
                dots = sum(float(slopes[j]) * (g * ks[j]).sum() for j in range(s) if slopes[j])
                theta_bars.append((i, theta, h * dots))
            self.chain_time(record, t_n_bar, h_bar, theta_bars)
        self.lam, self.fsal_bar = lam_n.value, fsal_bar

    def stage_times(self, n: int) -> tuple[Tensor, ...] | list[Tensor]:
        """t_n + c_i h_n of every stage of step n: views of one table built before the sweep
        (loop.stage_time_table, bit for bit the scalar ops), else those scalar ops."""
        if self.rows is not None:
            return self.rows[n]
        t_n, h = self.t_n(n), self.steps[n].h
        return [t_n] + [t_n + c * h for c in self.run_.c[1:]]

    def dense_slopes(self, theta: float) -> list[float]:
        """b_i'(θ) = Σ_k P[i, k] (k + 1) θ^k."""
        dense = self.run_.dense
        powers = [(k + 1) * theta**k for k in range(dense.shape[1])]
        return [float(sum(p * q for p, q in zip(row, powers))) for row in dense]

    def vjp(self, t: Tensor, y: Tensor, cotangent: Tensor, key: int | None,
            scale: float = 1.0):
        """J^T κ and ∂/∂t of <κ, f(t, y)> for κ = `cotangent`, and P^T κ times `scale` added
        to the parameters' gradients: one VJP of f."""
        with torch.enable_grad():
            y_in = y.detach().requires_grad_()
            t_in = t.detach().requires_grad_() if self.time else t
            if key is not None:
                self.run_.streams.seed(key)
            out = self.f(t_in, y_in)
            if not out.requires_grad:
                return None, None
            inputs = (y_in, t_in, *self.params) if self.time else (y_in, *self.params)
            grads = _pullback(out, inputs, cotangent)
        if self.params:
            self.add_params(grads[len(grads) - len(self.params):], scale)
        return grads[0], (grads[1] if self.time else None)

    def add_params(self, grads, scale: float = 1.0) -> None:
        """param_bars += scale * grads, in place into the sums this sweep allocated (a
        gradient autograd hands back may alias a cotangent, so it is never written to)."""
        bars, owned = self.param_bars, self.param_owned
        if not grads:
            return
        if self.all_owned and all(g is not None for g in grads):
            torch._foreach_add_(bars, list(grads), alpha=scale)
            return
        for k, g in enumerate(grads):
            if g is None:
                continue
            if bars[k] is None:
                bars[k], owned[k] = (g, False) if scale == 1.0 else (g * scale, True)
            elif owned[k]:
                bars[k].add_(g, alpha=scale)
            else:
                bars[k], owned[k] = torch.add(bars[k], g, alpha=scale), True
        self.all_owned = all(owned)

    def chain_time(self, record, t_n_bar, h_bar, theta_bars) -> None:
        """dL/dt from dL/dt_n, dL/dh_n and dL/dθ: t_n = t[a] + offset, h_n = t[e] − t_n for a
        step that lands on an output time, θ = (t_i − t_n)/h_n (see loop.Trajectory)."""
        zero = self.t.new_zeros(())
        t_n_bar = zero if t_n_bar is None else t_n_bar
        h_bar = zero if h_bar is None else h_bar
        for i, theta, g in theta_bars:
            self.t_bar[i] += g / record.h
            t_n_bar = t_n_bar - g / record.h
            h_bar = h_bar - g * theta / record.h
        if record.end_anchor is not None:
            self.t_bar[record.end_anchor] += h_bar
            t_n_bar = t_n_bar - h_bar
        self.t_bar[record.start_anchor] += t_n_bar

    # ---- one step back: any solver ----------------------------------------------------------

    def reverse_replay(self, n: int, state: Tensor, carry: Any) -> None:
        """Replay solver.step under autograd and pull back the cotangents of everything it
        hands on (next state, carry, outputs) in one torch.autograd.grad."""
        record, solver = self.steps[n], self.solver
        run = self.run_
        f = self.keyed(run.step_keys[n] if run.streams is not None else ())
        with torch.enable_grad():
            state_in = state.detach().requires_grad_()
            t_in = self.t_n(n).requires_grad_(self.time)
            h_in = torch.tensor(record.h, dtype=self.t.dtype, device=self.t.device,
                                requires_grad=True) if self.time else record.h
            carry_leaves: list[Tensor] = []
            if carry is _INIT:
                carry_in = solver.init(f, t_in, state_in)
            else:
                carry_in = _leaves(carry, carry_leaves)
            carry_in = self.retried(n, state_in, carry_in, graph=True, t_n=t_in)
            step = solver.step(f, t_in, h_in, state_in, carry_in)
            outs, cots = [], []
            if self.lam is not None:
                outs.append(step.y)
                cots.append(self.lam)
            end_bar = None
            for i in self.ends.get(n, []):
                end_bar = _sum(end_bar, self.grad_ys[i])
            if end_bar is not None:
                outs.append(solver.observe(step.y))
                cots.append(end_bar)
            if self.carry_bar is not None:
                for x, g in zip(_tensors(step.carry), self.carry_bar):
                    if g is not None:
                        outs.append(x)
                        cots.append(g)
            thetas = []
            for i, theta in self.inside.get(n, []):
                th = torch.tensor(theta, dtype=self.t.dtype, device=self.t.device,
                                  requires_grad=True) if self.time else theta
                thetas.append((i, theta, th))
                outs.append(solver.interpolate(state_in, h_in, step.dense, th))
                cots.append(self.grad_ys[i])
            pairs = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
            carry_diff = [x for x in carry_leaves if x.requires_grad]
            time_inputs = [t_in, h_in] + [th for _, _, th in thetas] if self.time else []
            inputs = [state_in] + carry_diff + time_inputs + self.params
            if pairs:
                grads = torch.autograd.grad(
                    [o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True
                )
            else:
                grads = [None] * len(inputs)
        k = 1 + len(carry_diff)
        self.lam = grads[0]
        carry_grads = iter(grads[1:k])
        self.carry_bar = [next(carry_grads) if x.requires_grad else None for x in carry_leaves]
        if self.time:
            theta_bars = [(i, theta, g) for (i, theta, _), g in
                          zip(thetas, grads[k + 2:k + 2 + len(thetas)]) if g is not None]
            self.chain_time(record, grads[k], grads[k + 1], theta_bars)
        self.add_params(grads[len(grads) - len(self.params):])

    def reverse_step_vjp(self, n: int, kept: _Kept | None) -> None:
        """The solver's own adjoint step (implicit methods: transposed stage solves)."""
        record, solver = self.steps[n], self.solver
        t_n = self.t_n(n)
        if kept is not None and kept.step is not None:
            state, step = kept.state, kept.step
        else:
            m, state, carry = self.current
            assert m == n, (m, n)
            if carry is _INIT:
                carry = solver.init(self.f, self.t[0], state)
            carry = self.retried(n, state, carry)
            step = solver.step(self.f, t_n, record.h, state, carry)
            self.recomputed += 1
        lam = self.lam if self.lam is not None else torch.zeros_like(step.y)
        end_bar = None
        for i in self.ends.get(n, []):
            end_bar = _sum(end_bar, self.grad_ys[i])
        if end_bar is not None:
            lam = lam + self.observe_vjp(step.y, end_bar)
        dense_bars = [(theta, self.grad_ys[i]) for i, theta in self.inside.get(n, [])]
        state_bar, param_bars = solver.step_vjp(
            self.f, t_n, record.h, state, step, lam, dense_bars, tuple(self.params)
        )
        self.lam = state_bar
        self.add_params(param_bars)

    def observe_vjp(self, state: Tensor, y_bar: Tensor) -> Tensor:
        if type(self.solver).observe is Solver.observe:
            return y_bar
        with torch.enable_grad():
            state_in = state.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.solver.observe(state_in), state_in, y_bar)
        return g

    def initial_state_vjp(self, lam: Tensor | None) -> Tensor | None:
        if lam is None or type(self.solver).initial_state is Solver.initial_state:
            return lam
        with torch.enable_grad():
            y0 = self.problem.y0.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.solver.initial_state(y0), y0, lam, allow_unused=True)
        return g


def _pullback(out: Tensor, inputs: tuple[Tensor, ...], cotangent: Tensor) -> tuple:
    """torch.autograd.grad(out, inputs, cotangent, allow_unused=True) straight through the
    autograd engine: the public wrapper's argument checks (shape checks through the symbolic
    shape machinery) cost about 50 µs a call, a quarter of a small field's VJP (CPU, torch
    2.13). Here `cotangent` has out's shape, dtype and device by construction (f's output is
    checked against y's once, by CountedField)."""
    if _ENGINE is None:
        return torch.autograd.grad(out, inputs, cotangent, allow_unused=True)
    return _ENGINE.run_backward((out,), (cotangent,), False, False, inputs, True, False)


# torch's engine entry point (what torch.autograd.grad calls), or None if it moves.
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
if not hasattr(_ENGINE, "run_backward"):
    _ENGINE = None


def _scaled_sum(terms: list[tuple[Tensor, float]]) -> tuple[Tensor, float] | None:
    """Σ_m w_m x_m as (v, c) with the sum = c v: c the weight largest in magnitude, so v costs
    one fused add per further term (none for one term) and its ratios are at most 1."""
    terms = [(x, w) for x, w in terms if w != 0.0]  # (an underflowed weight adds nothing)
    if not terms:
        return None
    pivot = max(range(len(terms)), key=lambda m: abs(terms[m][1]))
    x, c = terms[pivot]
    rest = terms[:pivot] + terms[pivot + 1:]
    if not rest:
        return x, c
    v = torch.add(x, rest[0][0], alpha=rest[0][1] / c)
    for other, w in rest[1:]:
        v.add_(other, alpha=w / c)
    return v, c


def _sum(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _leaves(obj: Any, leaves: list[Tensor]) -> Any:
    """A copy of a carry whose floating-point tensors are fresh leaves requiring grad."""
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            leaf = obj.detach().requires_grad_()
            leaves.append(leaf)
            return leaf
        leaves.append(obj)  # keeps positions aligned with _tensors(); not differentiated
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_leaves(x, leaves) for x in obj]
        return type(obj)(items) if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        return {k: _leaves(v, leaves) for k, v in obj.items()}
    return obj
