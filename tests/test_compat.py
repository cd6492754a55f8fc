"""odegrad.compat.torchdiffeq: torchdiffeq 0.2.5's signatures, options, defaults and methods.

The central check (`test_every_torchdiffeq_name_is_honoured_or_raises`) lists every keyword and
every options= / adjoint_options= key torchdiffeq 0.2.5 accepts and runs, for each, a case that
either shows its effect (against real torchdiffeq when it is installed) or expects an error that
names it: no option may be dropped without a word.
"""

import math
import warnings

import pytest
import torch

import odegrad
import odegrad.compat.torchdiffeq as compat
from odegrad.errors import InvalidInputError, MaxStepsExceededError, UnknownNameError

DT = torch.float64

# torchdiffeq 0.2.5 (commit a88aac5, the "upd version" commit of 21 Nov 2024, identical to the
# PyPI wheel): the keywords of odeint (torchdiffeq/_impl/odeint.py) and odeint_adjoint
# (torchdiffeq/_impl/adjoint.py) ...
TORCHDIFFEQ_KEYWORDS = [
    "rtol", "atol", "method", "options", "event_fn",
    "adjoint_rtol", "adjoint_atol", "adjoint_method", "adjoint_options", "adjoint_params",
]
# ... every options= key one of its solvers takes: FixedGridODESolver.__init__ (solvers.py),
# AdamsBashforthMoulton.__init__ (fixed_adams.py), RKAdaptiveStepsizeODESolver.__init__
# (rk_common.py), ScipyWrapperODESolver.__init__ (scipy_wrapper.py, which also pops grid_points
# and eps); norm is set by misc._check_inputs. adjoint_options takes the same keys.
TORCHDIFFEQ_OPTIONS = [
    "step_size", "grid_constructor", "interp", "perturb",
    "implicit", "max_iters", "max_order",
    "min_step", "max_step", "first_step", "step_t", "jump_t", "safety", "ifactor", "dfactor",
    "max_num_steps", "dtype", "norm",
    "solver", "grid_points", "eps",
]
# ... its methods (odeint.py SOLVERS) and the step callbacks it looks up on func (misc.py).
TORCHDIFFEQ_METHODS = [
    "dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2",
    "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver",
]
TORCHDIFFEQ_CALLBACKS = [
    "callback_step", "callback_accept_step", "callback_reject_step",
    "callback_step_adjoint", "callback_accept_step_adjoint", "callback_reject_step_adjoint",
]


def torchdiffeq_or_skip():
    return pytest.importorskip("torchdiffeq")


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2).double()

    def forward(self, t, y):
        return torch.tanh(self.linear(y)) * torch.cos(t)


class Counted:
    """f(t, y) = -y + sin(t), recording the times it is called at."""

    def __init__(self, jump=None):
        self.times = []
        self.jump = jump

    def __call__(self, t, y):
        self.times.append(float(t.detach()))
        if self.jump is not None:
            return -0.5 * y if t < self.jump else y**2
        return -y + torch.sin(t)


Y0 = torch.tensor([1.0, 2.0], dtype=DT)
T2 = torch.tensor([0.0, 1.0], dtype=DT)
T7 = torch.linspace(0.0, 1.0, 7, dtype=DT)  # output times between the points of a 0.1 grid


def both(call, **kwargs):
    """call(library, **kwargs) for the shim and for real torchdiffeq."""
    torchdiffeq = torchdiffeq_or_skip()
    return call(compat, **kwargs), call(torchdiffeq, **kwargs)


def close(a, b, tol):
    return float((a - b).abs().max()) <= tol


def adjoint_gradient(library, field, y0=Y0, t=T2, **kwargs):
    field.zero_grad()
    y = y0.clone().requires_grad_()
    ys = library.odeint_adjoint(field, y, t, **kwargs)
    (ys * torch.linspace(1, 2, ys.numel(), dtype=DT).view_as(ys)).sum().backward()
    grads = [y.grad] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for p in field.parameters()]
    return torch.cat([g.reshape(-1) for g in grads])


def shared_field():
    field = Field()
    return field


# ---- one case per name ------------------------------------------------------------------------
# Each case is a function that checks the name's effect or that it raises; CASES maps every
# torchdiffeq name to its cases, and the meta-test below checks none is missing.


def case_rtol_atol():
    f = Counted()
    loose, loose_ref = both(lambda lib: lib.odeint(f, Y0, T7, rtol=1e-3, atol=1e-3))
    tight = compat.odeint(f, Y0, T7)
    assert not close(loose, tight, 1e-7)  # the tolerances take effect ...
    assert close(loose, loose_ref, 1e-2)  # ... with torchdiffeq's meaning
    rtol = torch.tensor([1e-3, 1e-9], dtype=DT)  # per-component tolerances
    ours, theirs = both(lambda lib: lib.odeint(f, Y0, T7, rtol=rtol, atol=1e-9))
    assert close(ours, theirs, 1e-2)
    # one tolerance per tensor of a tuple state
    pair = (Y0[:1].clone(), Y0[1:].clone())
    g = lambda t, y: (-y[0], -y[1])  # noqa: E731
    ours, theirs = both(lambda lib: lib.odeint(g, pair, T7, rtol=(1e-3, 1e-9), atol=(1e-3, 1e-9)))
    assert close(ours[1], theirs[1], 1e-6) and close(ours[0], theirs[0], 1e-2)


def case_method():
    # the Adams methods: tests/test_adams.py
    with pytest.raises(UnknownNameError, match="'tsit5'"):
        compat.odeint(Counted(), Y0, T2, method="tsit5")  # not a torchdiffeq 0.2.5 method
    for method in ("euler", "midpoint", "heun2", "rk4", "heun3"):  # the same schemes: the same
        # numbers (rk4 is Kutta's 3/8 rule, odegrad's "rk4_38")
        ours, theirs = both(lambda lib, m=method: lib.odeint(Counted(), Y0, T7, method=m))
        assert close(ours, theirs, 1e-13), method
    for method in ("dopri5", "dopri8", "bosh3", "adaptive_heun"):  # odegrad's controller
        ours, theirs = both(lambda lib, m=method: lib.odeint(Counted(), Y0, T7, method=m,
                                                             rtol=1e-5, atol=1e-5))
        assert close(ours, theirs, 5e-3), method  # torchdiffeq's bosh3 is 1.5e-3 off
    assert not close(compat.odeint(Counted(), Y0, T7, method="euler"),
                     compat.odeint(Counted(), Y0, T7, method="midpoint"), 1e-3)


def case_options():
    with pytest.raises(InvalidInputError, match="'grid_pointz'"):
        compat.odeint(Counted(), Y0, T2, options=dict(grid_pointz=3))
    with pytest.raises(InvalidInputError, match="'rtol'"):
        compat.odeint(Counted(), Y0, T2, options=dict(rtol=1e-3))


def case_event_fn():
    # -y + sin(t) from y0 = (1, 2): y.sum() falls through 2 near t = 0.36 (more in
    # tests/test_compat_events.py)
    def event(t, y):
        return y.sum() - 2.0

    (ours_t, ours), (ref_t, ref) = both(lambda lib: lib.odeint(Counted(), Y0, T2, event_fn=event))
    assert abs(float(ours_t - ref_t)) < 1e-7 and close(ours, ref, 1e-7)
    (ours_t, ours), (ref_t, ref) = both(lambda lib: lib.odeint_event(
        Counted(), Y0, T2[0], event_fn=event))
    assert abs(float(ours_t - ref_t)) < 1e-7 and close(ours, ref, 1e-7)
    # odeint_adjoint's event time hangs on the graph (torchdiffeq: an output of its autograd
    # Function) but carries no gradient ("does NOT backpropagate through the event time")
    for library in (compat, torchdiffeq_or_skip()):
        field = Field()
        event_t, _ = library.odeint_adjoint(field, Y0, T2, event_fn=lambda t, y: t - 0.5 + 0 * y[0])
        assert event_t.requires_grad
        assert abs(float(event_t.detach()) - 0.5) < 1e-9
        event_t.backward()
        assert all(p.grad is None or not p.grad.any() for p in field.parameters())
    with pytest.raises(ValueError, match="len\\(t\\) == 2"):
        compat.odeint(Counted(), Y0, T7, event_fn=event)
    dense = compat.odeint_dense(Counted(), Y0, T2[0], T2[1])  # tests/test_compat_dense.py
    assert dense(T2[1]).shape == Y0.shape


def case_adjoint_tolerances():
    field = shared_field()
    loose, loose_ref = both(lambda lib: adjoint_gradient(lib, field, adjoint_rtol=1e-3,
                                                         adjoint_atol=1e-3))
    tight, tight_ref = both(lambda lib: adjoint_gradient(lib, field))
    assert close(tight, tight_ref, 1e-6)
    assert not close(loose, tight, 1e-9)
    assert close(loose, loose_ref, 1e-3)


def case_adjoint_method():
    field = shared_field()
    with pytest.raises(ValueError, match="adjoint_options"):  # torchdiffeq's rule
        compat.odeint_adjoint(field, Y0, T2, adjoint_method="euler", options=dict(norm=None))
    kwargs = dict(adjoint_method="euler", adjoint_options=dict(step_size=0.1))
    ours, theirs = both(lambda lib: adjoint_gradient(lib, field, t=T7, **kwargs))
    # the same Euler steps backwards from every output time (from dopri5 outputs that agree to
    # the tolerance)
    assert close(ours, theirs, 1e-5)
    assert not close(ours, adjoint_gradient(compat, field, t=T7), 1e-4)


def case_adjoint_options():
    field = shared_field()
    # the default is torchdiffeq's full norm, norm="seminorm" the seminorm: fewer evaluations
    counts = {}
    for key, options in (("full", None), ("seminorm", dict(norm="seminorm"))):
        problem = Counted()

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.field = field

            def forward(self, t, y, problem=problem):
                problem.times.append(float(t))
                return self.field(t, y)

        module = Module()
        y = Y0.clone().requires_grad_()
        ys = compat.odeint_adjoint(module, y, T2, rtol=1e-8, atol=1e-8, adjoint_options=options)
        before = len(problem.times)
        ys.sum().backward()
        counts[key] = len(problem.times) - before
    assert counts["seminorm"] < counts["full"]
    with pytest.raises(InvalidInputError, match=r"adjoint_options\['norm'\] is a callable"):
        compat.odeint_adjoint(field, Y0, T2, adjoint_options=dict(norm=lambda x: x[1].abs().max()))


def case_adjoint_params():
    with pytest.raises(ValueError, match="adjoint_params"):
        compat.odeint_adjoint(lambda t, y: -y, Y0, T2)  # not an nn.Module, no adjoint_params
    field = shared_field()
    y = Y0.clone().requires_grad_()
    compat.odeint_adjoint(field, y, T2, adjoint_params=()).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in field.parameters())
    ours, theirs = both(lambda lib: adjoint_gradient(lib, field,
                                                     adjoint_params=[field.linear.weight]))
    assert close(ours, theirs, 1e-6)


def case_step_size():
    with pytest.warns(UserWarning, match="Unexpected arguments"):  # as torchdiffeq's dopri5
        compat.odeint(Counted(), Y0, T2, options=dict(step_size=0.1))
    ours, theirs = both(lambda lib: lib.odeint(Counted(), Y0, T7, method="euler",
                                               options=dict(step_size=0.1)))
    assert close(ours, theirs, 1e-13)  # the same grid, linear interpolation between its points
    assert not close(ours, compat.odeint(Counted(), Y0, T7, method="euler"), 1e-3)
    field = shared_field()
    ours, theirs = both(lambda lib: adjoint_gradient(lib, field, t=T2, method="midpoint",
                                                     options=dict(step_size=0.25)))
    assert close(ours, theirs, 1e-10)


def case_grid_constructor():
    def grid(func, y0, t):
        return torch.tensor([0.0, 0.05, 0.3, 0.6, 1.0], dtype=t.dtype)

    with pytest.raises(ValueError, match="mutually exclusive"):
        compat.odeint(Counted(), Y0, T2, method="euler",
                      options=dict(grid_constructor=grid, step_size=0.1))

    def other(func, y0, t):  # a backward grid that is not the forward grid reversed
        return torch.linspace(float(t[0]), float(t[-1]), 3, dtype=t.dtype)

    with pytest.raises(InvalidInputError, match="grid_constructor"):
        compat.odeint_adjoint(shared_field(), Y0, T2, method="euler",
                              options=dict(grid_constructor=grid),
                              adjoint_options=dict(grid_constructor=other))
    ours = compat.odeint(Counted(), Y0, T7, method="midpoint",
                         options=dict(grid_constructor=grid))
    assert not close(ours, compat.odeint(Counted(), Y0, T7, method="midpoint"), 1e-4)
    theirs = torchdiffeq_or_skip().odeint(Counted(), Y0, T7, method="midpoint",
                                          options=dict(grid_constructor=grid))
    assert close(ours, theirs, 1e-13)


def case_interp():
    with pytest.raises(ValueError, match="interpolation method"):
        compat.odeint(Counted(), Y0, T2, method="euler", options=dict(interp="quadratic"))
    kwargs = dict(method="euler", options=dict(step_size=0.1, interp="cubic"))
    ours, theirs = both(lambda lib: lib.odeint(Counted(), Y0, T7, **kwargs))
    assert close(ours, theirs, 1e-13)
    linear = compat.odeint(Counted(), Y0, T7, method="euler", options=dict(step_size=0.1))
    assert not close(ours, linear, 1e-6)


def case_perturb():
    for perturb in (False, True):
        f, g = Counted(jump=0.5), Counted(jump=0.5)
        kwargs = dict(method="heun2", options=dict(step_size=0.25, perturb=perturb))
        torchdiffeq = torchdiffeq_or_skip()
        ours = compat.odeint(f, Y0, T2, **kwargs)
        theirs = torchdiffeq.odeint(g, Y0, T2, **kwargs)
        assert close(ours, theirs, 1e-13)
        assert (0.5 in f.times) != perturb and (0.0 in f.times) != perturb


def case_adams_options():
    # torchdiffeq's Euler ignores Adams' options with a warning; so does the shim.
    for key, value in (("implicit", False), ("max_iters", 3), ("max_order", 2)):
        with pytest.warns(UserWarning, match=f"Euler: Unexpected arguments .*{key}"):
            ys = compat.odeint(Counted(), Y0, T2, method="euler", options={key: value})
        assert close(ys, compat.odeint(Counted(), Y0, T2, method="euler"), 0.0)


def case_controller_options():
    """Served by odegrad's own min_step, max_step, safety, ifactor, dfactor (torchdiffeq's
    meaning): the results agree with torchdiffeq's to the tolerance and the f evaluations move
    the way torchdiffeq's do; the backward solve of odeint_adjoint refuses them."""
    values = (("min_step", 0.3), ("max_step", 0.02), ("safety", 0.5), ("ifactor", 1.5),
              ("dfactor", 0.6))
    t = torch.tensor([0.0, 3.0], dtype=DT)
    tdq = torchdiffeq_or_skip()
    for key, value in values:
        with pytest.raises(InvalidInputError, match=f"'{key}'"):
            compat.odeint_adjoint(shared_field(), Y0, T2, adjoint_options={key: value})
        # a tiny first step lets ifactor act, a huge one (rejected) dfactor
        first = {"first_step": 3.0 if key == "dfactor" else 1e-3}
        counts = []
        for library in (compat, tdq):
            f, g = Counted(), Counted()
            library.odeint(f, Y0, t, rtol=1e-8, atol=1e-8, options=first)
            ys = library.odeint(g, Y0, t, rtol=1e-8, atol=1e-8, options={key: value, **first})
            counts.append((len(g.times), len(f.times)))
            if library is compat:
                ours = ys
        assert close(ours, ys, 1e-4 if key == "min_step" else 1e-6), key
        (ours_n, ours_base), (theirs_n, theirs_base) = counts
        assert (ours_n > ours_base) == (theirs_n > theirs_base), (key, counts)
        assert ours_n != ours_base, (key, counts)
    with pytest.raises(InvalidInputError, match="min_step"):
        compat.odeint(Counted(), Y0, t, options=dict(min_step=2.0, max_step=1.0))


def case_first_step():
    with pytest.warns(UserWarning, match="Euler: Unexpected arguments"):
        compat.odeint(Counted(), Y0, T2, method="euler", options=dict(first_step=0.1))
    f, g = Counted(), Counted()
    ours = compat.odeint(f, Y0, T2, options=dict(first_step=1e-6))
    compat.odeint(g, Y0, T2)
    assert len(f.times) > len(g.times)  # it starts that small
    assert abs(f.times[1] - 1e-6 / 5) < 1e-12  # dopri5's second stage, at c = 1/5
    theirs = torchdiffeq_or_skip().odeint(Counted(), Y0, T2, options=dict(first_step=1e-6))
    assert close(ours, theirs, 1e-6)


def case_step_t():
    f = Counted()
    ours = compat.odeint(f, Y0, T2, options=dict(step_t=torch.tensor([0.3], dtype=DT)))
    assert any(abs(s - 0.3) < 1e-15 for s in f.times)  # a step starts there
    theirs = torchdiffeq_or_skip().odeint(Counted(), Y0, T2, options=dict(step_t=[0.3]))
    assert close(ours, theirs, 1e-6)


def case_jump_t():
    with pytest.raises(ValueError, match="repeated"):
        compat.odeint(Counted(), Y0, T2, options=dict(jump_t=[0.5], step_t=[0.5]))
    simple, better = Counted(jump=0.5), Counted(jump=0.5)
    compat.odeint(simple, Y0, T2, rtol=1e-6, atol=1e-6)
    ours = compat.odeint(better, Y0, T2, rtol=1e-6, atol=1e-6, options=dict(jump_t=[0.5]))
    assert len(better.times) < len(simple.times)  # torchdiffeq's own test of jump_t
    assert 0.5 not in better.times  # f is evaluated one ulp either side of the jump
    assert any(0 < abs(s - 0.5) < 1e-15 for s in better.times)
    theirs = torchdiffeq_or_skip().odeint(Counted(jump=0.5), Y0, T2, rtol=1e-6, atol=1e-6,
                                          options=dict(jump_t=[0.5]))
    assert close(ours, theirs, 1e-5)


def case_max_num_steps():
    t = torch.tensor([0.0, 1.0, 2.0], dtype=DT)
    with pytest.raises(compat.MaxNumStepsExceededError, match="max_num_steps"):
        compat.odeint(Counted(), Y0, t, options=dict(max_num_steps=3))
    # counted per output interval, as torchdiffeq does
    steps = [odegrad.solve(Counted(), Y0, t[i:i + 2], rtol=1e-7, atol=1e-9).stats["n_steps"]
             for i in range(2)]
    assert max(steps) < sum(steps)
    ours = compat.odeint(Counted(), Y0, t, options=dict(max_num_steps=max(steps)))
    with pytest.raises(MaxStepsExceededError):
        compat.odeint(Counted(), Y0, t, options=dict(max_num_steps=max(steps) - 1))
    # the default is torchdiffeq's 2**31 - 1, not odegrad's 10 000
    ys = compat.odeint(Counted(), Y0, torch.tensor([0.0, 1.001], dtype=DT), method="euler",
                       options=dict(step_size=1e-4))  # 10 010 steps
    assert ys.shape == (2, 2)
    torchdiffeq = torchdiffeq_or_skip()
    with pytest.raises(AssertionError, match="max_num_steps"):  # torchdiffeq raises too
        torchdiffeq.odeint(Counted(), Y0, t, options=dict(max_num_steps=3))
    assert close(ours, torchdiffeq.odeint(Counted(), Y0, t), 1e-6)


def case_dtype():
    with pytest.raises(InvalidInputError, match="'dtype'"):
        compat.odeint(Counted(), Y0.float(), T2.float(), options=dict(dtype=torch.float32))
    ours, theirs = both(lambda lib: lib.odeint(Counted(), Y0, T2, options=dict(dtype=DT)))
    assert close(ours, theirs, 1e-6)


def case_norm():
    f, g = Counted(), Counted()
    compat.odeint(f, Y0, T2, options=dict(norm=lambda x: x.abs().max()))
    compat.odeint(g, Y0, T2, options=dict(norm=lambda x: 10 * x.abs().max()))
    assert len(f.times) < len(g.times)
    seen = []

    def norm(state):
        seen.append(tuple(s.shape for s in state))
        return state[0].abs().max()

    pair = (torch.tensor(1.0, dtype=DT), torch.ones(2, 2, dtype=DT))
    compat.odeint(lambda t, y: (-y[0], -y[1]), pair, T2, options=dict(norm=norm))
    assert seen and set(seen) == {((), (2, 2))}  # the tuple, not a flat tensor
    with pytest.raises(InvalidInputError, match="'norm'"):
        compat.odeint(Counted(), Y0, T2, options=dict(norm="seminorm"))


def case_scipy_options():
    for key, value in (("solver", "RK45"), ("grid_points", 3), ("eps", 1e-3)):
        with pytest.warns(UserWarning, match=f"Dopri5Solver: Unexpected arguments .*{key}"):
            compat.odeint(Counted(), Y0, T2, options={key: value})


def case_callbacks():
    # honoured (call sequences against torchdiffeq's in tests/test_compat_events.py)
    for name in TORCHDIFFEQ_CALLBACKS[:3]:
        f = Counted()
        calls = f.calls = []
        setattr(f, name, lambda t0, y0, dt, f=f: f.calls.append(float(dt)))
        compat.odeint(f, Y0, T2)
        assert (calls or name == "callback_reject_step") and all(dt > 0 for dt in calls)
    for name in TORCHDIFFEQ_CALLBACKS[3:]:  # they run in odeint_adjoint's backward solve
        field = Field()
        calls = []
        setattr(field, name, lambda t0, y0, dt, calls=calls: calls.append(float(dt)))
        compat.odeint(field, Y0, T2)  # odeint never calls the adjoint callbacks
        y = Y0.clone().requires_grad_()
        ys = compat.odeint_adjoint(field, y, T2, rtol=1e-9, atol=1e-9,
                                   adjoint_options=dict(first_step=5.0))  # rejects the first
        assert not calls
        ys.sum().backward()
        assert calls and all(dt > 0 for dt in calls)
    f = Counted()
    f.callback_accept_step = lambda t0, y0, dt: None
    with pytest.warns(UserWarning, match="does not support callbacks"):  # torchdiffeq's warning
        compat.odeint(f, Y0, T2, method="euler")
    field = Field()
    field.callback_accept_step_adjoint = lambda t0, y0, dt: None
    with pytest.warns(UserWarning, match="Solver 'euler' does not support callbacks"):
        compat.odeint_adjoint(field, Y0, T2, method="euler")


CASES = {
    "rtol": [case_rtol_atol], "atol": [case_rtol_atol], "method": [case_method],
    "options": [case_options], "event_fn": [case_event_fn],
    "adjoint_rtol": [case_adjoint_tolerances], "adjoint_atol": [case_adjoint_tolerances],
    "adjoint_method": [case_adjoint_method], "adjoint_options": [case_adjoint_options],
    "adjoint_params": [case_adjoint_params],
    "step_size": [case_step_size, case_adjoint_method], "grid_constructor": [case_grid_constructor],
    "interp": [case_interp], "perturb": [case_perturb],
    "implicit": [case_adams_options], "max_iters": [case_adams_options],
    "max_order": [case_adams_options],
    "min_step": [case_controller_options], "max_step": [case_controller_options],
    "safety": [case_controller_options], "ifactor": [case_controller_options],
    "dfactor": [case_controller_options], "first_step": [case_first_step],
    "step_t": [case_step_t], "jump_t": [case_jump_t], "max_num_steps": [case_max_num_steps],
    "dtype": [case_dtype], "norm": [case_norm, case_adjoint_options],
    "solver": [case_scipy_options], "grid_points": [case_scipy_options],
    "eps": [case_scipy_options],
    **{name: [case_method] for name in TORCHDIFFEQ_METHODS},
    **{name: [case_callbacks] for name in TORCHDIFFEQ_CALLBACKS},
}


def test_every_torchdiffeq_name_has_a_case():
    names = TORCHDIFFEQ_KEYWORDS + TORCHDIFFEQ_OPTIONS + TORCHDIFFEQ_METHODS + TORCHDIFFEQ_CALLBACKS
    assert sorted(set(CASES)) == sorted(set(names))
    assert set(compat.OPTION_NAMES) == set(TORCHDIFFEQ_OPTIONS)
    assert set(compat.ADJOINT_KEYWORDS) == set(TORCHDIFFEQ_KEYWORDS)


@pytest.mark.parametrize("case", sorted({c for cs in CASES.values() for c in cs},
                                        key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_torchdiffeq_name_is_honoured_or_raises(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unexpected warning is a failure, not noise
        case()


# ---- state and time handling ------------------------------------------------------------------


def test_tuple_state_of_0dim_tensors():
    state = (torch.tensor(1.0, dtype=DT), torch.tensor(2.0, dtype=DT))
    f = lambda t, y: (-y[0], -2 * y[1])  # noqa: E731
    ours, theirs = both(lambda lib: lib.odeint(f, state, T7))
    assert ours[0].shape == (7,) and ours[1].shape == (7,)
    assert close(ours[0], theirs[0], 1e-6) and close(ours[1], theirs[1], 1e-6)
    field = lambda t, y: (-y[0], -2 * y[1])  # noqa: E731
    y = tuple(s.clone().requires_grad_() for s in state)
    out = compat.odeint_adjoint(field, y, T2, adjoint_params=())
    (out[0][-1] + out[1][-1]).backward()
    assert abs(float(y[0].grad) - math.exp(-1)) < 1e-6
    assert abs(float(y[1].grad) - math.exp(-2)) < 1e-6


def test_t_dtype_and_type_like_torchdiffeq():
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        compat.odeint(Counted(), Y0, [0.0, 1.0])
    with pytest.raises(TypeError, match="floating point"):
        compat.odeint(Counted(), Y0, torch.tensor([0, 1]))
    with pytest.raises(InvalidInputError, match="tuple"):
        compat.odeint(Counted(), [Y0], T2)
    y0 = Y0.float()
    t = T7.clone().requires_grad_()
    compat.odeint(Counted(), y0, t).sum().backward()
    assert t.grad.dtype == DT
    ours, theirs = both(lambda lib: lib.odeint(Counted(), y0, T7, method="euler",
                                               options=dict(step_size=0.1)))
    assert ours.dtype == theirs.dtype == torch.float32
    assert close(ours, theirs, 1e-6)


def test_decreasing_time_fixed_grid_matches_torchdiffeq():
    t = T7.flip(0)
    for options in (dict(step_size=0.1), dict(step_size=0.1, interp="cubic")):
        ours, theirs = both(lambda lib, o=options: lib.odeint(Counted(), Y0, t, method="euler",
                                                               options=o))
        assert close(ours, theirs, 1e-13)


def test_odeint_adjoint_gives_gradients():
    field = Field()
    y0 = torch.randn(3, 2, dtype=DT, requires_grad=True)
    t = torch.linspace(0.0, 1.0, 4, dtype=DT)
    compat.odeint_adjoint(field, y0, t, rtol=1e-9, atol=1e-9)[-1].sum().backward()
    reference_field = Field()
    reference_field.load_state_dict(field.state_dict())
    y0_ref = y0.detach().clone().requires_grad_()
    compat.odeint(reference_field, y0_ref, t, rtol=1e-9, atol=1e-9)[-1].sum().backward()
    assert torch.allclose(y0.grad, y0_ref.grad, rtol=1e-5, atol=1e-7)
    for p, q in zip(field.parameters(), reference_field.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_fixed_grid_adjoint_matches_torchdiffeq():
    field = Field()
    for method, options, t in (("euler", dict(step_size=0.1), T2),
                               ("euler", dict(step_size=0.25),
                                torch.tensor([1.0, 0.5, 0.0], dtype=DT)),
                               ("heun2", None, T7),
                               ("midpoint", dict(grid_constructor=lambda f, y, t: t), T7)):
        ours, theirs = both(lambda lib, m=method, o=options, t=t: adjoint_gradient(
            lib, field, t=t, method=m, options=o, adjoint_options=o))
        assert close(ours, theirs, 1e-10), (method, options)
    # With perturb, the shim solves step by step, so its backward pass restarts from the stored
    # forward state at every grid point where torchdiffeq's re-solves it: the gradients agree
    # to the order of the scheme.
    options = dict(step_size=0.1, perturb=True)
    ours, theirs = both(lambda lib: adjoint_gradient(lib, field, t=T2, method="euler",
                                                     options=options))
    assert close(ours, theirs, 0.1) and not close(ours, theirs, 1e-10)
    # With outputs between grid points, the shim's backward pass runs over the forward grid
    # through the linear interpolation where torchdiffeq's restarts a grid at each output time.
    options = dict(step_size=0.1)
    ours, theirs = both(lambda lib: adjoint_gradient(lib, field, t=T7, method="euler",
                                                     options=options))
    assert close(ours, theirs, 0.1) and not close(ours, theirs, 1e-10)


def _adjoint_callback_calls(library, method, t, t_grad, **kwargs):
    """The calls of the three callback_*_adjoint methods in odeint_adjoint's backward pass."""
    torch.manual_seed(0)
    field = Field()
    calls = {name: [] for name in TORCHDIFFEQ_CALLBACKS[3:]}
    for name, seen in calls.items():
        setattr(field, name, lambda t0, y0, dt, seen=seen: seen.append(
            (float(t0), [v.detach().clone() for v in y0], float(dt))))
    y = Y0.clone().requires_grad_()
    ys = library.odeint_adjoint(field, y, t.clone().requires_grad_(t_grad), method=method,
                                **kwargs)
    (ys * torch.linspace(1, 2, ys.numel(), dtype=DT).view_as(ys)).sum().backward()
    return calls


@pytest.mark.parametrize("t_grad", [False, True])
@pytest.mark.parametrize("decreasing", [False, True])
def test_adjoint_callbacks_match_torchdiffeq_on_a_fixed_grid(t_grad, decreasing):
    """torchdiffeq calls callback_step_adjoint(t0, y0, dt) once per backward grid step with its
    augmented state (vjp_t, y, adj_y, *adj_params) and dt > 0; t0 is the user's time for
    increasing t and its negative for decreasing t. The same grid: the same calls, y, adj_y
    and the parameter adjoints to round-off (1e-9); vjp_t, which the shim takes from its closed form
    where torchdiffeq integrates it, to the scheme's accuracy (exact at the first call)."""
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    t = t.flip(0) - 0.3 if decreasing else t
    ours, theirs = both(lambda lib: _adjoint_callback_calls(
        lib, "rk4", t, t_grad, options=dict(step_size=0.05)))
    ours, theirs = ours["callback_step_adjoint"], theirs["callback_step_adjoint"]
    assert len(ours) == len(theirs) == 20
    for (t_a, z_a, dt_a), (t_b, z_b, dt_b) in zip(ours, theirs):
        assert t_a == pytest.approx(t_b, abs=1e-12) and dt_a == pytest.approx(dt_b, abs=1e-12)
        assert dt_a > 0
        assert [v.shape for v in z_a] == [v.shape for v in z_b]
        for u, v in zip(z_a[1:], z_b[1:]):  # grids differ by round-off for decreasing t
            assert close(u, v, 1e-9)
        assert close(z_a[0], z_b[0], 1e-7)
    assert close(ours[0][1][0], theirs[0][1][0], 1e-14)
    assert ours[0][0] == pytest.approx(-float(t[-1]) if decreasing else float(t[-1]))


def test_adjoint_callbacks_adaptive_protocol():
    """dopri5: callback_step_adjoint before each backward attempt, then accept or reject with
    the attempt's (t0, y0, dt); at the start of each output interval, the state equals
    torchdiffeq's to the tolerance (the step sequences differ with the controllers)."""
    t = torch.tensor([0.0, 0.4, 1.0], dtype=DT)
    ours, theirs = both(lambda lib: _adjoint_callback_calls(
        lib, "dopri5", t, False, rtol=1e-10, atol=1e-10,
        adjoint_options=dict(first_step=0.6)))
    for calls in (ours, theirs):
        steps, accepted, rejected = calls.values()
        assert len(steps) == len(accepted) + len(rejected) and rejected
        for t0, _, dt in accepted + rejected:
            assert any(t0 == s[0] and dt == s[2] for s in steps)

    def at(calls, value):
        return next(z for t0, z, _ in calls["callback_step_adjoint"] if t0 == value)

    for value in (1.0, 0.4):
        for u, v in zip(at(ours, value), at(theirs, value)):
            assert close(u, v, 1e-6)


def test_adjoint_callbacks_with_scipy_forward():
    """A scipy_solver forward with the shim's dopri5 backward: torchdiffeq's own adjoint, whose
    augmented state the callbacks get as it is."""
    pytest.importorskip("scipy")
    calls = _adjoint_callback_calls(compat, "scipy_solver", T2, False, adjoint_method="dopri5",
                                    options=dict(solver="RK45"), adjoint_options={})
    steps, accepted, rejected = calls.values()
    assert steps and len(steps) == len(accepted) + len(rejected)
    assert [v.shape for v in steps[0][1]] == [(), (2,), (2,), (2, 2), (2,)]


def test_the_schemes_odegrad_gained_are_torchdiffeqs():
    # torchdiffeq's rk4 (Kutta's 3/8 rule), heun3 and fehlberg2 map to odegrad tableaus with
    # their coefficients.
    import numpy as np

    from odegrad import tableaus
    from odegrad.compat.torchdiffeq.methods import METHODS, TORCHDIFFEQ_TABLEAUS

    for name, (c, a_rows, b, error) in TORCHDIFFEQ_TABLEAUS.items():
        ours = METHODS[name][2]
        tableau = tableaus.TABLEAUS.get(ours) or getattr(tableaus, ours.upper())
        a = np.zeros((len(c), len(c)))
        for i, row in enumerate(a_rows, start=1):
            a[i, :len(row)] = row
        np.testing.assert_allclose(tableau.c, c, atol=1e-15)
        np.testing.assert_allclose(tableau.a, a, atol=1e-15)
        np.testing.assert_allclose(tableau.b, b, atol=1e-15)
        if error is None:
            assert not tableau.adaptive
        else:
            np.testing.assert_allclose(np.abs(tableau.error), error, atol=1e-15)
    torchdiffeq_or_skip()
    ours, theirs = both(lambda lib: lib.odeint(Counted(), Y0, T7, method="rk4",
                                               options=dict(step_size=0.1)))
    assert close(ours, theirs, 1e-13)
    classical = odegrad.odeint(Counted(), Y0, T7, method="rk4", step_size=0.1, adaptive=False)
    assert not close(ours, classical, 1e-13)
