"""Plot `odegrad train latent` with and without --per-sample (RESULTS.md §10).

    python benchmarks/plot_latent_per_sample.py runs/latent_ps_padded runs/latent_ps_per_sample \
        --cost runs/latent_ps_cost.json --out benchmarks/models/latent_per_sample.png

Left: test extrapolation MSE per epoch; right: ms per training iteration and forward f
evaluations per iteration (each batched f call counts once), from each run's summary.json;
with --cost, also the CPU ms per iteration that bench_latent_per_sample.py measured with the two
decoders in turn (robust to a shared machine's changing load, unlike the runs' wall times).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("padded", type=Path)
    parser.add_argument("per_sample", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/models/latent_per_sample.png"))
    parser.add_argument("--cost", type=Path, default=None,
                        help="bench_latent_per_sample.py --json output")
    parser.add_argument("--title", default="latent ODE on irregular spirals: decoder at the "
                                           "union of times vs each series' own times")
    args = parser.parse_args()
    runs = {"padded (union of times)": args.padded, "per_sample=True (own times)": args.per_sample}
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, ms, nfe = [], [], []
    for (label, path), colour in zip(runs.items(), ("C0", "C3")):
        summary = json.loads((path / "summary.json").read_text())
        epochs = [r["epoch"] for r in summary["history"]]
        left.plot(epochs, [r["extrapolation_mse"] for r in summary["history"]], colour,
                  label=label)
        labels.append(label.split(" ")[0])
        ms.append(1e3 * summary["time_per_iteration_s"])
        nfe.append(summary["nfe_forward_per_iteration"])
    left.set_xlabel("epoch")
    left.set_ylabel("test extrapolation MSE")
    left.set_yscale("log")
    left.legend()
    positions = range(len(labels))
    width = 0.4 if args.cost is None else 0.27
    right.bar([p - width for p in positions] if args.cost else [p - 0.2 for p in positions], ms,
              width, color="C0", label="wall ms / iteration (run)")
    if args.cost is not None:
        cost = json.loads(args.cost.read_text())["cpu_ms"]
        right.bar(list(positions), [cost["padded"], cost["per_sample"]], width, color="C2",
                  label="CPU ms / iteration (in turn)")
    twin = right.twinx()
    twin.bar([p + (width if args.cost else 0.2) for p in positions], nfe, width, color="C1",
             label="f calls / iteration")
    right.set_xticks(list(positions), labels)
    right.set_ylabel("ms per training iteration")
    twin.set_ylabel("forward f calls per iteration")
    top = max(ms) if args.cost is None else max(*ms, cost["padded"], cost["per_sample"])
    right.set_ylim(0, 1.45 * top)  # room for the legends above the bars
    twin.set_ylim(0, 1.45 * max(nfe))
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    figure.suptitle(args.title)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
