"""Solve a damped oscillator with a small neural vector field and print the statistics."""

from __future__ import annotations

import argparse
import time

import torch

from .api import solve
from .gradients import available_gradients


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="dopri5")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--atol", type=float, default=1e-8)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
    y0 = torch.randn(16, 2)
    t = torch.linspace(0.0, 1.0, 5)
    for gradient in available_gradients():
        try:
            start = time.perf_counter()
            sol = solve(lambda t, y: field(y), y0, t, method=args.method, rtol=args.rtol,
                        atol=args.atol, gradient=gradient, params=list(field.parameters()))
            sol.ys[-1].pow(2).sum().backward()
            elapsed = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - a demo reports and goes on
            print(f"{gradient:>12}: {type(error).__name__}: {error}")
            continue
        print(f"{gradient:>12}: {elapsed * 1e3:7.1f} ms  {sol.stats}")
    return 0
