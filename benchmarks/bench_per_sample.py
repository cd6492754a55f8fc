"""Per-sample adaptive steps (issue 17): f evaluations and wall time of a batch whose members
differ 100x in stiffness, against each sample alone, the shared-step solve and torchode.

    PYTHONPATH=src python benchmarks/bench_per_sample.py                 # batch 16, dim 4
    PYTHONPATH=src python benchmarks/bench_per_sample.py --batch 64 --repeats 5

Problem: y_b' = −k_b y_b + MLP(y_b) with k_b log-spaced in [1, 100], a small shared tanh MLP
(dim → 32 → dim), y0 ~ N(0, 1), t ∈ [0, 2] with 21 shared output times, dopri5,
rtol 1e-6, atol 1e-8, float64.

Counts. "used" evaluations of a sample are those its own steps need (odegrad: stats
sample_nfe, equal to its lone solve's nfe; torchode: 6 per attempted step + 2, from its
per-sample n_steps, as dopri5 is FSAL and its initial step costs 2). "computed" evaluations are
the rows f actually processed: (batched f calls) × batch; a finished sample is still evaluated
(masked) until the last one ends, in odegrad and in torchode alike. The shared-step solve uses
one step size and one error norm (RMS over the whole batch). Wall: median of --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import odegrad

DT = torch.float64


class Field(torch.nn.Module):
    """y' = −k ⊙ y + MLP(y); k of shape (batch, 1) (batched) or a scalar (one sample)."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim)
        ).to(DT)
        self.k: torch.Tensor | float = 1.0

    def forward(self, t, y):
        return -self.k * y + self.net(y)


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            result = fn()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def run_torchode(field: Field, y0: torch.Tensor, t: torch.Tensor, rtol: float, atol: float,
                 repeats: int):
    try:
        import torchode as to
    except ImportError:
        return None
    term = to.ODETerm(lambda s, y: field(s, y))
    # pcoeff = β₂, pcoeff + icoeff = β₁: odegrad's PI controller (β₁ 0.85, β₂ 0.2, k = 5)
    controller = to.PIDController(atol=atol, rtol=rtol, pcoeff=0.2, icoeff=0.65, dcoeff=0.0,
                                  term=term)
    solver = to.AutoDiffAdjoint(to.Dopri5(term=term), controller)
    problem = to.InitialValueProblem(y0=y0, t_eval=t.expand(y0.shape[0], -1))
    solution, wall = timed(lambda: solver.solve(problem), repeats)
    return solution, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-8)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch, rtol, atol = args.batch, args.rtol, args.atol
    field = Field(args.dim)
    k = torch.logspace(0, 2, batch, dtype=DT)
    y0 = torch.randn(batch, args.dim, dtype=DT)
    t = torch.linspace(0.0, 2.0, 21, dtype=DT)
    options = dict(method="dopri5", rtol=rtol, atol=atol)

    field.k = k[:, None]
    per, wall_per = timed(lambda: odegrad.solve(field, y0, t, per_sample=True, **options),
                          args.repeats)
    shared, wall_shared = timed(lambda: odegrad.solve(field, y0, t, **options), args.repeats)

    def alone_all():
        out = []
        for b in range(batch):
            field.k = float(k[b])
            out.append(odegrad.solve(field, y0[b], t, **options))
        field.k = k[:, None]
        return out

    alone, wall_alone = timed(alone_all, args.repeats)
    lone_nfe = torch.tensor([s.stats["nfe_forward"] for s in alone])
    lone_ys = torch.stack([s.ys for s in alone], dim=1)
    used = per.stats["sample_nfe"]
    ratio = (used / lone_nfe).max().item()

    rows = [
        ("each sample alone (odegrad, a loop)", int(lone_nfe.sum()), int(lone_nfe.sum()),
         int(lone_nfe.sum()), wall_alone, 0.0),
        ("odegrad per_sample=True", int(used.sum()), per.stats["nfe_forward"] * batch,
         per.stats["nfe_forward"], wall_per, (per.ys - lone_ys).abs().max().item()),
        ("odegrad shared steps", shared.stats["nfe_forward"] * batch,
         shared.stats["nfe_forward"] * batch, shared.stats["nfe_forward"], wall_shared,
         (shared.ys - lone_ys).abs().max().item()),
    ]
    tode = run_torchode(field, y0, t, rtol, atol, args.repeats)
    if tode is not None:
        solution, wall_tode = tode
        steps = solution.stats["n_steps"].cpu()
        calls = int(solution.stats["n_f_evals"].max())
        rows.append(("torchode 1.0.1 (AutoDiffAdjoint, Dopri5, PID)", int((6 * steps + 2).sum()),
                     calls * batch, calls, wall_tode,
                     (solution.ys.transpose(0, 1) - lone_ys).abs().max().item()))

    print(f"batch {batch}, dim {args.dim}, k_b log-spaced in [1, 100], dopri5, rtol {rtol}, "
          f"atol {atol}, float64, {torch.__version__}, {args.repeats} repeats")
    print("| solve | f evals used (Σ over samples) | f evals computed (rows) | batched f calls "
          "| wall ms | max |y − y_alone| |")
    print("|---|---|---|---|---|---|")
    for name, used_total, computed, calls, wall, dev in rows:
        print(f"| {name} | {used_total} | {computed} | {calls} | {1e3 * wall:.0f} | {dev:.1e} |")
    print()
    print(f"per-sample used / alone: max over samples {ratio:.3f} (acceptance <= 1.3)")
    print(f"per-sample steps {per.stats['sample_n_steps'].tolist()}")
    print(f"alone steps      {[s.stats['n_steps'] for s in alone]}")
    if tode is not None:
        print(f"torchode steps   {tode[0].stats['n_steps'].tolist()}")
    shared_total = shared.stats["nfe_forward"] * batch
    print(f"shared / per-sample used evaluations: {shared_total / int(used.sum()):.2f}x")
    if tode is not None:
        print(f"shared / torchode used evaluations: {shared_total / rows[-1][1]:.2f}x")


if __name__ == "__main__":
    main()
