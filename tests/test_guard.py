"""The guard: every (method, gradient, checkpoints) the API accepts, read from the registries, so
a new method or gradient joins by construction.

On a small float64 field that depends on t, with outputs inside steps and, for adaptive methods,
a first step large enough to be rejected, each combination must either raise a clear
UnsupportedCombinationError or give:
- exact methods (discrete, every checkpoint policy; reversible): direct's gradient through the
  same scheme (the one the solve reports in stats["method"]) to 1e-10, and direct's
  Hessian-vector product to 1e-9;
- continuous adjoints (backsolve, interpolated): a gradient that converges to the exact one as
  the tolerance (or the step) shrinks, and an HVP that converges with it;
and every method's direct gradient agrees with central finite differences. Every option name
has exactly one consumer for every (method, gradient) pair.

The same enumeration, in sections below, for SDEs (method, gradient, noise type), CDEs (path
kind, method, gradient), per_sample=True (each sample against its lone solve) and compile=True
(each combination against itself eager); the heavy parts are marked slow.
"""

import inspect

import pytest
import torch

import odegrad
from odegrad.api import LOOP_OPTIONS, method_options
from odegrad.gradients import gradient_options, load_gradient
from odegrad.solvers import SOLVERS, make_solver

# Euler-order dense output through 16 nodes trips the interpolant's accuracy warning here; the
# convergence check below is what matters.
pytestmark = pytest.mark.filterwarnings("ignore:gradient='interpolated'")

DT = torch.float64
METHODS = sorted(SOLVERS)
GRADIENTS = list(odegrad.GRADIENTS)
CHECKPOINTS = {"discrete": ["all", "solution", 2]}
EXACT = {"direct", "discrete", "reversible"}
CONTINUOUS = {"backsolve", "interpolated"}
T = torch.tensor([0.0, 0.37, 0.81, 1.2], dtype=DT)  # outputs inside steps
FIXED_STEP = 0.1
ADAPTIVE_TOL = {1: 1e-3, 2: 1e-4, 3: 1e-5, 4: 1e-6, 5: 1e-7}  # by order
FIRST_STEP = 0.9  # rejected at ADAPTIVE_TOL by every adaptive method


def combinations():
    for method in METHODS:
        for gradient in GRADIENTS:
            for checkpoints in CHECKPOINTS.get(gradient, [None]):
                yield method, gradient, checkpoints


def test_the_enumeration_reads_the_registries():
    assert set(METHODS) == set(odegrad.METHODS)
    assert {"direct", "discrete", "backsolve", "interpolated", "reversible"} <= set(GRADIENTS)
    assert len(list(combinations())) == len(METHODS) * (len(GRADIENTS) + 2)


class Field(torch.nn.Module):
    """A tanh field with a t-dependent bias: f(t, y) = W2 tanh(W1 y + b t) − 0.3 y."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.nn.Parameter(0.6 * torch.randn(4, 2, generator=g, dtype=DT))
        self.b = torch.nn.Parameter(torch.randn(4, generator=g, dtype=DT))
        self.w2 = torch.nn.Parameter(0.6 * torch.randn(2, 4, generator=g, dtype=DT))

    def forward(self, t, y):
        return torch.tanh(y @ self.w1.T + t * self.b) @ self.w2.T - 0.3 * y


def settings(method: str, refine: int = 1) -> dict:
    """Adaptive methods: a tolerance their order reaches in a few dozen steps, and a rejected
    first step; fixed ones: the step. `refine` tightens both (for the convergence of the
    continuous adjoints)."""
    solver = make_solver(method)
    if solver.adaptive:
        tol = ADAPTIVE_TOL[min(solver.order, 5)] / 10 ** (refine - 1)
        return {"rtol": tol, "atol": tol, "step_size": FIRST_STEP}
    return {"step_size": FIXED_STEP / 2 ** (refine - 1)}


def run(method, gradient, checkpoints=None, refine=1, field=None, y0=None, **extra):
    field = Field() if field is None else field
    y0 = torch.tensor([[0.5, -0.4], [0.1, 0.8]], dtype=DT) if y0 is None else y0
    y0 = y0.clone().requires_grad_()
    options = settings(method, refine) | extra
    if checkpoints is not None:
        options["checkpoints"] = checkpoints
    sol = odegrad.solve(field, y0, T, method=method, gradient=gradient, **options)
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    params = [y0, *field.parameters()]
    grads = torch.autograd.grad(loss, params, create_graph=True)
    direction = [torch.linspace(-1, 1, p.numel(), dtype=DT).reshape(p.shape) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, direction)), params)
    flat = torch.cat([g.detach().reshape(-1) for g in grads])
    return sol, flat, torch.cat([h.reshape(-1) for h in hvp])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def exact_gradient():
    """The gradient of the ODE itself: direct through dopri5 at 1e-12."""
    _, grad, hvp = run("dopri5", "direct", rtol=1e-12, atol=1e-12, step_size=None)
    return grad, hvp


_EXACT = {}


@pytest.mark.parametrize("method, gradient, checkpoints", list(combinations()))
def test_combination(method, gradient, checkpoints):
    try:
        sol, grad, hvp = run(method, gradient, checkpoints)
    except odegrad.UnsupportedCombinationError as error:
        # refused: the message must say what to use instead
        assert gradient in str(error) and ("valid" in str(error) or "use" in str(error))
        assert gradient != "direct"  # direct serves every method
        return
    if make_solver(method).adaptive:
        assert sol.stats["n_rejected"] > 0, "the guard needs a rejected step here"
    if gradient in EXACT:
        scheme = sol.stats.get("method", method)
        _, want, want_hvp = run(scheme, "direct")
        assert rel(grad, want) < 1e-10
        assert rel(hvp, want_hvp) < 1e-9
        return
    assert gradient in CONTINUOUS, f"new gradient {gradient!r}: add it to EXACT or CONTINUOUS"
    if "exact" not in _EXACT:
        _EXACT["exact"] = exact_gradient()
    exact, exact_hvp = _EXACT["exact"]
    error = rel(grad, exact)
    _, fine, fine_hvp = run(method, gradient, checkpoints, refine=2)
    fine_error = rel(fine, exact)
    # converges with the tolerance: the finer solve is closer, or already at round-off
    assert fine_error < 0.75 * error or fine_error < 1e-9, (error, fine_error)
    assert rel(fine_hvp, exact_hvp) < max(20 * fine_error, 1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_direct_gradient_agrees_with_finite_differences(method):
    """Fixed steps (so the steps do not move under the perturbation) and one entry of each
    parameter: central differences at ε = 1e-6 against autograd."""
    field = Field()
    y0 = torch.tensor([[0.5, -0.4]], dtype=DT)
    options = {"step_size": 0.2, "adaptive": False}

    def loss():
        ys = odegrad.odeint(field, y0, T, method=method, **options)
        return ys[1:].pow(2).sum()

    value = loss()
    grads = torch.autograd.grad(value, list(field.parameters()))
    eps = 1e-6
    with torch.no_grad():
        for p, g in zip(field.parameters(), grads):
            entry = (0,) * p.dim()
            p[entry] += eps
            up = loss()
            p[entry] -= 2 * eps
            down = loss()
            p[entry] += eps
            fd = (up - down) / (2 * eps)
            assert abs(float(fd - g[entry])) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_every_option_name_has_one_consumer(method, gradient):
    solver_names = method_options(method)
    module = load_gradient(gradient)
    gradient_names = set(gradient_options(module, solver_names))
    assert not solver_names & gradient_names
    assert not (solver_names | gradient_names) & set(LOOP_OPTIONS)
    # and the API routes a misspelt name to nobody
    with pytest.raises(odegrad.UnknownNameError, match="valid options"):
        odegrad.solve(lambda t, y: -y, torch.ones(1, dtype=DT), T, method=method,
                      gradient=gradient, **settings(method), no_such_option=1)


def test_every_gradient_module_declares_its_options():
    for gradient in GRADIENTS:
        module = load_gradient(gradient)
        declared = set(getattr(module, "OPTIONS", ()))
        accepted = set(inspect.signature(module.solve).parameters) - {"problem", "options"}
        assert accepted <= declared | {"checkpoints"}, gradient


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gradient", ["discrete", "reversible"])
def test_event_gradients_of_exact_methods_equal_direct(method, gradient):
    """Events join every method: the event time's and state's gradients (implicit function
    theorem over the solve to t*) equal direct's through the same scheme."""

    def event_loss(grad_method, scheme):
        field = Field()
        y0 = torch.tensor([[0.5, -0.4], [0.1, 0.8]], dtype=DT, requires_grad=True)
        sol = odegrad.solve(field, y0, torch.tensor([0.0, 3.0], dtype=DT), method=scheme,
                            gradient=grad_method, event_fn=lambda t, y: y[0, 0] - 0.9,
                            **settings(scheme))
        if sol.event_t is None:
            pytest.fail(f"no event with {scheme}")
        loss = 3 * sol.event_t + sol.event_y.pow(2).sum()
        return sol, torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss, [y0, *field.parameters()])])

    try:
        sol, got = event_loss(gradient, method)
    except odegrad.UnsupportedCombinationError:
        return  # refused, as test_combination checks
    _, want = event_loss("direct", sol.stats.get("method", method))
    assert rel(got, want) < 1e-10


# ---- SDEs: every (SDE method, gradient, noise type), read from the registries ---------------

SDE_GRADIENTS = ["direct", "discrete", "reversible", "backsolve", "interpolated"]
SDE_NOISES = ["diagonal", "scalar", "additive", "general"]
SDE_T = torch.tensor([0.0, 0.23, 0.5], dtype=DT)  # 0.23: an output inside a step


def sde_combinations():
    from odegrad.solvers.sde import SDE_SOLVERS

    for method in sorted(SDE_SOLVERS):
        for gradient in SDE_GRADIENTS:
            for noise_type in SDE_NOISES:
                yield method, gradient, noise_type


class SDEDiffusion(torch.nn.Module):
    """g(t, y) for each noise type, state-dependent except for additive noise."""

    def __init__(self, noise_type: str, d: int = 2, m: int = 2):
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        self.noise_type, self.m = noise_type, m
        out = {"diagonal": d, "scalar": d}.get(noise_type, d * m)
        self.c = torch.nn.Parameter(0.2 + 0.1 * torch.rand(out, generator=gen, dtype=DT))
        if noise_type != "additive":
            self.w = torch.nn.Parameter(0.4 * torch.randn(out, d, generator=gen, dtype=DT))

    def forward(self, t, y):
        if self.noise_type == "additive":
            return (self.c * torch.cos(t)).expand(*y.shape[:-1], -1).reshape(*y.shape, self.m)
        out = self.c * torch.sigmoid(y @ self.w.T)
        if self.noise_type == "scalar":
            return out[..., None]
        return out if self.noise_type == "diagonal" else out.reshape(*y.shape, self.m)


def sde_run(method, gradient, noise_type, dt=0.1, paths=2, t=SDE_T):
    field, g = Field(), SDEDiffusion(noise_type)
    gen = torch.Generator().manual_seed(1)
    y0 = (0.5 * torch.randn(paths, 2, generator=gen, dtype=DT)).requires_grad_()
    size = 2 if noise_type in ("general", "additive") else None
    sol = odegrad.solve_sde(field, g, y0, t, method=method, dt=dt, noise_type=noise_type,
                            gradient=gradient, brownian_size=size, seed=3)
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    params = [y0, *field.parameters(), *g.parameters()]
    return torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("method, gradient, noise_type", list(sde_combinations()))
def test_sde_combination(method, gradient, noise_type):
    """Exact gradients (discrete, reversible) equal direct through the same scheme and path to
    1e-10; the stochastic adjoint (backsolve) approaches direct as dt shrinks; a refusal is an
    UnsupportedCombinationError that says what to use instead."""
    try:
        grad = sde_run(method, gradient, noise_type)
    except odegrad.UnsupportedCombinationError as error:
        assert gradient != "direct" or "noise_type" in str(error)
        assert "valid" in str(error) or "use" in str(error) or "methods for" in str(error)
        return
    if gradient in EXACT:
        assert rel(grad, sde_run(method, "direct", noise_type)) < 1e-10
        return
    assert gradient == "backsolve", f"new SDE gradient {gradient!r}: classify it here"
    # outputs on the grid: linear interpolation inside a step is O(√dt) off the SDE's y(t)
    t = torch.tensor([0.0, 0.2, 0.5], dtype=DT)
    gaps = [rel(sde_run(method, "backsolve", noise_type, dt, 16, t),
                sde_run(method, "direct", noise_type, dt, 16, t)) for dt in (0.1, 0.025)]
    assert gaps[1] < 0.6 * gaps[0], gaps


# ---- CDEs: odegrad.cdeint through every gradient, over path kinds with and without derivative
# jumps at the knots (linear restarts at each knot; Hermite with fixed steps is one solve).

CDE_METHODS = {"rk4": {"step_size": 0.2}, "dopri5": {"rtol": 1e-6, "atol": 1e-8}}
CDE_KINDS = ("linear", "hermite_cubic")


def cde_combinations():
    for kind in CDE_KINDS:
        for method in CDE_METHODS:
            for gradient in GRADIENTS:
                for checkpoints in CHECKPOINTS.get(gradient, [None]):
                    yield kind, method, gradient, checkpoints


def cde_gradient(kind, method, gradient, checkpoints=None, refine=1, settings_of=None):
    t = torch.tensor([0.0, 0.3, 0.8, 1.0, 1.45], dtype=DT)
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(2, 5, 2, generator=gen, dtype=DT).requires_grad_()
    z0 = (0.5 * torch.randn(2, 2, generator=gen, dtype=DT)).requires_grad_()
    field = Field()  # (t, z) -> (..., 2), read as a (hidden 2) x (channels 1) matrix per series
    path = odegrad.paths.KINDS[kind](t, data)

    def f(s, z):
        return torch.stack([field(s, z), 0.5 * z.flip(-1)], dim=-1)

    options = dict(CDE_METHODS[settings_of or method])
    if "step_size" in options:
        options["step_size"] /= 2 ** (refine - 1)
    else:
        options = {k: v / 100 ** (refine - 1) for k, v in options.items()}
    if checkpoints is not None:
        options["checkpoints"] = checkpoints
    sol = odegrad.solve_cde(f, path, z0, T, method=method, gradient=gradient,
                            params=list(field.parameters()), **options)
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    grads = torch.autograd.grad(loss, [z0, data, *field.parameters()])
    return torch.cat([g.reshape(-1) for g in grads]), sol.stats


@pytest.mark.parametrize("kind, method, gradient, checkpoints", list(cde_combinations()))
def test_cde_combination(kind, method, gradient, checkpoints):
    """Exact gradients (w.r.t. z0, the data and f's parameters) equal direct through the same
    scheme to 1e-10; continuous adjoints approach direct as the tolerance or step shrinks."""
    try:
        grad, stats = cde_gradient(kind, method, gradient, checkpoints)
    except odegrad.UnsupportedCombinationError as error:
        assert gradient != "direct" and "use" in str(error)
        return
    if gradient in EXACT:
        reference, _ = cde_gradient(kind, stats["method"], "direct", settings_of=method)
        assert rel(grad, reference) < 1e-10
        return
    assert gradient in CONTINUOUS, f"new gradient {gradient!r}: classify it for CDEs here"
    gaps = [rel(cde_gradient(kind, method, gradient, refine=r)[0],
                cde_gradient(kind, method, "direct", refine=r)[0]) for r in (1, 2)]
    assert gaps[1] < 0.5 * gaps[0], gaps


# ---- per_sample=True: every (method, gradient, checkpoints) from the registries -------------
# A batch of 3 independent problems, each with its own stiffness (k_b 100x apart), its own output
# times (t of shape (batch, n_times), differentiated too) and a rejected first step; each
# combination must raise a clear UnsupportedCombinationError or match the lone solves of its
# samples: exact gradients equal direct of each lone solve through the same scheme to 1e-10,
# continuous adjoints converge to the ODE's gradient as the tolerance shrinks. A method or
# gradient that per_sample=True starts to serve is checked by construction. dopri5 runs in the
# fast suite; every other method is slow (make test-slow), refusals included.

PS_K = torch.tensor([0.01, 0.1, 1.0], dtype=DT)  # mild enough for the reversible schemes
PS_T = torch.tensor([[0.0, 0.37, 0.81, 1.2], [0.1, 0.3, 0.9, 1.5], [-0.2, 0.25, 0.6, 1.0]],
                    dtype=DT)
PS_Y0 = torch.tensor([[0.5, -0.4], [0.1, 0.8], [-0.7, 0.3]], dtype=DT)


class PerSampleField(Field):
    """Field plus a per-sample decay −k_b y, on the batch: t is (batch,), row b of f depends on
    t[b] and y[b] only."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(PS_K.clone())

    def forward(self, t, y, k=None):
        if k is None:
            t, k = t[:, None], self.k[:, None]
        return torch.tanh(y @ self.w1.T + t * self.b) @ self.w2.T - 0.3 * y - k * y


class LoneSample(torch.nn.Module):
    """Sample b of a PerSampleField alone (t 0-dim, y of one sample), sharing its parameters."""

    def __init__(self, field: PerSampleField, b: int):
        super().__init__()
        self.field, self.index = field, b

    def forward(self, t, y):
        return self.field(t, y, self.field.k[self.index])


def per_sample_combinations():
    from odegrad.per_sample import per_sample_methods

    assert "dopri5" in per_sample_methods() and set(per_sample_methods()) <= set(METHODS)
    for method in METHODS:
        for gradient in GRADIENTS:
            for checkpoints in CHECKPOINTS.get(gradient, [None]):
                marks = [] if method == "dopri5" else [pytest.mark.slow]
                yield pytest.param(method, gradient, checkpoints, marks=marks,
                                   id=f"{method}-{gradient}-{checkpoints}")


def test_per_sample_enumeration_reads_the_registries():
    combos = [p.values for p in per_sample_combinations()]
    assert {m for m, _, _ in combos} == set(odegrad.METHODS)
    assert {g for _, g, _ in combos} == set(odegrad.GRADIENTS)
    assert len(combos) == len(METHODS) * (len(GRADIENTS) + 2)


def _ps_loss(ys):
    return ys[1:].pow(2).sum() + ys[-1, ..., 0].sin().sum()


def per_sample_gradient(method, gradient, checkpoints=None, refine=1, **extra):
    """(solution, ∂L/∂(y0, t, θ) flattened) of the per-sample solve."""
    field = PerSampleField()
    y0, t = PS_Y0.clone().requires_grad_(), PS_T.clone().requires_grad_()
    options = settings(method, refine) | extra
    if checkpoints is not None:
        options["checkpoints"] = checkpoints
    sol = odegrad.solve(field, y0, t, method=method, gradient=gradient, per_sample=True,
                        **options)
    grads = torch.autograd.grad(_ps_loss(sol.ys), [y0, t, *field.parameters()])
    return sol, torch.cat([g.reshape(-1) for g in grads])


def lone_gradient(method, refine=1, **extra):
    """The same loss over each sample's lone direct solve: ∂L/∂(y0, t, θ) flattened."""
    field = PerSampleField()
    y0, t = PS_Y0.clone().requires_grad_(), PS_T.clone().requires_grad_()
    options = settings(method, refine) | extra
    loss = 0.0
    for b in range(len(PS_K)):
        sol = odegrad.solve(LoneSample(field, b), y0[b], t[b], method=method, **options)
        loss = loss + _ps_loss(sol.ys)
    grads = torch.autograd.grad(loss, [y0, t, *field.parameters()])
    return torch.cat([g.reshape(-1) for g in grads])


_PS_EXACT = {}


@pytest.mark.parametrize("method, gradient, checkpoints", list(per_sample_combinations()))
def test_per_sample_combination(method, gradient, checkpoints):
    from odegrad.per_sample import per_sample_methods

    try:
        sol, grad = per_sample_gradient(method, gradient, checkpoints)
    except odegrad.UnsupportedCombinationError as error:
        message = str(error)  # names what it refuses
        assert any(name in message for name in (method, gradient, "per_sample")), message
        assert gradient != "direct" or method not in per_sample_methods()
        return
    if make_solver(method).adaptive:
        assert bool((sol.stats["sample_n_rejected"] > 0).all()), "the guard needs rejections"
    if gradient in EXACT:
        want = lone_gradient(sol.stats.get("method", method))
        assert rel(grad, want) < 1e-10
        return
    assert gradient in CONTINUOUS, f"new gradient {gradient!r}: add it to EXACT or CONTINUOUS"
    if "exact" not in _PS_EXACT:
        _PS_EXACT["exact"] = lone_gradient("dopri5", rtol=1e-12, atol=1e-12, step_size=None)
    exact = _PS_EXACT["exact"]
    error = rel(grad, exact)
    _, fine = per_sample_gradient(method, gradient, checkpoints, refine=2)
    fine_error = rel(fine, exact)
    assert fine_error < 0.75 * error or fine_error < 1e-9, (error, fine_error)


# ---- compile=True on a subset: every (method, gradient) compiled equals the same one eager ---
# Read from the registries, so a combination compile=True serves later is checked by
# construction: either UnsupportedCombinationError or the eager outputs and gradients to 1e-12.
# Traced with a counting backend (torch._dynamo.testing.CompileCounter: the captured graphs run
# eagerly, so the compiled wiring - steps, blocks, replays - is what runs, and a served
# combination must have gone through torch.compile at least once). The whole enumeration takes
# about 5 minutes on two cores (slow); the default suite runs a cheap sample: fixed and adaptive
# Runge-Kutta with direct and discrete, and two refusals. The reversible and backsolve graphs
# trace f's VJP (compiled_graphs.py), 5-60 s a combination here: tests/test_compiled_gradients.py
# has one served case each in the default suite. The inductor check of a few combinations is
# slow too (tens of seconds of compilation each on two cores).

COMPILED_SAMPLE = [("euler", "direct"), ("euler", "discrete"), ("fehlberg2", "direct"),
                   ("fehlberg2", "discrete"), ("euler", "interpolated"),
                   ("implicit_euler", "discrete")]
COMPILED_SUBSET = [("rk4", "direct"), ("rk4", "discrete"), ("dopri5", "direct"),
                   ("dopri5", "discrete"), ("alf", "reversible"),
                   ("reversible_rk4", "reversible"), ("rk4", "backsolve")]
# issue 16's first slice stays served (else refusing everything would pass these tests)
COMPILE_SERVED = {(m, g) for m in ("euler", "rk4") for g in ("direct", "discrete")}


def compile_backends(monkeypatch, backend):
    """Every odegrad module that holds a torch.compile backend (odegrad.compiled's BACKEND and
    any compiled_* module beside it) gets `backend`."""
    import importlib
    import pkgutil
    import sys

    for info in pkgutil.iter_modules(odegrad.__path__, "odegrad."):
        if "compiled" in info.name:
            importlib.import_module(info.name)
    for name, module in list(sys.modules.items()):
        if name.startswith("odegrad.") and hasattr(module, "BACKEND"):
            monkeypatch.setattr(module, "BACKEND", backend)
    torch._dynamo.reset()


def compiled_run(method, gradient, compile_):
    """Outputs and first-order gradients (y0, parameters) of the guard's problem."""
    field = Field()
    y0 = torch.tensor([[0.5, -0.4], [0.1, 0.8]], dtype=DT, requires_grad=True)
    sol = odegrad.solve(field, y0, T, method=method, gradient=gradient, compile=compile_,
                        **settings(method))
    loss = sol.ys[1:].pow(2).sum() + sol.ys[-1, :, 0].sin().sum()
    grads = torch.autograd.grad(loss, [y0, *field.parameters()])
    return sol.ys.detach(), torch.cat([g.reshape(-1) for g in grads])


def assert_compiled_equals_eager(method, gradient) -> bool:
    """True when compile=True serves (method, gradient) and equals eager; False when refused."""
    try:
        ys, grad = compiled_run(method, gradient, True)
    except odegrad.UnsupportedCombinationError as error:
        assert "compile" in str(error) or gradient in str(error), str(error)
        return False
    want_ys, want = compiled_run(method, gradient, False)  # served compiled: eager serves it too
    assert rel(ys, want_ys) < 1e-12
    assert rel(grad, want) < 1e-12
    return True


def check_traced(monkeypatch, method, gradient):
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compile_backends(monkeypatch, counter)
    served = assert_compiled_equals_eager(method, gradient)
    if served:
        assert counter.frame_count >= 1, "compile=True served this without torch.compile"
    assert served or (method, gradient) not in COMPILE_SERVED


@pytest.mark.parametrize("method, gradient", COMPILED_SAMPLE)
def test_compiled_combination_sample(monkeypatch, method, gradient):
    check_traced(monkeypatch, method, gradient)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_compiled_combination(monkeypatch, method, gradient):
    check_traced(monkeypatch, method, gradient)


@pytest.mark.slow
@pytest.mark.parametrize("method, gradient", COMPILED_SUBSET)
def test_compiled_combination_inductor(method, gradient):
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    served = assert_compiled_equals_eager(method, gradient)
    if served:
        assert counters["stats"]["unique_graphs"] > graphs
    assert served or (method, gradient) not in COMPILE_SERVED
