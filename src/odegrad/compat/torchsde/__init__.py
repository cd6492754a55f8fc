"""torchsde 0.2.6's API, served by odegrad: `import odegrad.compat.torchsde as torchsde`.

The same signatures, names and defaults: `sdeint`, `sdeint_adjoint`, `BrownianInterval`,
`BrownianPath`, `ReverseBrownian`, `brownian_interval_like`, `BaseSDE`, `SDEIto`,
`SDEStratonovich`, and the submodules `settings` (METHODS, NOISE_TYPES, SDE_TYPES,
LEVY_AREA_APPROXIMATIONS, METHOD_OPTIONS) and `types`. Every keyword, option and name is
honoured with torchsde's meaning or raises an odegrad error (all ValueError subclasses, as
torchsde raises ValueError) that names it and says what to use; none is dropped
(docs/torchsde_suite.md has the full list and torchsde's own tests run against this package).

Honoured:
    sde objects with f and g, or f_and_g, g_prod, f_and_g_prod (terms.py), noise types
    diagonal, scalar, additive, general, sde_type ito and stratonovich; `names` (drift,
    diffusion, prior_drift, drift_and_diffusion, drift_and_diffusion_prod); `logqp` (the KL
    path term as one more state component through the same solve; terms.py); `ts` as a tensor
    or a list; methods euler, milstein (options grad_free), euler_heun, heun, midpoint,
    reversible_heun (methods.py); `dt` (fixed steps from ts[0], the last clipped to ts[-1],
    outputs interpolated linearly inside a step, as torchsde); `extra` and `extra_solver_state`
    (reversible_heun's (f, g, z), torchsde's; () for the methods without one); `bm` any
    torchsde-style Brownian motion, torchsde's own included.
    sdeint: odegrad's gradient="direct". sdeint_adjoint: gradient="backsolve" (the stochastic
    adjoint: any served forward method, the adjoint of the SDE's Stratonovich form integrated
    with adjoint_method midpoint, heun, euler_heun or reversible_heun; an Itô SDE's drift is
    converted, so its default adjoint_method is midpoint where torchsde's is its Itô milstein
    or euler); method="reversible_heun" with adjoint_method="adjoint_reversible_heun" (the default
    there): gradient="reversible", the exact gradient of the scheme (torchsde's is exact up to
    round-off too), memory constant in the number of steps; adjoint_params.
    rtol, atol, dt_min, adjoint_rtol, adjoint_atol: read by adaptive stepping alone in
    torchsde, so with adaptive=False (the only mode here) they have no effect there either.

Refused (odegrad errors naming the option): adaptive=True and adjoint_adaptive=True (fixed
steps only); methods srk (also torchsde's default for Itô SDEs with diagonal, scalar or
additive noise: pass method='euler' or 'milstein') and log_ode; a scheme of the other calculus
(as torchsde); adjoint_method milstein, euler, srk, log_ode; adjoint_options (no adjoint
scheme here takes any); under sdeint_adjoint, extra_solver_state with reversible_heun and
extra=True with it in grad mode (odegrad's adjoint gradients start from z_0 = y0 and keep no
graph of the final state; sdeint serves both); options a method does not take;
unknown keyword arguments and names= keys (torchsde ignores them); the Brownian options listed
in brownian.py (davie/foster Lévy area, return_A, halfway_tree, tol, pool_size, H,
BrownianTree).

The package, one concept per module: settings and types (torchsde's names), base_sde, brownian
(the Brownian motions and the view odegrad queries), terms (the sde object as f and g, logqp),
methods (names to schemes), sdeint (the two entry points).
"""

from __future__ import annotations

from . import settings, types  # noqa: F401 (torchsde.settings, torchsde.types)
from .base_sde import BaseSDE, SDEIto, SDEStratonovich
from .brownian import (
    BaseBrownian,
    BrownianInterval,
    BrownianPath,
    BrownianTree,
    ReverseBrownian,
    brownian_interval_like,
)
from .sdeint import sdeint, sdeint_adjoint

__all__ = ["sdeint", "sdeint_adjoint", "BaseSDE", "SDEIto", "SDEStratonovich", "BaseBrownian",
           "BrownianInterval", "BrownianPath", "BrownianTree", "ReverseBrownian",
           "brownian_interval_like", "settings", "types"]

__version__ = "0.2.6"  # the torchsde release whose behaviour this package reproduces
