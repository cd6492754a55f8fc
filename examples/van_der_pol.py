"""The van der Pol oscillator with μ = 1000, a stiff relaxation oscillation (Hairer–Wanner IV.1):

    x' = v,   v' = μ (1 − x²) v − x,   x(0) = 2, v(0) = 0,   t ∈ [0, 3000]

Slow drifts along |x| > 1 alternate with jumps lasting O(1/μ); an explicit method's step is
held to O(1/μ) by stability through the slow phases too.

    python examples/van_der_pol.py [--method kvaerno5] [--mu 1000] [--t-end 3000] [--plot out.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import odegrad


def van_der_pol(mu: float):
    def field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y.unbind(-1)
        return torch.stack([v, mu * (1 - x**2) * v - x], -1)

    return field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="kvaerno5")
    parser.add_argument("--mu", type=float, default=1000.0)
    parser.add_argument("--t-end", type=float, default=3000.0)
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-10)
    parser.add_argument("--plot", default=None, help="save x(t) to this file")
    args = parser.parse_args()

    times = np.linspace(0.0, args.t_end, 301)
    t = torch.tensor(times, dtype=torch.float64)
    y0 = torch.tensor([2.0, 0.0], dtype=torch.float64)
    field = van_der_pol(args.mu)
    start = time.perf_counter()
    with torch.no_grad():
        sol = odegrad.solve(field, y0, t, method=args.method, rtol=args.rtol, atol=args.atol,
                            max_steps=100_000)
    elapsed = time.perf_counter() - start
    ys = sol.ys.numpy()
    print(f"{args.method}: {sol.stats['n_accepted']} steps ({sol.stats['n_rejected']} rejected),"
          f" {sol.stats['nfe_forward']} f-evaluations, {elapsed:.2f} s")
    try:
        from scipy.integrate import solve_ivp
    except ImportError:
        solve_ivp = None
    if solve_ivp is not None:
        mu = args.mu
        reference = solve_ivp(
            lambda s, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, times[-1]),
            y0.numpy(), method="Radau", rtol=1e-10, atol=1e-12, t_eval=times,
        )
        difference = np.abs(ys - reference.y.T).max(axis=0)
        print(f"Radau (rtol 1e-10) took {reference.t.size} outputs and {reference.nfev} "
              f"f-evaluations; largest difference in (x, v): {difference}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot(times, ys[:, 0])
        ax.set_xlabel("t")
        ax.set_ylabel("x")
        ax.set_title(f"van der Pol, mu = {args.mu:g}, {args.method}")
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
