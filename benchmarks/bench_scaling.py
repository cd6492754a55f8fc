"""Scaling of every gradient method with the number of steps, the batch size and the state size.

Each point runs one `odegrad compare` row in its own process (`odegrad.compare.measure_isolated`):
time per forward+backward (median of --repeats) and peak memory (CUDA max_memory_allocated, or
the CPU resident-set high-water mark; see `odegrad.compare`), with stats["checkpoint_bytes"].
The peers given by --peers run in the same sweep. The problem is the MLP field of
`odegrad compare` (rk4, fixed steps over [0, 1]); gradient errors are not computed here.

    flock /tmp/odegrad-bench.lock python benchmarks/bench_scaling.py --sweep steps
    ... --sweep batch | state | all    [--peers torchdiffeq,torchdiffeq_adjoint] [--json F]
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from odegrad.compare import Config, describe, measure_isolated, plan_rows, resolve

SWEEPS = {  # the varied Config field and its values; the others stay at BASE
    "steps": ("steps", [10, 30, 100, 300, 1000]),
    "batch": ("batch", [16, 64, 256, 1024]),
    "state": ("dim", [8, 32, 128, 512]),
}
BASE = {"problem": "mlp", "method": "rk4", "steps": 40, "batch": 64, "dim": 32, "hidden": 128}


def sweep(name: str, args) -> list[dict]:
    key, values = SWEEPS[name]
    points = []
    for value in values:
        config = resolve(Config(
            **dict(BASE, **{key: value}), dtype=args.dtype, device=args.device,
            repeats=args.repeats, gradients=args.gradients, peers=args.peers,
            threads=args.threads,
        ))
        print(f"## {name} = {value}: {describe(config)}", flush=True)
        for row in plan_rows(config):
            result = measure_isolated(config, row, None)
            result.update(sweep=name, value=value)
            points.append(result)
            print(format_point(result), flush=True)
    return points


def format_point(r: dict) -> str:
    if r.get("error"):
        return f"{r['label']:<28} error: {r['error'].splitlines()[0][:100]}"
    ckpt = r.get("checkpoint_bytes")
    return (f"{r['label']:<28} {r['total_ms']:10.1f} ms {r['peak_bytes'] / 2**20:10.1f} MB peak "
            f"{'-' if ckpt is None else f'{ckpt / 2**20:.1f}':>9} MB ckpt "
            f"NFE {r['nfe_forward']}/{r['nfe_backward']}")


def markdown(points: list[dict], name: str) -> str:
    """One table per sweep: rows are methods, columns the values, cells 'ms / MB'."""
    values = sorted({p["value"] for p in points if p["sweep"] == name})
    labels = list(dict.fromkeys(p["label"] for p in points if p["sweep"] == name))
    cell = {(p["label"], p["value"]): p for p in points if p["sweep"] == name}
    head = f"| {SWEEPS[name][0]} = | " + " | ".join(str(v) for v in values) + " |"
    lines = [head, "|---" * (len(values) + 1) + "|"]
    for label in labels:
        cells = []
        for v in values:
            p = cell.get((label, v))
            if p is None or p.get("error"):
                cells.append("error" if p else "")
            else:
                cells.append(f"{p['total_ms']:.0f} ms / {p['peak_bytes'] / 2**20:.1f} MB")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gradients", default=None, help="comma-separated (default: all)")
    parser.add_argument("--peers", default=None, help="comma-separated peers (default: none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.gradients = args.gradients.split(",") if args.gradients else None
    args.peers = args.peers.split(",") if args.peers else None
    names = list(SWEEPS) if args.sweep == "all" else [args.sweep]
    print(f"# torch {torch.__version__}, {datetime.date.today()}, base {BASE}, {args.dtype}")
    points = []
    for name in names:
        points += sweep(name, args)
    print()
    for name in names:
        print(f"### {name}\n\n{markdown(points, name)}\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(points, fh, indent=2)


if __name__ == "__main__":
    main()
