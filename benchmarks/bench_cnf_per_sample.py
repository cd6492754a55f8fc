"""CNF on the `odegrad train cnf` dataset (moons): per-sample steps vs shared steps, per iteration.

The flow is first trained `--warmup` iterations with shared steps (so its field is not the
near-identity of initialisation), then each of `--iters` batches is pushed through one
training iteration (−mean log p, forward and backward, no optimiser step) in both modes at the
same parameters: CNF(per_sample=False) and CNF(per_sample=True), the task's settings (dopri5,
rtol = atol = 1e-5, float32, batch 256, gradient="direct").

Reported per iteration: wall time; f calls on the batch (nfe_forward: each call evaluates every
sample); f evaluations per sample (shared: every sample gets all nfe_forward; per-sample: the
mean and max of stats["sample_nfe"], what each sample's own steps need); and each mode's
error of log p against a tight solve (rtol = atol = 1e-10, float64, same parameters): the
largest over the samples, and the share of samples whose error exceeds the tolerance scale
atol + rtol·|log p| (the shared solve controls the batch's RMS error, so a hard sample can
exceed it; the per-sample solve controls each sample's own RMS over (z, log p)).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_cnf_per_sample.py --warmup 100 --iters 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from odegrad.data import sample_toy
from odegrad.models import CNF


def one_iteration(model: CNF, x: torch.Tensor) -> dict:
    model.zero_grad()
    start = time.perf_counter()
    log_p = model.log_prob(x)
    (-log_p.mean()).backward()
    seconds = time.perf_counter() - start
    stats = model.block.stats
    row = {"seconds": seconds, "batch_nfe": stats["nfe_forward"], "log_p": log_p.detach()}
    if stats.get("per_sample"):
        nfe = stats["sample_nfe"].double()
        row.update(sample_nfe_mean=float(nfe.mean()), sample_nfe_max=float(nfe.max()))
    else:
        row.update(sample_nfe_mean=float(stats["nfe_forward"]),
                   sample_nfe_max=float(stats["nfe_forward"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=100, help="shared-step training iterations")
    parser.add_argument("--iters", type=int, default=5, help="measured batches")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_train = sample_toy("moons", 8192, torch.Generator().manual_seed(1234))
    solver = dict(method="dopri5", rtol=1e-5, atol=1e-5)
    shared = CNF(2, **solver)
    optimiser = torch.optim.Adam(shared.parameters(), lr=1e-2)
    batches = torch.randperm(len(x_train)).split(args.batch_size)
    for i in range(args.warmup):
        optimiser.zero_grad()
        (-shared.log_prob(x_train[batches[i % len(batches)]]).mean()).backward()
        optimiser.step()
    per_sample = CNF(2, per_sample=True, **solver)
    per_sample.load_state_dict(shared.state_dict())

    tight = CNF(2, method="dopri5", rtol=1e-10, atol=1e-10).double()
    tight.load_state_dict(shared.state_dict())

    rows = {"shared": [], "per_sample": []}
    for i in range(args.iters):
        x = x_train[batches[(args.warmup + i) % len(batches)]]
        with torch.no_grad():
            reference = tight.log_prob(x.double())
        scale = solver["atol"] + solver["rtol"] * reference.abs()
        for name, model in (("shared", shared), ("per_sample", per_sample)):
            row = one_iteration(model, x)
            error = (row.pop("log_p").double() - reference).abs()
            row.update(max_error=float(error.max()),
                       over_tolerance=float((error > scale).double().mean()))
            rows[name].append(row)
    summary = {"warmup": args.warmup, "iters": args.iters, "batch_size": args.batch_size}
    keys = ("seconds", "batch_nfe", "sample_nfe_mean", "sample_nfe_max", "max_error",
            "over_tolerance")
    for name, runs in rows.items():
        summary[name] = {key: sum(r[key] for r in runs) / len(runs) for key in keys}
    for name in rows:
        s = summary[name]
        print(f"{name:>10}: {1e3 * s['seconds']:7.1f} ms/iteration, f calls on the batch "
              f"{s['batch_nfe']:5.1f}, f evaluations per sample mean {s['sample_nfe_mean']:5.1f} "
              f"max {s['sample_nfe_max']:5.1f}; log p error max {s['max_error']:.1e}, "
              f"{100 * s['over_tolerance']:.1f}% of samples over atol + rtol·|log p|")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)


if __name__ == "__main__":
    main()
