"""torchsde's SDE base classes: an `nn.Module` that carries `noise_type` and `sde_type`."""

from __future__ import annotations

from torch import nn

from ...errors import UnknownNameError
from .settings import NOISE_TYPES, SDE_TYPES

__all__ = ["BaseSDE", "SDEIto", "SDEStratonovich"]


class BaseSDE(nn.Module):
    """Subclass it and define f(t, y) and g(t, y) (or f_and_g, g_prod, f_and_g_prod; and h, the
    prior drift, for logqp). The names are checked here, as torchsde does."""

    def __init__(self, noise_type: str, sde_type: str):
        super().__init__()
        if noise_type not in NOISE_TYPES:
            raise UnknownNameError(f"Expected noise type in {NOISE_TYPES}, but found {noise_type}")
        if sde_type not in SDE_TYPES:
            raise UnknownNameError(f"Expected sde type in {SDE_TYPES}, but found {sde_type}")
        self.noise_type = noise_type
        self.sde_type = sde_type


class SDEIto(BaseSDE):
    def __init__(self, noise_type: str):
        super().__init__(noise_type=noise_type, sde_type=SDE_TYPES.ito)


class SDEStratonovich(BaseSDE):
    def __init__(self, noise_type: str):
        super().__init__(noise_type=noise_type, sde_type=SDE_TYPES.stratonovich)
