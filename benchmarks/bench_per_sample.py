"""Per-sample adaptive steps (issue 17): f evaluations, accuracy and time of a batch whose
members differ 100x in stiffness, against each sample alone, the shared-step solve and torchode
(its per-sample solve and its joint solve of the same batch), all in one run.

    PYTHONPATH=src python benchmarks/bench_per_sample.py                 # batch 16, dim 4
    PYTHONPATH=src python benchmarks/bench_per_sample.py --batch 64 --repeats 5

Problem: y_b' = −k_b y_b + MLP(y_b) with k_b log-spaced in [1, 100], a small shared tanh MLP
(dim → 32 → dim), y0 ~ N(0, 1), t ∈ [0, 2] with 21 shared output times, dopri5,
rtol 1e-6, atol 1e-8, float64.

Counts. "used" evaluations of a sample are those its own steps need (odegrad: stats
sample_nfe, equal to its lone solve's nfe; torchode: 6 per attempted step + 2, from its
per-sample n_steps, as dopri5 is FSAL and its initial step costs 2). "computed" evaluations are
the rows f actually processed: (batched f calls) × batch; a finished sample is still evaluated
(masked) until the last one ends, in odegrad and in torchode alike. A joint (shared-step) solve
takes one step size for the batch, with one error norm, the RMS over the whole batch: odegrad
without per_sample, torchode on the batch flattened into one problem of batch · dim components
(the comparison of torchode's paper). Each library's factor is its joint solve's used
evaluations over its per-sample solve's.

Accuracy ("err"): per sample, the largest over the output times of the RMS of
(y − y_ref) / (atol + rtol |y_ref|), y_ref from lone odegrad solves at rtol 1e-13, atol 1e-15;
the table gives its median and maximum over the samples. torchode's Dopri5 estimates the local
error with another embedded 4th-order solution (b̂ = 1951/21600, 0, 22642/50085, 451/720,
−12231/42400, 649/6300, 1/60, also diffrax's) than odegrad's (Dormand–Prince's 5179/57600, …,
1/40): a smaller estimate, so fewer steps and a larger achieved error at the same tolerances.
The rows "(torchode's b̂)" run odegrad with that estimator (a dopri5 tableau registered here
with e = b − torchode's b̂), which isolates the estimator from the per-sample stepping.

Wall: the solves are timed in turn (interleaved), median of --repeats, under torch.no_grad.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

import odegrad
from odegrad.solvers import register_solver
from odegrad.solvers.explicit import ExplicitRungeKutta
from odegrad.tableaus import DOPRI5

DT = torch.float64
# torchode's (and diffrax's) embedded 4th-order weights for Dopri5
TORCHODE_B_HAT = np.array([1951 / 21600, 0.0, 22642 / 50085, 451 / 720, -12231 / 42400,
                           649 / 6300, 1 / 60])


def register_torchode_estimator() -> str:
    """odegrad's dopri5 with torchode's error estimate, as method "dopri5_torchode_bhat"."""
    tableau = dataclasses.replace(DOPRI5, name="dopri5_torchode_bhat",
                                  error=DOPRI5.b - TORCHODE_B_HAT)
    register_solver(tableau.name, lambda: ExplicitRungeKutta(tableau))
    return tableau.name


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


def timed_in_turn(solves: dict, repeats: int) -> tuple[dict, dict]:
    """Run every solve once per round, `repeats` rounds: (last results, median wall s)."""
    results, walls = {}, {name: [] for name in solves}
    for _ in range(repeats):
        for name, solve in solves.items():
            start = time.perf_counter()
            with torch.no_grad():
                results[name] = solve()
            walls[name].append(time.perf_counter() - start)
    return results, {name: statistics.median(w) for name, w in walls.items()}


def torchode_solves(field: Field, y0: torch.Tensor, t: torch.Tensor, rtol: float, atol: float):
    """torchode's per-sample solve and its joint solve (the batch as one problem), or {}."""
    try:
        import torchode as to
    except ImportError:
        return {}
    batch, dim = y0.shape

    def solver(term):
        # pcoeff = β₂, pcoeff + icoeff = β₁: odegrad's PI controller (β₁ 0.85, β₂ 0.2, k = 5)
        controller = to.PIDController(atol=atol, rtol=rtol, pcoeff=0.2, icoeff=0.65,
                                      dcoeff=0.0, term=term)
        return to.AutoDiffAdjoint(to.Dopri5(term=term), controller)

    per_sample = solver(to.ODETerm(lambda s, y: field(s, y)))
    joint = solver(to.ODETerm(
        lambda s, y: field(s.expand(batch), y.reshape(batch, dim)).reshape(1, -1)))
    problem = to.InitialValueProblem(y0=y0, t_eval=t.expand(batch, -1))
    joint_problem = to.InitialValueProblem(y0=y0.reshape(1, -1), t_eval=t[None])
    return {"torchode per-sample": lambda: per_sample.solve(problem),
            "torchode joint": lambda: joint.solve(joint_problem)}


def scaled_errors(ys: torch.Tensor, reference: torch.Tensor, rtol: float, atol: float):
    """Per sample (ys: (n_times, batch, dim)): max over the output times of
    RMS((y − y_ref) / (atol + rtol |y_ref|))."""
    scale = atol + rtol * reference.abs()
    return ((ys - reference) / scale).pow(2).mean(-1).sqrt().amax(0)


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
    batch, dim, rtol, atol = args.batch, args.dim, args.rtol, args.atol
    field = Field(dim)
    k = torch.logspace(0, 2, batch, dtype=DT)
    y0 = torch.randn(batch, dim, dtype=DT)
    t = torch.linspace(0.0, 2.0, 21, dtype=DT)
    options = dict(method="dopri5", rtol=rtol, atol=atol)
    other = dict(options, method=register_torchode_estimator())
    field.k = k[:, None]

    def alone(**tolerances):
        out = []
        for b in range(batch):
            field.k = float(k[b])
            out.append(odegrad.solve(field, y0[b], t, **{**options, **tolerances}))
        field.k = k[:, None]
        return out

    solves = {
        "odegrad per_sample=True": lambda: odegrad.solve(field, y0, t, per_sample=True,
                                                         **options),
        "odegrad shared steps": lambda: odegrad.solve(field, y0, t, **options),
        "each sample alone (odegrad, a loop)": alone,
        "odegrad per_sample=True (torchode's b̂)": lambda: odegrad.solve(
            field, y0, t, per_sample=True, **other),
        "odegrad shared steps (torchode's b̂)": lambda: odegrad.solve(field, y0, t, **other),
        **torchode_solves(field, y0, t, rtol, atol),
    }
    results, walls = timed_in_turn(solves, args.repeats)
    with torch.no_grad():
        reference = torch.stack([s.ys for s in alone(rtol=1e-13, atol=1e-15)], dim=1)
    lone = results["each sample alone (odegrad, a loop)"]
    lone_nfe = torch.tensor([s.stats["nfe_forward"] for s in lone])
    lone_ys = torch.stack([s.ys for s in lone], dim=1)
    per, shared = results["odegrad per_sample=True"], results["odegrad shared steps"]
    used = per.stats["sample_nfe"]

    rows = {  # name: (used, computed, batched calls, ys (n_times, batch, dim))
        "each sample alone (odegrad, a loop)": (int(lone_nfe.sum()), int(lone_nfe.sum()),
                                                int(lone_nfe.sum()), lone_ys),
        "odegrad per_sample=True": (int(used.sum()), per.stats["nfe_forward"] * batch,
                                    per.stats["nfe_forward"], per.ys),
        "odegrad shared steps": (shared.stats["nfe_forward"] * batch,
                                 shared.stats["nfe_forward"] * batch, shared.stats["nfe_forward"],
                                 shared.ys),
    }
    for variant in ("odegrad per_sample=True (torchode's b̂)",
                    "odegrad shared steps (torchode's b̂)"):
        solution = results[variant]
        calls = solution.stats["nfe_forward"]
        used_variant = (int(solution.stats["sample_nfe"].sum()) if "per_sample" in variant
                        else calls * batch)
        rows[variant] = (used_variant, calls * batch, calls, solution.ys)
    tode = results.get("torchode per-sample")
    if tode is not None:
        steps = tode.stats["n_steps"].cpu()
        calls = int(tode.stats["n_f_evals"].max())
        rows["torchode per-sample"] = (int((6 * steps + 2).sum()), calls * batch, calls,
                                       tode.ys.transpose(0, 1))
        joint = results["torchode joint"]
        joint_steps = int(joint.stats["n_steps"][0])
        rows["torchode joint"] = ((6 * joint_steps + 2) * batch, (6 * joint_steps + 2) * batch,
                                  6 * joint_steps + 2, joint.ys[0].reshape(-1, batch, dim))

    print(f"batch {batch}, dim {dim}, k_b log-spaced in [1, 100], dopri5, rtol {rtol}, "
          f"atol {atol}, float64, torch {torch.__version__}, {args.repeats} repeats")
    print("| solve | f evals used (Σ over samples) | f evals computed (rows) | batched f calls "
          "| err median / max | max \\|y − y_alone\\| | wall ms |")
    print("|---|---|---|---|---|---|---|")
    for name, (used_total, computed, calls, ys) in rows.items():
        err = scaled_errors(ys, reference, rtol, atol)
        dev = (ys - lone_ys).abs().max().item()
        print(f"| {name} | {used_total} | {computed} | {calls} | {err.median():.2f} / "
              f"{err.max():.2f} | {dev:.1e} | {1e3 * walls[name]:.0f} |")
    print()
    ratio = (used / lone_nfe).max().item()
    print(f"per-sample used / alone: max over samples {ratio:.3f} (acceptance <= 1.3)")
    print(f"per-sample steps {per.stats['sample_n_steps'].tolist()}")
    print(f"alone steps      {[s.stats['n_steps'] for s in lone]}")
    ours = rows["odegrad shared steps"][0] / rows["odegrad per_sample=True"][0]
    print(f"odegrad: shared / per-sample used evaluations {ours:.2f}x")
    variant = (rows["odegrad shared steps (torchode's b̂)"][0]
               / rows["odegrad per_sample=True (torchode's b̂)"][0])
    print(f"odegrad with torchode's b̂: shared / per-sample used evaluations {variant:.2f}x")
    if tode is not None:
        print(f"torchode steps   {tode.stats['n_steps'].tolist()}")
        theirs = rows["torchode joint"][0] / rows["torchode per-sample"][0]
        print(f"torchode: joint / per-sample used evaluations {theirs:.2f}x")
        cross = rows["odegrad shared steps"][0] / rows["torchode per-sample"][0]
        print(f"(odegrad shared / torchode per-sample used evaluations {cross:.2f}x: "
              "mixes the two error estimators)")


if __name__ == "__main__":
    main()
