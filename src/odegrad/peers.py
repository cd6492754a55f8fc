"""Adapters to the peer libraries that `odegrad compare --peers` and the benchmarks measure.

Each peer solves y' = f(t, y) from t0 to t1 and returns y(t1), differentiable by its own
gradient method: torchdiffeq's `odeint` (autograd through the solver) and `odeint_adjoint`
(continuous adjoint, seminorm when adaptive), TorchDiffEqPack's ACA (`odesolve_adjoint`:
checkpoints at the accepted steps, exact for its scheme) and MALI (`odesolve_adjoint_sym12`:
the asynchronous leapfrog, exact up to round-off), and torchode (autograd through its solver).
All are optional (`pip install "odegrad[peers]"`): an absent one raises `PeerUnavailableError`,
a method the peer lacks raises `UnsupportedCombinationError`; the caller reports either.

`f` must be an `nn.Module` whose forward is f(t, y) (TorchDiffEqPack and torchdiffeq's adjoint
take the parameters from it); for torchode, t arrives with one time per batch element.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import OdegradError, UnsupportedCombinationError

__all__ = ["Integration", "Peer", "PEERS", "PeerUnavailableError", "peer_solve"]


class PeerUnavailableError(OdegradError, ImportError):
    """The peer library is not installed."""


@dataclass(frozen=True)
class Integration:
    """How to integrate: fixed steps of `step_size` (when given) or adaptive with rtol, atol."""

    method: str
    step_size: float | None = None
    rtol: float = 1e-6
    atol: float = 1e-6

    @property
    def fixed(self) -> bool:
        return self.step_size is not None


@dataclass(frozen=True)
class Peer:
    """One peer: its label, the package it needs and how its gradient relates to the scheme."""

    name: str
    label: str
    package: str
    gradient: str  # "direct", "adjoint" (continuous), "checkpoint" or "reversible" (exact)
    solve: Callable[[torch.nn.Module, Tensor, float, float, Integration], Tensor]
    scheme: Callable[[Integration], str]  # the name of the scheme it runs for a setting

    @property
    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    @property
    def exact(self) -> bool:
        """Whether the gradient is exact for the peer's own discrete scheme."""
        return self.gradient != "adjoint"


def _unsupported(peer: str, method: str, valid) -> UnsupportedCombinationError:
    return UnsupportedCombinationError(
        f"{peer} has no method {method!r} comparable to odegrad's; it serves: {', '.join(valid)}"
    )


# ---- torchdiffeq ----------------------------------------------------------------------------

_TORCHDIFFEQ_FIXED = {"euler": "euler", "midpoint": "midpoint", "rk4": "rk4", "heun": "heun2"}
_TORCHDIFFEQ_ADAPTIVE = {"heun": "adaptive_heun", "bosh3": "bosh3", "dopri5": "dopri5",
                         "dopri8": "dopri8"}


def _torchdiffeq_method(setting: Integration) -> tuple[str, dict]:
    if setting.fixed:
        table = dict(_TORCHDIFFEQ_FIXED, bosh3="bosh3", dopri5="dopri5", dopri8="dopri8")
        if setting.method not in table:
            raise _unsupported("torchdiffeq", setting.method, table)
        return table[setting.method], {"step_size": setting.step_size}
    if setting.method not in _TORCHDIFFEQ_ADAPTIVE:
        raise _unsupported("torchdiffeq (adaptive)", setting.method, _TORCHDIFFEQ_ADAPTIVE)
    return _TORCHDIFFEQ_ADAPTIVE[setting.method], {}


def _times(y0: Tensor, t0: float, t1: float) -> Tensor:
    return torch.tensor([t0, t1], dtype=y0.dtype, device=y0.device)


def _torchdiffeq_odeint(f, y0: Tensor, t0: float, t1: float, setting: Integration) -> Tensor:
    from torchdiffeq import odeint

    method, options = _torchdiffeq_method(setting)
    ys = odeint(f, y0, _times(y0, t0, t1), rtol=setting.rtol, atol=setting.atol, method=method,
                options=options or None)
    return ys[-1]


def _torchdiffeq_adjoint(f, y0: Tensor, t0: float, t1: float, setting: Integration) -> Tensor:
    from torchdiffeq import odeint_adjoint

    method, options = _torchdiffeq_method(setting)
    # The backward pass uses the forward's fixed steps, or the seminorm when adaptive.
    adjoint_options = dict(options) if setting.fixed else {"norm": "seminorm"}
    ys = odeint_adjoint(f, y0, _times(y0, t0, t1), rtol=setting.rtol, atol=setting.atol,
                        method=method, options=options or None, adjoint_options=adjoint_options,
                        adjoint_params=tuple(f.parameters()))
    return ys[-1]


# ---- TorchDiffEqPack --------------------------------------------------------------------------

_ACA_METHODS = {"euler": "euler", "midpoint": "rk2", "rk4": "rk4", "dopri5": "dopri5"}


def _tdepack_options(y0: Tensor, t0: float, t1: float, setting: Integration, method: str) -> dict:
    return {"method": method, "t0": t0, "t1": t1, "h": setting.step_size, "rtol": setting.rtol,
            "atol": setting.atol, "print_neval": False, "neval_max": 500_000, "t_eval": None}


def _aca(f, y0: Tensor, t0: float, t1: float, setting: Integration) -> Tensor:
    from TorchDiffEqPack import odesolve_adjoint

    if setting.method not in _ACA_METHODS:
        raise _unsupported("TorchDiffEqPack ACA", setting.method, _ACA_METHODS)
    if setting.fixed:
        # Its backward pass unpacks the error estimate of the step, None for fixed-grid solvers.
        raise UnsupportedCombinationError(
            "TorchDiffEqPack ACA (odesolve_adjoint) fails in its backward pass with fixed steps "
            "(TypeError in TorchDiffEqPack 1.0.1); it runs only adaptive (dopri5)"
        )
    options = _tdepack_options(y0, t0, t1, setting, _ACA_METHODS[setting.method])
    return odesolve_adjoint(f, y0, options=options)


def _mali(f, y0: Tensor, t0: float, t1: float, setting: Integration) -> Tensor:
    from TorchDiffEqPack import odesolve_adjoint_sym12

    method = "fixedstep_sym12async" if setting.fixed else "sym12async"
    return odesolve_adjoint_sym12(f, y0, options=_tdepack_options(y0, t0, t1, setting, method))


# ---- torchode ---------------------------------------------------------------------------------

_TORCHODE_METHODS = ("euler", "heun", "dopri5", "tsit5")


def _torchode(f, y0: Tensor, t0: float, t1: float, setting: Integration) -> Tensor:
    import torchode

    if setting.method not in _TORCHODE_METHODS:
        raise _unsupported("torchode", setting.method, _TORCHODE_METHODS)
    batch = y0.shape[0]
    shape = y0.shape

    def flat_field(t: Tensor, y: Tensor) -> Tensor:
        return f(t, y.reshape(shape)).reshape(batch, -1)

    term = torchode.ODETerm(flat_field)
    step = {"euler": torchode.Euler, "heun": torchode.Heun, "dopri5": torchode.Dopri5,
            "tsit5": torchode.Tsit5}[setting.method](term=term)
    dt0 = None
    if setting.fixed:
        controller = torchode.FixedStepController()
        dt0 = torch.full((batch,), setting.step_size, dtype=y0.dtype, device=y0.device)
    else:
        controller = torchode.IntegralController(atol=setting.atol, rtol=setting.rtol, term=term)
    solver = torchode.AutoDiffAdjoint(step, controller)
    t_eval = _times(y0, t0, t1).expand(batch, 2)
    sol = solver.solve(torchode.InitialValueProblem(y0=y0.reshape(batch, -1), t_eval=t_eval),
                       dt0=dt0)
    return sol.ys[:, -1].reshape(shape)


def _torchdiffeq_scheme(setting: Integration) -> str:
    name = _torchdiffeq_method(setting)[0]
    return "rk4 (3/8 rule)" if name == "rk4" else name


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("torchdiffeq", "torchdiffeq odeint", "torchdiffeq", "direct", _torchdiffeq_odeint,
             _torchdiffeq_scheme),
        Peer("torchdiffeq_adjoint", "torchdiffeq odeint_adjoint", "torchdiffeq", "adjoint",
             _torchdiffeq_adjoint, _torchdiffeq_scheme),
        Peer("aca", "TorchDiffEqPack ACA", "TorchDiffEqPack", "checkpoint", _aca,
             lambda setting: _ACA_METHODS[setting.method]),
        Peer("mali", "TorchDiffEqPack MALI", "TorchDiffEqPack", "reversible", _mali,
             lambda setting: "alf (sym12async)"),
        Peer("torchode", "torchode", "torchode", "direct", _torchode,
             lambda setting: setting.method),
    )
}


def peer_solve(name: str, f: torch.nn.Module, y0: Tensor, t0: float, t1: float,
               setting: Integration) -> Tensor:
    """y(t1) by the peer `name`, differentiable w.r.t. y0 and f's parameters."""
    from .errors import UnknownNameError

    if name not in PEERS:
        raise UnknownNameError(f"unknown peer {name!r}; valid peers: {', '.join(PEERS)}")
    peer = PEERS[name]
    if not peer.available:
        raise PeerUnavailableError(
            f"{peer.label} needs the package {peer.package!r}, which is not installed "
            "(pip install \"odegrad[peers]\")"
        )
    return peer.solve(f, y0, t0, t1, setting)
