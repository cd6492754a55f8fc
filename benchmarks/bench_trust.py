"""What the correctness fixes of the trust issue cost (benchmarks/RESULTS.md §7).

    python benchmarks/bench_trust.py

Measures, on the CPU in float64 with one thread:
1. dopri8's dense output: f-evaluations per accepted step and the error of outputs inside steps
   (harmonic oscillator, rtol = atol = 1e-10), against dopri5.
2. Implicit stages under gradient="direct": forward f-evaluations of kvaerno5 with a graph (the
   second, differentiable Newton level) and without one, on a small stiff MLP field.
3. The probe of f that the custom gradients run once per (f, params): the time of a first
   discrete solve with a new closure against a second one with the same f.
4. Reversible schemes on y' = −ky (k = 1, 10, 50): the result or the error raised, and the
   steps of reversible_dopri5 / reversible_bosh3 against their plain bases on a tanh MLP.
5. Events: the bouncing ball's third impact time and its gradient against the closed form.
"""

from __future__ import annotations

import math
import time

import torch

import odegrad

DT = torch.float64


def dense_output() -> None:
    t = torch.linspace(0, 10, 401, dtype=DT)
    y0 = torch.tensor([1.0, 0.0], dtype=DT)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], -1)
    for method in ("dopri5", "dopri8"):
        sol = odegrad.solve(lambda t, y: torch.stack([y[1], -y[0]]), y0, t, method=method,
                            rtol=1e-10, atol=1e-10)
        error = float((sol.ys - exact).abs().max())
        per_step = sol.stats["nfe_forward"] / max(sol.stats["n_steps"], 1)
        print(f"  {method}: {sol.stats['n_accepted']} steps, {per_step:.1f} f per step "
              f"attempt, max error of 401 outputs {error:.2e}")


def implicit_stages() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32, dtype=DT), torch.nn.Tanh(),
                              torch.nn.Linear(32, 4, dtype=DT))
    stiff = torch.tensor([-1.0, -10.0, -100.0, -1000.0], dtype=DT)
    field = lambda t, y: net(y) + stiff * y  # noqa: E731
    y0 = torch.ones(8, 4, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            sol = odegrad.solve(field, y0, t, method="kvaerno5", rtol=1e-6, atol=1e-8)
        print(f"  kvaerno5 forward {'with' if grad_mode else 'without'} a graph: "
              f"{sol.stats['nfe_forward']} f-evaluations, {sol.stats['n_steps']} steps")


def probe() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(32, 128, dtype=DT), torch.nn.Tanh(),
                              torch.nn.Linear(128, 32, dtype=DT))
    y0 = torch.randn(256, 32, dtype=DT)
    t = torch.tensor([0.0, 1.0], dtype=DT)

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, t, y):
            return self.net(y)

    field = Field()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        odegrad.solve(field, y0, t, method="rk4", step_size=0.05, gradient="discrete")
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with torch.enable_grad():
        field(t[0], y0).sum()
    one_f = time.perf_counter() - start
    print(f"  discrete rk4 forward, 20 steps (each probes f once): first call "
          f"{times[0] * 1e3:.1f} ms, later calls {min(times[1:]) * 1e3:.1f} ms; "
          f"one f with a graph {one_f * 1e3:.2f} ms")


def reversible() -> None:
    y0 = torch.ones(1, dtype=DT)
    t = torch.tensor([0.0, 2.0], dtype=DT)
    for method, options in (("reversible_dopri5", dict(rtol=1e-8, atol=1e-8)),
                            ("reversible_rk4", dict(step_size=0.05)),
                            ("reversible_heun", dict(step_size=0.01, adaptive=False))):
        for k in (1.0, 10.0, 50.0):
            try:
                sol = odegrad.solve(lambda t, y, k=k: -k * y, y0, t, method=method, **options)
                outcome = (f"y(2) = {float(sol.ys[-1]):.3e} (exact {math.exp(-2 * k):.3e}), "
                           f"{sol.stats['n_accepted']} steps")
            except odegrad.OdegradError as error:
                outcome = type(error).__name__
            print(f"  {method} {options} k={k:g}: {outcome}")
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32, dtype=DT), torch.nn.Tanh(),
                              torch.nn.Linear(32, 3, dtype=DT))
    y = torch.randn(16, 3, dtype=DT)
    for base in ("dopri5", "bosh3"):
        counts = []
        for method in (base, f"reversible_{base}"):
            sol = odegrad.solve(lambda t, y: net(y), y, torch.tensor([0.0, 3.0], dtype=DT),
                                method=method, rtol=1e-5, atol=1e-7)
            counts.append(sol.stats["n_accepted"])
        print(f"  tanh MLP, rtol 1e-5: {base} {counts[0]} steps, reversible_{base} {counts[1]}")


def events() -> None:
    g_acc, h0, e = 9.81, 2.0, 0.8
    height = torch.tensor(h0, dtype=DT, requires_grad=True)
    state = torch.stack([height, torch.zeros((), dtype=DT)])
    t0 = torch.zeros((), dtype=DT)
    for _ in range(3):
        sol = odegrad.solve(lambda t, s: torch.stack([s[1], torch.full_like(s[1], -g_acc)]),
                            state, torch.stack([t0, t0 + 10]), rtol=1e-10, atol=1e-10,
                            event_fn=lambda t, s: s[0], event_direction=-1)
        t0 = sol.event_t
        state = torch.stack([sol.event_y[0], -e * sol.event_y[1]])
    (d_h0,) = torch.autograd.grad(t0, height)
    exact = math.sqrt(2 * h0 / g_acc) + 2 * math.sqrt(2 * g_acc * h0) / g_acc * (e + e * e)
    d_exact = (math.sqrt(2 / g_acc) / (2 * math.sqrt(h0))
               + math.sqrt(2 * g_acc) / (g_acc * math.sqrt(h0)) * (e + e * e))
    print(f"  third impact {float(t0.detach()):.15f} (exact {exact:.15f}); "
          f"dt/dh0 {float(d_h0):.15f} (exact {d_exact:.15f})")


def main() -> None:
    torch.set_num_threads(1)
    for title, run in (("1. dopri8 dense output", dense_output),
                       ("2. implicit stages under direct", implicit_stages),
                       ("3. the probe of f", probe),
                       ("4. reversible schemes on dissipative problems", reversible),
                       ("5. events", events)):
        print(title)
        run()


if __name__ == "__main__":
    main()
