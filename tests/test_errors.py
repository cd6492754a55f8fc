"""Every bad input raises a clear exception that names what was wrong and where."""

import math

import pytest
import torch

import odegrad
from odegrad.errors import (
    InvalidInputError,
    MaxStepsExceededError,
    NonFiniteError,
    StepSizeUnderflowError,
    UnknownNameError,
)

DT = torch.float64


def decay(t, y):
    return -y


def y0():
    return torch.ones(3, dtype=DT)


def times(*values):
    return torch.tensor(values, dtype=DT)


@pytest.mark.parametrize(
    "t, words",
    [
        (times(0.0, 0.5, 0.5, 1.0), ["duplicate", "t[1]", "t[2]"]),
        (times(0.0, 0.7, 0.5, 1.0), ["non-monotonic", "t[1]"]),
        (times(1.0, 0.5, 0.7), ["non-monotonic"]),
    ],
)
def test_t_not_strictly_monotonic(t, words):
    with pytest.raises(InvalidInputError) as info:
        odegrad.odeint(decay, y0(), t)
    for word in words:
        assert word in str(info.value)


def test_t_empty():
    with pytest.raises(InvalidInputError, match="t is empty"):
        odegrad.odeint(decay, y0(), torch.tensor([], dtype=DT))


def test_t_not_one_dimensional():
    with pytest.raises(InvalidInputError, match="1-D"):
        odegrad.odeint(decay, y0(), torch.zeros(2, 2, dtype=DT))


def test_t_not_a_tensor():
    with pytest.raises(InvalidInputError, match="torch.Tensor"):
        odegrad.odeint(decay, y0(), [0.0, 1.0])


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_y0(bad):
    y = y0()
    y[1] = bad
    with pytest.raises(NonFiniteError, match="y0 holds non-finite"):
        odegrad.odeint(decay, y, times(0.0, 1.0))


def test_integer_y0():
    with pytest.raises(InvalidInputError, match="floating point"):
        odegrad.odeint(decay, torch.ones(3, dtype=torch.int64), times(0.0, 1.0))


@pytest.mark.parametrize("method, kwargs", [("dopri5", {}), ("rk4", {"step_size": 0.01})])
def test_non_finite_f_output_names_time(method, kwargs):
    def blows_up(t, y):
        return torch.where(t > 0.5, torch.full_like(y, math.nan), -y)

    with pytest.raises(NonFiniteError, match=r"non-finite value .*t=0\.[45]"):
        odegrad.odeint(blows_up, y0(), times(0.0, 1.0), method=method, **kwargs)


def test_finite_time_blow_up_ends_with_an_error():
    # y' = y^2 blows up at t = 1: adaptive steps shrink until they underflow or run out.
    with pytest.raises((StepSizeUnderflowError, MaxStepsExceededError, NonFiniteError)) as info:
        odegrad.odeint(lambda t, y: y * y, torch.ones(1, dtype=DT), times(0.0, 2.0))
    assert "t=" in str(info.value)


def test_step_size_underflow_names_t_and_h():
    # A discontinuous field whose error never falls below tolerance at t = 0.5.
    def jump(t, y):
        return torch.where(t < 0.5, torch.ones_like(y), 1e12 * torch.ones_like(y))

    with pytest.raises(StepSizeUnderflowError) as info:
        odegrad.odeint(jump, y0(), times(0.0, 1.0), rtol=1e-10, atol=1e-10, max_steps=100_000)
    assert "t=0.5" in str(info.value) and "h=" in str(info.value)


def test_max_steps_exceeded_names_time_reached():
    with pytest.raises(MaxStepsExceededError, match=r"max_steps=20 exceeded at t="):
        odegrad.odeint(decay, y0(), times(0.0, 100.0), rtol=1e-12, atol=1e-12, max_steps=20)


def test_fixed_step_max_steps():
    with pytest.raises(MaxStepsExceededError, match="max_steps=5"):
        odegrad.odeint(decay, y0(), times(0.0, 1.0), method="rk4", step_size=0.1, max_steps=5)


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        odegrad.odeint(decay, y0(), times(0.0, 1.0), method="rk5")
    assert "rk5" in str(info.value) and "dopri5" in str(info.value)


def test_unknown_gradient_lists_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        odegrad.odeint(decay, y0(), times(0.0, 1.0), gradient="magic")
    assert "magic" in str(info.value) and "direct" in str(info.value)


def test_unknown_option():
    with pytest.raises(UnknownNameError, match="unknown option 'colour'"):
        odegrad.odeint(decay, y0(), times(0.0, 1.0), colour="red")


def test_adaptive_requested_for_fixed_method():
    with pytest.raises(InvalidInputError, match="no error estimate"):
        odegrad.odeint(decay, y0(), times(0.0, 1.0), method="rk4", adaptive=True)


def test_dtype_mismatch_between_y0_and_t():
    with pytest.raises(InvalidInputError, match="t has dtype torch.float32 but y0 has dtype"):
        odegrad.odeint(decay, y0(), torch.tensor([0.0, 1.0]))


def test_dtype_mismatch_of_f_output():
    with pytest.raises(InvalidInputError, match="returned dtype torch.float32"):
        odegrad.odeint(lambda t, y: (-y).float(), y0(), times(0.0, 1.0))


def test_wrong_shape_of_f_output():
    with pytest.raises(InvalidInputError, match=r"returned shape \(2,\).*shape \(3,\)"):
        odegrad.odeint(lambda t, y: -y[:2], y0(), times(0.0, 1.0))


def test_f_returning_non_tensor():
    with pytest.raises(InvalidInputError, match="not a tensor"):
        odegrad.odeint(lambda t, y: 1.0, y0(), times(0.0, 1.0))


def test_tuple_state_with_mixed_dtypes():
    with pytest.raises(InvalidInputError, match="one dtype and device"):
        odegrad.odeint(lambda t, y: y, (y0(), torch.ones(2)), times(0.0, 1.0))


def test_tuple_field_returning_wrong_arity():
    with pytest.raises(InvalidInputError, match="tuple of 2 tensors"):
        odegrad.odeint(lambda t, y: y[0], (y0(), y0()), times(0.0, 1.0))


def test_negative_tolerance():
    with pytest.raises(InvalidInputError, match="rtol must be non-negative"):
        odegrad.odeint(decay, y0(), times(0.0, 1.0), rtol=-1.0)


def test_bad_step_size():
    with pytest.raises(InvalidInputError, match="step_size must be a positive"):
        odegrad.odeint(decay, y0(), times(0.0, 1.0), method="rk4", step_size=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch():
    with pytest.raises(InvalidInputError, match="t is on"):
        odegrad.odeint(decay, y0().cuda(), times(0.0, 1.0))


def test_device_mismatch_of_f_output_is_checked(monkeypatch):
    # On a CPU-only machine, fake a device mismatch through the checker directly.
    from odegrad.problem import CountedField

    field = CountedField(decay, y0(), {})
    field._device = torch.device("meta")
    with pytest.raises(InvalidInputError, match="returned a tensor on cpu"):
        field(times(0.0)[0], y0())
