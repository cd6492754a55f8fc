"""Plot `odegrad train latent` with and without --per-sample (RESULTS.md §10).

    python benchmarks/plot_latent_per_sample.py runs/latent_ps_padded runs/latent_ps_per_sample \
        --out benchmarks/models/latent_per_sample.png

Left: test extrapolation MSE per epoch; right: ms per training iteration and forward f
evaluations per iteration (each batched f call counts once), from each run's summary.json.
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
    right.bar([p - 0.2 for p in positions], ms, 0.4, color="C0", label="ms / iteration")
    twin = right.twinx()
    twin.bar([p + 0.2 for p in positions], nfe, 0.4, color="C1", label="f calls / iteration")
    right.set_xticks(list(positions), labels)
    right.set_ylabel("ms per training iteration")
    twin.set_ylabel("forward f calls per iteration")
    right.legend(loc="upper left")
    twin.legend(loc="upper right")
    figure.suptitle("latent ODE on irregular spirals: decoder at the union of times vs each "
                    "series' own times")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
