"""Robertson's chemical kinetics, the classic stiff test problem (Hairer–Wanner II, IV.1):

    y1' = −0.04 y1 + 1e4 y2 y3,   y2' = 0.04 y1 − 1e4 y2 y3 − 3e7 y2²,   y3' = 3e7 y2²

from y = (1, 0, 0) to t = 1e5. Rates differ by nine orders of magnitude: an explicit method is
held to steps of ~1e-3 by stability long after y2 has settled, while an L-stable implicit method
takes steps of the size of t.

    python examples/robertson.py [--method kvaerno5] [--rtol 1e-6] [--atol 1e-10] [--plot out.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import odegrad

RATES = (0.04, 3e7, 1e4)


def robertson(t: torch.Tensor, y: torch.Tensor, k=RATES) -> torch.Tensor:
    """The Robertson right-hand side; y has shape (..., 3)."""
    y1, y2, y3 = y.unbind(-1)
    fast = k[2] * y2 * y3
    dimer = k[1] * y2**2
    return torch.stack([-k[0] * y1 + fast, k[0] * y1 - fast - dimer, dimer], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="kvaerno5")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-10)
    parser.add_argument("--t-end", type=float, default=1e5)
    parser.add_argument("--plot", default=None, help="save a log-time plot to this file")
    args = parser.parse_args()

    times = np.concatenate([[0.0], np.logspace(-6, np.log10(args.t_end), 40)])
    t = torch.tensor(times, dtype=torch.float64)
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    start = time.perf_counter()
    with torch.no_grad():
        sol = odegrad.solve(robertson, y0, t, method=args.method, rtol=args.rtol,
                            atol=args.atol, max_steps=100_000)
    elapsed = time.perf_counter() - start
    ys = sol.ys.numpy()
    print(f"{args.method}: {sol.stats['n_accepted']} steps ({sol.stats['n_rejected']} rejected),"
          f" {sol.stats['nfe_forward']} f-evaluations, {elapsed:.2f} s")
    print(f"y(t={times[-1]:.0e}) = {ys[-1]}  (conservation: sum - 1 = {ys[-1].sum() - 1:.1e})")
    try:
        from scipy.integrate import solve_ivp
    except ImportError:
        solve_ivp = None
    if solve_ivp is not None:
        reference = solve_ivp(
            lambda s, y: robertson(torch.tensor(s), torch.tensor(y)).numpy(), (0.0, times[-1]),
            y0.numpy(), method="Radau", rtol=1e-10, atol=1e-14, t_eval=times,
        ).y.T
        resolved = np.abs(reference) > 1e4 * args.atol  # values well above the atol floor
        relative = np.abs(ys - reference)[resolved] / np.abs(reference)[resolved]
        final = np.abs(ys[-1] - reference[-1]) / np.abs(reference[-1])
        print(f"relative difference from scipy Radau (rtol 1e-10) at t={times[-1]:.0e}: {final}")
        # Outputs inside a step come from the cubic Hermite interpolant, less accurate than the
        # step itself while the steps are long compared with the initial transient.
        print(f"largest relative difference over all outputs with |y| > 1e4 atol: "
              f"{relative.max():.2e}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, scale) in enumerate([("y1", 1), ("y2 × 1e4", 1e4), ("y3", 1)]):
            ax.semilogx(times[1:], ys[1:, i] * scale, label=label)
        ax.set_xlabel("t")
        ax.legend()
        ax.set_title(f"Robertson, {args.method}, {sol.stats['n_accepted']} steps")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
