"""torchsde 0.2.6's type aliases (`torchsde.types`), for code and tests that import them."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union  # noqa: F401, UP035

import torch

Tensor = torch.Tensor
Tensors = Sequence[Tensor]
TensorOrTensors = Union[Tensor, Tensors]  # noqa: UP007

Scalar = Union[float, Tensor]  # noqa: UP007
Vector = Union[Sequence[float], Tensor]  # noqa: UP007

Module = torch.nn.Module
Modules = Sequence[Module]
ModuleOrModules = Union[Module, Modules]  # noqa: UP007

Size = torch.Size
Sizes = Sequence[Size]
