"""An `sde` object as odegrad's solve_sde takes it: drift f(t, y) and diffusion g(t, y).

torchsde lets the object define f and g, or f_and_g, g_prod (g times a vector), f_and_g_prod,
under renamed attributes (`names=`), and h (the prior drift) for `logqp`. This module resolves
those into f and g, checks the shapes as torchsde's `check_contract` does (ValueError subclasses,
naming the term), and builds the logqp augmentation.

From g_prod alone, g is rebuilt exactly from products with unit vectors (g_prod is linear in
v): one call for diagonal and scalar noise, m calls for general and additive noise. From
f_and_g (f_and_g_prod), f and g are taken from separate calls (twice the evaluations).

logqp (torchsde's SDELogqp): the state gets one more component, L, with
    dL = ½ |u|² dt,  u = (f − h) / g (diagonal, |g| floored at 1e-7) or u = g⁺ (f − h)
(g⁺ the pseudo-inverse, other noise types), and a zero row of g, so L(t) is the KL path term
∫ ½ |u|² dt accumulated along the same solve; its increments over the output intervals are
returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import InvalidInputError, UnknownNameError
from .settings import NOISE_TYPES, SDE_TYPES

__all__ = ["Terms", "resolve_terms", "NAME_KEYS"]

# names= key -> the attribute torchsde reads by default
NAME_KEYS = {"drift": "f", "diffusion": "g", "prior_drift": "h",
             "drift_and_diffusion": "f_and_g", "drift_and_diffusion_prod": "f_and_g_prod"}
_DIVISION_FLOOR = 1e-7


@dataclass
class Terms:
    """f and g for odegrad, with what the solve needs to know about them."""

    f: Callable[[Tensor, Tensor], Tensor]
    g: Callable[[Tensor, Tensor], Tensor]
    noise_type: str
    sde_type: str
    y0: Tensor  # with the logqp component appended when logqp
    brownian_size: int


def _attributes(sde, names: dict | None) -> dict[str, Callable]:
    """role attribute ('f', 'g', 'h', 'f_and_g', 'g_prod', 'f_and_g_prod') -> the bound method."""
    names = {} if names is None else dict(names)
    unknown = sorted(set(names) - set(NAME_KEYS))
    if unknown:
        raise UnknownNameError(
            f"names= has unknown key(s) {unknown}; torchsde renames {sorted(NAME_KEYS)}")
    found = {}
    for key, default in NAME_KEYS.items():
        attribute = names.get(key, default)
        if not isinstance(attribute, str):
            raise InvalidInputError(f"names[{key!r}] must be a method name, got {attribute!r}")
        if hasattr(sde, attribute):
            found[default] = getattr(sde, attribute)
    if hasattr(sde, "g_prod"):
        found["g_prod"] = sde.g_prod
    return found


def _rebuilt_diffusion(product: Callable, noise_type: str, m_of: Callable[[], int]):
    """g(t, y) from v -> g(t, y) v (exact: products with unit vectors)."""

    def g(t: Tensor, y: Tensor) -> Tensor:
        batch = y.shape[0]
        if noise_type == NOISE_TYPES.diagonal:
            return product(t, y, torch.ones_like(y))
        if noise_type == NOISE_TYPES.scalar:
            return product(t, y, y.new_ones(batch, 1)).unsqueeze(-1)
        m = m_of()
        eye = torch.eye(m, dtype=y.dtype, device=y.device)
        return torch.stack([product(t, y, eye[j].expand(batch, m)) for j in range(m)], dim=-1)

    return g


def _drift_and_diffusion(parts: dict, noise_type: str, m_of: Callable[[], int]):
    """(f, g) from whichever of f, g, f_and_g, g_prod, f_and_g_prod the object defines."""
    if "f" in parts:
        f = parts["f"]
    elif "f_and_g" in parts:
        f_and_g = parts["f_and_g"]
        f = lambda t, y: f_and_g(t, y)[0]  # noqa: E731
    elif "f_and_g_prod" in parts:
        f_and_g_prod = parts["f_and_g_prod"]
        f = lambda t, y: f_and_g_prod(t, y, y.new_zeros(y.shape[0], m_of()))[0]  # noqa: E731
    else:
        raise InvalidInputError(
            "sde must define at least one of `f`, `f_and_g`, or `f_and_g_prod` (or the names "
            "given in names=)")
    if "g" in parts:
        g = parts["g"]
    elif "f_and_g" in parts:
        f_and_g = parts["f_and_g"]
        g = lambda t, y: f_and_g(t, y)[1]  # noqa: E731
    elif "g_prod" in parts:
        g = _rebuilt_diffusion(parts["g_prod"], noise_type, m_of)
    elif "f_and_g_prod" in parts:
        f_and_g_prod = parts["f_and_g_prod"]
        g = _rebuilt_diffusion(lambda t, y, v: f_and_g_prod(t, y, v)[1], noise_type, m_of)
    else:
        raise InvalidInputError(
            "sde must define at least one of `g`, `f_and_g`, `g_prod` or `f_and_g_prod` (or the "
            "names given in names=)")
    return f, g


def _logqp_terms(f: Callable, g: Callable, h: Callable, noise_type: str):
    """The drift and diffusion of the state (y, L), L the KL path term (module docstring)."""

    def path_term(t: Tensor, y: Tensor, drift: Tensor) -> Tensor:
        gy, difference = g(t, y), drift - h(t, y)
        if noise_type == NOISE_TYPES.diagonal:
            floor = torch.full_like(gy, _DIVISION_FLOOR) * gy.sign()
            u = difference / torch.where(gy.abs().detach() > _DIVISION_FLOOR, gy, floor)
        else:
            u = (torch.linalg.pinv(gy) @ difference.unsqueeze(-1)).squeeze(-1)
        return 0.5 * (u ** 2).sum(dim=1, keepdim=True)

    def f_augmented(t: Tensor, y: Tensor) -> Tensor:
        state = y[:, :-1]
        drift = f(t, state)
        return torch.cat([drift, path_term(t, state, drift)], dim=1)

    def g_augmented(t: Tensor, y: Tensor) -> Tensor:
        gy = g(t, y[:, :-1])
        if noise_type == NOISE_TYPES.diagonal:
            return torch.cat([gy, gy.new_zeros(gy.shape[0], 1)], dim=1)
        return torch.cat([gy, gy.new_zeros(gy.shape[0], 1, gy.shape[-1])], dim=1)

    return f_augmented, g_augmented


def resolve_terms(sde, y0: Tensor, t0: Tensor, bm_shape: tuple | None, names: dict | None,
                  logqp: bool) -> Terms:
    """f, g, noise and SDE types of `sde`, checked at (t0, y0) as torchsde checks them."""
    for attribute, valid in (("noise_type", NOISE_TYPES), ("sde_type", SDE_TYPES)):
        if not hasattr(sde, attribute):
            raise InvalidInputError(f"sde does not have the attribute {attribute}.")
        if getattr(sde, attribute) not in valid:
            raise UnknownNameError(
                f"Expected {attribute.replace('_', ' ')} in {valid}, but found "
                f"{getattr(sde, attribute)}.")
    noise_type, sde_type = sde.noise_type, sde.sde_type
    if not isinstance(y0, Tensor):
        raise InvalidInputError("`y0` must be a torch.Tensor.")
    if y0.dim() != 2:
        raise InvalidInputError("`y0` must be a 2-dimensional tensor of shape (batch, channels).")
    if bm_shape is not None and len(bm_shape) != 2:
        raise InvalidInputError("`bm` must be of shape (batch, noise_channels).")
    parts = _attributes(sde, names)
    noise_size: list[int] = []

    def m_of() -> int:
        if not noise_size:
            raise InvalidInputError(
                "Cannot infer noise size (i.e. number of Brownian motion channels). Either pass "
                "`bm` explicitly, or specify one of the `g`, `f_and_g` functions.")
        return noise_size[0]

    if bm_shape is not None:
        noise_size.append(int(bm_shape[1]))
    elif "g" in parts or "f_and_g" in parts:
        with torch.no_grad():
            gy = parts["g"](t0, y0) if "g" in parts else parts["f_and_g"](t0, y0)[1]
        noise_size.append(int(gy.shape[1] if noise_type == NOISE_TYPES.diagonal
                              else gy.shape[-1]))
    f, g = _drift_and_diffusion(parts, noise_type, m_of)
    if logqp:
        if "h" not in parts:
            raise InvalidInputError(
                "logqp=True needs the prior drift h(t, y) (or the method named by "
                "names['prior_drift'])")
        f, g = _logqp_terms(f, g, parts["h"], noise_type)
        y0 = torch.cat([y0, y0.new_zeros(y0.shape[0], 1)], dim=1)
        if noise_type == NOISE_TYPES.diagonal and bm_shape is None:
            noise_size[:] = [y0.shape[1]]
    m = _check_shapes(f, g, y0, t0, noise_type, bm_shape)
    return Terms(f=f, g=g, noise_type=noise_type, sde_type=sde_type, y0=y0, brownian_size=m)


def _check_shapes(f, g, y0: Tensor, t0: Tensor, noise_type: str, bm_shape) -> int:
    """torchsde's consistency checks of batch, state and noise sizes; returns m."""
    with torch.no_grad():
        drift, diffusion = f(t0, y0), g(t0, y0)
    batch, state = y0.shape
    if drift.dim() != 2:
        raise InvalidInputError(
            f"Drift must be of shape (batch, state_channels), but got {tuple(drift.shape)}.")
    if noise_type == NOISE_TYPES.diagonal:
        if diffusion.dim() != 2:
            raise InvalidInputError(
                "Diffusion must be of shape (batch, state_channels), but got "
                f"{tuple(diffusion.shape)}.")
        m = diffusion.shape[1]
    else:
        if diffusion.dim() != 3:
            raise InvalidInputError(
                "Diffusion must be of shape (batch, state_channels, noise_channels), but got "
                f"{tuple(diffusion.shape)}.")
        m = diffusion.shape[2]
    if drift.shape[0] != batch or diffusion.shape[0] != batch or (
            bm_shape is not None and bm_shape[0] != batch):
        raise InvalidInputError("Batch sizes not consistent.")
    if drift.shape[1] != state or diffusion.shape[1] != state:
        raise InvalidInputError("State sizes not consistent.")
    if bm_shape is not None and bm_shape[1] != m:
        raise InvalidInputError("Noise sizes not consistent.")
    if noise_type == NOISE_TYPES.scalar and m != 1:
        raise InvalidInputError(
            f"Scalar noise must have only one channel; the diffusion has {m} noise channels.")
    return int(m)
