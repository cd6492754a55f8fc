"""PI step-size controller coefficients: f evaluations and achieved error per (β₁, β₂) pair,
against torchdiffeq's I-controller, and the stiff check that made implicit solvers keep 0.7/0.4.

    PYTHONPATH=src python benchmarks/bench_controller.py            # explicit problems, dopri5
    PYTHONPATH=src python benchmarks/bench_controller.py --stiff    # van der Pol μ=1000, kvaerno5

Errors are relative 2-norm errors of y(T) against dopri8 at rtol = atol = 1e-13 (explicit) or
the largest pointwise relative error against scipy's Radau at rtol 1e-10 (stiff). The pair is
set per solver class through `Solver.controller_coefficients`, so each run patches the class.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import odegrad
from odegrad.solvers.explicit import ExplicitRungeKutta
from odegrad.solvers.implicit import DiagonallyImplicitRungeKutta

PAIRS = [(0.7, 0.4), (0.85, 0.2), (1.0, 0.0)]  # former default, Hairer's DOPRI5, I-control
DT = torch.float64


class MLP(torch.nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim)
        ).double()

    def forward(self, t, y):
        return self.net(y)


def lotka_volterra(t, y):
    return torch.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def van_der_pol_5(t, y):
    return torch.stack([y[1], 5.0 * ((1 - y[0] ** 2) * y[1] - y[0])])


def arenstorf(t, y):
    mu, rest = 0.012277471, 1 - 0.012277471
    x, v, vx, vy = y
    d1 = ((x + mu) ** 2 + v**2) ** 1.5
    d2 = ((x - rest) ** 2 + v**2) ** 1.5
    return torch.stack([
        vx, vy, x + 2 * vy - rest * (x + mu) / d1 - mu * (x - rest) / d2,
        v - 2 * vx - rest * v / d1 - mu * v / d2,
    ])


def problems() -> dict:
    torch.manual_seed(0)
    mlp = MLP()
    y0 = torch.randn(64, 16, dtype=DT)
    return {
        "mlp": (mlp, y0, 1.0),
        "mlp - 10y": (lambda t, y: mlp(t, y) - 10.0 * y, y0, 1.0),
        "lotka-volterra": (lotka_volterra, torch.tensor([1.0, 1.0], dtype=DT), 10.0),
        "van der pol mu=5": (van_der_pol_5, torch.tensor([2.0, 0.0], dtype=DT), 20.0),
        "arenstorf": (arenstorf, torch.tensor([0.994, 0.0, 0.0, -2.00158510637908252240537862224],
                                              dtype=DT), 17.0652165601579625588917206249),
    }


def torchdiffeq_row(f, y0, t, tol):
    try:
        import torchdiffeq
    except ImportError:
        return None
    calls = [0]

    def counted(s, y):
        calls[0] += 1
        return f(s, y)

    with torch.no_grad():
        ys = torchdiffeq.odeint(counted, y0, t, method="dopri5", rtol=tol, atol=tol)
    return calls[0], ys[-1]


def explicit() -> None:
    print("| problem | tol | " + " | ".join(f"NFE / error {b1}/{b2}" for b1, b2 in PAIRS)
          + " | torchdiffeq NFE / error |")
    print("|---|---|" + "---|" * (len(PAIRS) + 1))
    for name, (f, y0, t_end) in problems().items():
        t = torch.tensor([0.0, t_end], dtype=DT)
        with torch.no_grad():
            reference = odegrad.solve(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-13).ys[-1]
        for tol in (1e-4, 1e-7):
            cells = []
            for pair in PAIRS:
                ExplicitRungeKutta.controller_coefficients = pair
                with torch.no_grad():
                    sol = odegrad.solve(f, y0, t, method="dopri5", rtol=tol, atol=tol)
                error = float((sol.ys[-1] - reference).norm() / reference.norm())
                cells.append(f"{sol.stats['nfe_forward']} / {error:.1e}")
            peer = torchdiffeq_row(f, y0, t, tol)
            if peer is not None:
                error = float((peer[1] - reference).norm() / reference.norm())
                cells.append(f"{peer[0]} / {error:.1e}")
            else:
                cells.append("not installed")
            print(f"| {name} | {tol:g} | " + " | ".join(cells) + " |")


def stiff() -> None:
    from scipy.integrate import solve_ivp

    times = np.linspace(0.0, 3000.0, 7)
    reference = solve_ivp(
        lambda s, y: [y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, 3000.0), [2.0, 0.0],
        method="Radau", rtol=1e-10, atol=1e-12, t_eval=times,
    ).y.T

    def field(t, y):
        return torch.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    print("| kvaerno5 pair | accepted | rejected | max relative error vs Radau |")
    print("|---|---|---|---|")
    for pair in PAIRS[:2]:
        DiagonallyImplicitRungeKutta.controller_coefficients = pair
        with torch.no_grad():
            sol = odegrad.solve(field, torch.tensor([2.0, 0.0], dtype=DT),
                                torch.tensor(times, dtype=DT), method="kvaerno5", rtol=1e-6,
                                atol=1e-10)
        error = np.abs(sol.ys.numpy()[1:] - reference[1:]) / np.abs(reference[1:])
        print(f"| {pair[0]}/{pair[1]} | {sol.stats['n_accepted']} | {sol.stats['n_rejected']} "
              f"| {error.max():.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stiff", action="store_true", help="van der Pol μ=1000 with kvaerno5")
    args = parser.parse_args()
    torch.set_num_threads(1)
    stiff() if args.stiff else explicit()


if __name__ == "__main__":
    main()
