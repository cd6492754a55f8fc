"""Butcher tableaus kept as data, with their orders and dense-output polynomials.

A tableau describes one Runge–Kutta step (ALGORITHMS.md §1)

    K_i = f(t_n + c_i h, Y_i),   Y_i = y_n + h Σ_j a_ij K_j,   y_{n+1} = y_n + h Σ_i b_i K_i

with an optional embedded error estimate err = h Σ_i e_i K_i (e = b − b̂) and a dense output

    y(t_n + θh) = y_n + h Σ_i b_i(θ) K_i,   b_i(θ) = Σ_k P[i, k] θ^(k+1),

so that every interpolant is linear in the stages: a gradient method can pull an output back
through it with one VJP per stage.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import cache, cached_property

import numpy as np

__all__ = ["ButcherTableau", "TABLEAUS", "EXPLICIT_METHODS", "DIRK_TABLEAUS", "DIRK_PREDICTORS"]


@dataclass(frozen=True)
class ButcherTableau:
    """One Runge–Kutta scheme as arrays of float64 coefficients."""

    name: str
    c: np.ndarray  # (s,)
    a: np.ndarray  # (s, s), strictly lower triangular for explicit schemes
    b: np.ndarray  # (s,)
    order: int
    error: np.ndarray | None = None  # (s,) e = b - b_hat, or None for fixed-step schemes
    error_order: int | None = None  # order of the embedded solution
    fsal: bool = False  # last stage is f(t_{n+1}, y_{n+1}), reused as the next first stage
    dense: np.ndarray = field(default=None)  # (s, degree): b_i(θ) = Σ_k dense[i, k] θ^(k+1)

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.error is not None

    @cached_property
    def explicit(self) -> bool:  # (cached: checked at every solver's construction)
        return bool(np.all(np.triu(self.a) == 0.0))

    def dense_weights(self, theta: float) -> np.ndarray:
        """b_i(θ) for every stage i."""
        powers = theta ** np.arange(1, self.dense.shape[1] + 1)
        return self.dense @ powers


def _hermite_quartic(b: np.ndarray, mid: np.ndarray, s: int) -> np.ndarray:
    """Dense weights of the quartic through y_n, y_{n+1}, y_{n+1/2}, h f_n, h f_{n+1}.

    Used for FSAL schemes (K_1 = f_n, K_s = f_{n+1}) whose midpoint y_n + h Σ m_i K_i is given
    (Shampine's approach for dopri5, also used by torchdiffeq). The quartic p(θ) is written in
    the Lagrange–Hermite basis φ (values at 0, 1/2, 1) and ψ (slopes at 0 and 1); since the
    φ sum to one, p(θ) = y_n + h[φ_1 Σ b_i K_i + φ_m Σ m_i K_i + ψ_0 K_1 + ψ_1 K_s].
    """
    # Rows: conditions p(0), p(1/2), p(1), p'(0), p'(1) on the monomials 1, θ, …, θ^4.
    conditions = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 0.5, 0.25, 0.125, 0.0625],
            [1, 1, 1, 1, 1],
            [0, 1, 0, 0, 0],
            [0, 1, 2, 3, 4],
        ],
        dtype=np.float64,
    )
    basis = np.linalg.solve(conditions, np.eye(5))  # column j = coefficients of basis poly j
    phi_mid, phi_end, psi_start, psi_end = basis[1:, 1], basis[1:, 2], basis[1:, 3], basis[1:, 4]
    dense = np.outer(b, phi_end) + np.outer(mid, phi_mid)
    dense[0] += psi_start
    dense[s - 1] += psi_end
    return dense


def _hermite_cubic_fsal(b: np.ndarray, s: int) -> np.ndarray:
    """Dense weights of the cubic Hermite interpolant through (y_n, f_n) and (y_{n+1}, f_{n+1})."""
    h01 = np.array([0.0, 3.0, -2.0])  # coefficients of θ, θ², θ³
    h10 = np.array([1.0, -2.0, 1.0])
    h11 = np.array([0.0, -1.0, 1.0])
    dense = np.outer(b, h01)
    dense[0] += h10
    dense[s - 1] += h11
    return dense


def _tableau(name, c, a_rows, b, order, error=None, error_order=None, fsal=False, dense=None):
    s = len(c)
    a = np.zeros((s, s))
    for i, row in enumerate(a_rows, start=1):
        a[i, : len(row)] = row
    return ButcherTableau(
        name=name,
        c=np.asarray(c, dtype=np.float64),
        a=a,
        b=np.asarray(b, dtype=np.float64),
        order=order,
        error=None if error is None else np.asarray(error, dtype=np.float64),
        error_order=error_order,
        fsal=fsal,
        dense=np.asarray(dense, dtype=np.float64),
    )


EULER = _tableau("euler", [0.0], [], [1.0], order=1, dense=[[1.0]])

MIDPOINT = _tableau(
    "midpoint", [0.0, 0.5], [[0.5]], [0.0, 1.0], order=2,
    dense=[[1.0, -1.0], [0.0, 1.0]],
)

# Heun's method with Euler embedded: err = y_heun − y_euler.
HEUN = _tableau(
    "heun", [0.0, 1.0], [[1.0]], [0.5, 0.5], order=2,
    error=[-0.5, 0.5], error_order=1,
    dense=[[1.0, -0.5], [0.0, 0.5]],
)

# Classical RK4 with its third-order continuous extension (Hairer–Nørsett–Wanner II.6).
RK4 = _tableau(
    "rk4", [0.0, 0.5, 0.5, 1.0], [[0.5], [0.0, 0.5], [0.0, 0.0, 1.0]],
    [1 / 6, 1 / 3, 1 / 3, 1 / 6], order=4,
    dense=[
        [1.0, -1.5, 2 / 3],
        [0.0, 1.0, -2 / 3],
        [0.0, 1.0, -2 / 3],
        [0.0, -0.5, 2 / 3],
    ],
)

_BOSH3_B = np.array([2 / 9, 1 / 3, 4 / 9, 0.0])
BOSH3 = _tableau(
    "bosh3", [0.0, 0.5, 0.75, 1.0], [[0.5], [0.0, 0.75], [2 / 9, 1 / 3, 4 / 9]],
    _BOSH3_B, order=3,
    error=_BOSH3_B - np.array([7 / 24, 1 / 4, 1 / 3, 1 / 8]), error_order=2, fsal=True,
    dense=_hermite_cubic_fsal(_BOSH3_B, 4),
)

_DOPRI5_B = np.array([35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0])
_DOPRI5_B_HAT = np.array(
    [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]
)
# Shampine's midpoint weights for the Dormand–Prince pair.
_DOPRI5_MID = 0.5 * np.array(
    [
        6025192743 / 30085553152, 0.0, 51252292925 / 65400821598, -2691868925 / 45128329728,
        187940372067 / 1594534317056, -1776094331 / 19743644256, 11237099 / 235043384,
    ]
)
DOPRI5 = _tableau(
    "dopri5", [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0],
    [
        [1 / 5],
        [3 / 40, 9 / 40],
        [44 / 45, -56 / 15, 32 / 9],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
        [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
    ],
    _DOPRI5_B, order=5, error=_DOPRI5_B - _DOPRI5_B_HAT, error_order=4, fsal=True,
    dense=_hermite_quartic(_DOPRI5_B, _DOPRI5_MID, 7),
)

# Tsitouras 5(4) (Tsitouras 2011), with its own fourth-order interpolant.
_TSIT5_C = [0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0]
_TSIT5_A = [
    [0.161],
    [-0.008480655492356989, 0.335480655492357],
    [2.8971530571054935, -6.359448489975075, 4.3622954328695815],
    [5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525],
    [5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
     -0.028269050394068383],
    [0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
     2.324710524099774],
]
_TSIT5_B = np.array(_TSIT5_A[-1] + [0.0])
_TSIT5_ERROR = np.array(
    [
        -0.0017800110522257774, -0.0008164344596567469, 0.007880878010261995,
        -0.1447110071732629, 0.5823571654525552, -0.45808210592918697, 1 / 66,
    ]
)


def _tsit5_dense() -> np.ndarray:
    """Tsitouras' b_i(θ), each a product of factors, expanded into monomials θ^1..θ^4."""
    poly = np.polynomial.polynomial
    factors = [
        (-1.0530884977290216, [[0, 1], [-1.329989018975412, 1], [0.7139816917074209,
                                                                  -1.4364028541716351, 1]]),
        (0.1017, [[0, 0, 1], [1.2949852507374631, -2.1966568338249754, 1]]),
        (2.490627285651252793, [[0, 0, 1], [1.57803468208092486, -2.38535645472061657, 1]]),
        (-16.54810288924490272, [[-1.21712927295533244, 1], [-0.61620406037800089, 1],
                                 [0, 0, 1]]),
        (47.37952196281928122, [[-1.203071208372362603, 1], [-0.658047292653547382, 1],
                                [0, 0, 1]]),
        (-34.87065786149660974, [[-1.2, 1], [-2 / 3, 1], [0, 0, 1]]),
        (2.5, [[-1.0, 1], [-0.6, 1], [0, 0, 1]]),
    ]
    dense = np.zeros((7, 4))
    for i, (scale, parts) in enumerate(factors):
        coefficients = np.array([scale])
        for part in parts:
            coefficients = poly.polymul(coefficients, part)
        coefficients = np.pad(coefficients, (0, 5 - len(coefficients)))
        dense[i] = coefficients[1:5]  # b_i(0) = 0
    return dense


TSIT5 = _tableau(
    "tsit5", _TSIT5_C, _TSIT5_A, _TSIT5_B, order=5, error=_TSIT5_ERROR, error_order=4, fsal=True,
    dense=_tsit5_dense(),
)

# Prince–Dormand RK8(7)13M: 13 stages (the 13th has c = 1 but is not f(t_{n+1}, y_{n+1})), and
# a 14th entry for the FSAL stage f(t_{n+1}, y_{n+1}). DOPRI8 below puts stages that feed only
# the dense output between the two (`_dopri8_extended`).
_DOPRI8_C = [
    0.0, 1 / 18, 1 / 12, 1 / 8, 5 / 16, 3 / 8, 59 / 400, 93 / 200, 5490023248 / 9719169821,
    13 / 20, 1201146811 / 1299019798, 1.0, 1.0, 1.0,
]
_DOPRI8_A = [
    [1 / 18],
    [1 / 48, 1 / 16],
    [1 / 32, 0, 3 / 32],
    [5 / 16, 0, -75 / 64, 75 / 64],
    [3 / 80, 0, 0, 3 / 16, 3 / 20],
    [29443841 / 614563906, 0, 0, 77736538 / 692538347, -28693883 / 1125000000,
     23124283 / 1800000000],
    [16016141 / 946692911, 0, 0, 61564180 / 158732637, 22789713 / 633445777,
     545815736 / 2771057229, -180193667 / 1043307555],
    [39632708 / 573591083, 0, 0, -433636366 / 683701615, -421739975 / 2616292301,
     100302831 / 723423059, 790204164 / 839813087, 800635310 / 3783071287],
    [246121993 / 1340847787, 0, 0, -37695042795 / 15268766246, -309121744 / 1061227803,
     -12992083 / 490766935, 6005943493 / 2108947869, 393006217 / 1396673457,
     123872331 / 1001029789],
    [-1028468189 / 846180014, 0, 0, 8478235783 / 508512852, 1311729495 / 1432422823,
     -10304129995 / 1701304382, -48777925059 / 3047939560, 15336726248 / 1032824649,
     -45442868181 / 3398467696, 3065993473 / 597172653],
    [185892177 / 718116043, 0, 0, -3185094517 / 667107341, -477755414 / 1098053517,
     -703635378 / 230739211, 5731566787 / 1027545527, 5232866602 / 850066563,
     -4093664535 / 808688257, 3962137247 / 1805957418, 65686358 / 487910083],
    [403863854 / 491063109, 0, 0, -5068492393 / 434740067, -411421997 / 543043805,
     652783627 / 914296604, 11173962825 / 925320556, -13158990841 / 6184727034,
     3936647629 / 1978049680, -160528059 / 685178525, 248638103 / 1413531060, 0],
]
_DOPRI8_B = np.array(
    [14005451 / 335480064, 0, 0, 0, 0, -59238493 / 1068277825, 181606767 / 758867731,
     561292985 / 797845732, -1041891430 / 1371343529, 760417239 / 1151165299,
     118820643 / 751138087, -528747749 / 2220607170, 1 / 4, 0]
)
_DOPRI8_B_HAT = np.array(
    [13451932 / 455176623, 0, 0, 0, 0, -808719846 / 976000145, 1757004468 / 5645159321,
     656045339 / 265891186, -3867574721 / 1518517206, 465885868 / 322736535,
     53011238 / 667516719, 2 / 45, 0, 0]
)


# ---------------------------------------------------------------------------------------------
# Continuous extensions from the order conditions.
#
# A dense output y_n + h Σ_i b_i(θ) K_i has order p when, for every rooted tree τ with at most
# p nodes, Σ_i b_i(θ) Φ_i(τ) = θ^|τ| / γ(τ) (Hairer–Nørsett–Wanner I, §II.2 and §II.6), where
# Φ_i(•) = 1, Φ_i([τ_1, …, τ_m]) = Π_k Σ_j a_ij Φ_j(τ_k) and γ([τ_1, …, τ_m]) = |τ| Π_k γ(τ_k).
# With b_i(θ) = Σ_k P[i, k] θ^(k+1) these are linear in each column of P: column k − 1 must
# give 1/γ(τ) on the trees with k nodes and 0 on the others.


def _partitions(n: int, largest: int | None = None):
    """The partitions of n into parts of at most `largest`, largest first."""
    if n == 0:
        yield ()
        return
    for part in range(min(n, n if largest is None else largest), 0, -1):
        for rest in _partitions(n - part, part):
            yield (part,) + rest


@cache
def _rooted_trees(order: int) -> tuple:
    """Every rooted tree with `order` nodes, each a sorted tuple of its subtrees."""
    if order == 1:
        return ((),)
    trees = set()
    for sizes in _partitions(order - 1):
        for children in itertools.product(*(_rooted_trees(size) for size in sizes)):
            trees.add(tuple(sorted(children)))
    return tuple(sorted(trees))


def _order_conditions(a: np.ndarray, max_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Φ_i(τ) (trees × stages), |τ| and γ(τ) over every tree with at most max_order nodes."""
    phi: dict[tuple, np.ndarray] = {}

    def weights(tree):
        if tree not in phi:
            value = np.ones(a.shape[0])
            for child in tree:
                value = value * (a @ weights(child))
            phi[tree] = value
        return phi[tree]

    trees = [t for k in range(1, max_order + 1) for t in _rooted_trees(k)]
    sizes = np.array([_size_gamma(t) for t in trees])
    return np.array([weights(t) for t in trees]), sizes[:, 0].astype(int), sizes[:, 1]


@cache
def _size_gamma(tree: tuple) -> tuple[int, float]:
    """|τ| and γ(τ)."""
    nodes, product = 1, 1.0
    for child in tree:
        sub_nodes, sub_gamma = _size_gamma(child)
        nodes, product = nodes + sub_nodes, product * sub_gamma
    return nodes, nodes * product


def _continuous_extension(a: np.ndarray, order: int, b: np.ndarray | None = None) -> np.ndarray:
    """P (s × order) of a dense output of the given order over all stages of `a`.

    Each column is the minimum-norm solution of its order conditions (they are consistent for
    the stage sets built below, and checked by `_dense_order_defect`). With b given, the last
    column is b minus the others, so that b_i(1) = b_i: it still meets its conditions when b
    has at least this order, since then Σ_i b_i Φ_i(τ) = 1/γ(τ) is the sum of all columns'.
    """
    phi, orders, gammas = _order_conditions(a, order)
    pinv = np.linalg.pinv(phi, rcond=1e-10)
    dense = np.stack([pinv @ np.where(orders == k, 1.0 / gammas, 0.0)
                      for k in range(1, order + 1)], axis=1)
    if b is not None:
        dense[:, -1] = b - dense[:, :-1].sum(axis=1)
    return dense


def _dense_order_defect(a: np.ndarray, dense: np.ndarray, order: int) -> float:
    """max over trees with at most `order` nodes and θ in [0, 1] of the order-condition defect."""
    phi, orders, gammas = _order_conditions(a, order)
    thetas = np.linspace(0.0, 1.0, 11)
    weights = dense @ (thetas[None, :] ** np.arange(1, dense.shape[1] + 1)[:, None])
    exact = thetas[None, :] ** orders[:, None] / gammas[:, None]
    return float(np.abs(phi @ weights - exact).max())


def _with_stages(a: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """a with explicit stages appended (row i reads the stages before it)."""
    s, n = a.shape[0], len(rows)
    out = np.zeros((s + n, s + n))
    out[:s, :s] = a
    for i, row in enumerate(rows):
        out[s + i, : len(row)] = row
    return out


# The extra stages of dopri8's dense output, by level: (order of the continuous extension the
# level's stage points are read from, its nodes c).
_DOPRI8_DENSE_LEVELS = ((5, (0.3, 0.7)), (6, (0.35, 0.5, 0.95)))
_DOPRI8_DENSE_ORDER = 7


def _dopri8_extended() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RK8(7)13M with a seventh-order dense output: (c, a, b, P) over 19 stages.

    Bootstrapping (Enright, Jackson, Nørsett & Thomsen 1986; Verner 1993): the 13 stages admit
    a continuous extension of order 5 but not 6. Two stages placed on it, Y = y_n + h Σ b_i(c) K_i
    at c = 0.3, 0.7, are accurate to O(h^6), and with them an extension of order 6 exists; three
    stages placed on that one (c = 0.35, 0.5, 0.95) are accurate to O(h^7); with those and the
    FSAL stage f(t_{n+1}, y_{n+1}), last as before, an extension of order 7 exists. The five new
    stages have b_i = e_i = 0: the solution, its error estimate and the step sizes are RK8(7)13M's
    unchanged, bit for bit. Every node was chosen from a grid by the size of the order-8 defect
    and of the coefficients (|P| < 531).

    (DOP853's seventh-order interpolant, with 3 extra stages, belongs to Hairer's own 12-stage
    pair, whose nodes differ from these: it cannot be put on RK8(7)13M's stages.)

    Cost: 5 more f-evaluations per step, always (18 instead of 13; an adaptive solve reads
    every output from the dense output). Gradients need nothing special, the new stages being
    ordinary explicit stages: the discrete adjoint spends VJPs on them only in steps that hold
    an output, and "all" keeps the two that later stages read.
    """
    a = np.zeros((13, 13))
    for i, row in enumerate(_DOPRI8_A, start=1):
        a[i, : len(row)] = row
    c = list(_DOPRI8_C[:13])
    for order, nodes in _DOPRI8_DENSE_LEVELS:
        level = _continuous_extension(a, order)
        a = _with_stages(a, [level @ (node ** np.arange(1, order + 1)) for node in nodes])
        c += nodes
    b = np.zeros(a.shape[0] + 1)
    b[:13] = _DOPRI8_B[:13]
    a = _with_stages(a, [b[:-1]])  # the FSAL stage: y_{n+1} = y_n + h Σ b_i K_i
    c.append(1.0)
    dense = _continuous_extension(a, _DOPRI8_DENSE_ORDER, b)
    defect = _dense_order_defect(a, dense, _DOPRI8_DENSE_ORDER)
    if not defect < 1e-11:  # a failed solve would silently give a low-order interpolant
        raise RuntimeError(f"dopri8 dense output: order conditions missed by {defect:.1e}")
    return np.array(c), a, b, dense


_DOPRI8_EXT_C, _DOPRI8_EXT_A, _DOPRI8_EXT_B, _DOPRI8_DENSE = _dopri8_extended()
_DOPRI8_EXT_ERROR = np.zeros(len(_DOPRI8_EXT_B))  # e_i = 0 on the new stages and the FSAL one
_DOPRI8_EXT_ERROR[:13] = (_DOPRI8_B - _DOPRI8_B_HAT)[:13]

DOPRI8 = ButcherTableau(
    name="dopri8", c=_DOPRI8_EXT_C, a=_DOPRI8_EXT_A, b=_DOPRI8_EXT_B, order=8,
    error=_DOPRI8_EXT_ERROR, error_order=7, fsal=True, dense=_DOPRI8_DENSE,
)

# The schemes of torchdiffeq 0.2.5 that odegrad lacked (served by odegrad.compat.torchdiffeq under
# torchdiffeq's names rk4, heun3, fehlberg2). None has a stage at (t_{n+1}, y_{n+1}), so each dense
# output is a continuous extension from the order conditions (`_checked_extension`) with
# b_i(1) = b_i: the interpolant ends on y_{n+1}.


def _checked_extension(c, a_rows, b, order: int) -> np.ndarray:
    """The continuous extension of the given order over the stages, checked to meet it."""
    a = np.zeros((len(c), len(c)))
    for i, row in enumerate(a_rows, start=1):
        a[i, : len(row)] = row
    dense = _continuous_extension(a, order, np.asarray(b, dtype=np.float64))
    defect = _dense_order_defect(a, dense, order)
    if not defect < 1e-12:
        raise RuntimeError(f"dense output of order {order}: conditions missed by {defect:.1e}")
    return dense


# Kutta's 3/8 rule (torchdiffeq's "rk4", its rk4_alt_step_func). Its four stages determine a
# unique cubic extension of order 3 (the order-3 conditions are four, on an invertible system),
# which ends on b.
_RK4_38 = ([0.0, 1 / 3, 2 / 3, 1.0], [[1 / 3], [-1 / 3, 1.0], [1.0, -1.0, 1.0]],
           [1 / 8, 3 / 8, 3 / 8, 1 / 8])
RK4_38 = _tableau("rk4_38", *_RK4_38, order=4, dense=_checked_extension(*_RK4_38, order=3))

# Heun's third-order method (torchdiffeq's "heun3"). Three stages admit no extension of order 3
# (b_3(θ) = 3θ³/4 is forced by the tall tree, and then the bushy one fails for θ ≠ 1), so its
# dense output is the quadratic of order 2, as for "heun".
_HEUN3 = ([0.0, 1 / 3, 2 / 3], [[1 / 3], [0.0, 2 / 3]], [1 / 4, 0.0, 3 / 4])
HEUN3 = _tableau("heun3", *_HEUN3, order=3, dense=_checked_extension(*_HEUN3, order=2))

# Fehlberg's RK2(1) pair as torchdiffeq 0.2.5 has it (_impl/fehlberg2.py): the second-order
# solution b = (1/512, 255/256, 1/512) is propagated (local extrapolation) and the first-order
# b_hat = (1/256, 255/256, 0), Fehlberg's own solution and the third stage point, is the
# embedded one; err = y − ŷ = h(−K_1 + K_3)/512. The third stage is f(t_{n+1}, ŷ_{n+1}), not
# f(t_{n+1}, y_{n+1}), so the scheme is not FSAL. (torchdiffeq nevertheless reuses it as the next
# step's first stage; odegrad evaluates f(t_{n+1}, y_{n+1}), so the two agree on the first step
# and to the scheme's order after it.) Dense output: the quadratic of order 2 (b is of order 2).
_FEHLBERG2 = ([0.0, 0.5, 1.0], [[0.5], [1 / 256, 255 / 256]], [1 / 512, 255 / 256, 1 / 512])
FEHLBERG2 = _tableau(
    "fehlberg2", *_FEHLBERG2, order=2, error=[-1 / 512, 0.0, 1 / 512], error_order=1,
    dense=_checked_extension(*_FEHLBERG2, order=2),
)

# FEHLBERG2 is not registered yet: odegrad.api.METHOD_ALIASES still maps the name "fehlberg2" to
# None (torchdiffeq's, "not implemented"), which would shadow it. Dropping that alias and adding
# FEHLBERG2 here (and "fehlberg2": 2 to tests/test_dense_output.py's DENSE_ORDER) registers it.
TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t for t in (
        EULER, MIDPOINT, HEUN, RK4, BOSH3, DOPRI5, TSIT5, DOPRI8, RK4_38, HEUN3, FEHLBERG2
    )
}
EXPLICIT_METHODS = tuple(TABLEAUS)


# ---------------------------------------------------------------------------------------------
# Diagonally implicit schemes (ALGORITHMS.md §1, the DIRK recurrence and the θ-method).
#
# All four are ESDIRK: an explicit first stage K_1 = f(t_n, y_n), then stages with
# a_ii = γ > 0, and stiffly accurate (b = the last row of a, so y_{n+1} is the last stage point
# and K_s = f(t_{n+1}, y_{n+1}) is the next step's K_1: FSAL). Their dense output is the cubic
# Hermite interpolant through (y_n, K_1) and (y_{n+1}, K_s), linear in the stages.
# `DIRK_PREDICTORS[name][i]` holds α_ij (Σ_j α_ij = 1): Newton's first guess for stage i is
# K_i ≈ Σ_{j<i} α_ij K_j (the linear-combination predictor described in diffrax's developer
# notes, "Predictors for DIRK methods").


def _theta_method(name: str, theta: float, order: int, error=None, error_order=None):
    """The θ-method as the 2-stage ESDIRK Y_1 = y_n, Y_2 = y_{n+1}, a_21 = b_1 = 1 − θ."""
    b = [1.0 - theta, theta]
    return _tableau(
        name, [0.0, 1.0], [[1.0 - theta, theta]], b, order=order, error=error,
        error_order=error_order, fsal=True, dense=_hermite_cubic_fsal(np.array(b), 2),
    )


# Implicit Euler (θ = 1). Error estimate: h(K_2 − K_1)/2 = y_IE − y_trapezoid, the local error
# −h²y''/2 of implicit Euler to leading order.
IMPLICIT_EULER = _theta_method(
    "implicit_euler", 1.0, order=1, error=[-0.5, 0.5], error_order=1
)
# Crank–Nicolson (θ = ½, the trapezoidal rule). Its error estimate needs the previous step
# (solvers/implicit.py); error_order 2 is that of the estimated local error h³y'''/12.
CRANK_NICOLSON = _theta_method("crank_nicolson", 0.5, order=2, error_order=2)


def _kvaerno3() -> ButcherTableau:
    """Kværnø's L-stable ESDIRK 3(2), 4 stages (Kværnø 2004, BIT 44: 489–502)."""
    g = 0.43586652150845899942  # the root of 6γ³ − 18γ² + 9γ − 1 in (0, 1)
    a31 = (-4 * g**2 + 6 * g - 1) / (4 * g)
    a32 = (-2 * g + 1) / (4 * g)
    a41 = (6 * g - 1) / (12 * g)
    a42 = -1 / ((24 * g - 12) * g)
    a43 = (-6 * g**2 + 6 * g - 1) / (6 * g - 3)
    rows = [[g, g], [a31, a32, g], [a41, a42, a43, g]]
    b = np.array(rows[-1])
    b_hat = np.array([a31, a32, g, 0.0])  # the embedded second-order solution is Y_3
    c = [0.0, 2 * g, 1.0, 1.0]
    return _tableau(
        "kvaerno3", c, rows, b, order=3, error=b - b_hat, error_order=2, fsal=True,
        dense=_hermite_cubic_fsal(b, 4),
    )


def _kvaerno5() -> ButcherTableau:
    """Kværnø's L-stable ESDIRK 5(4), 7 stages (Kværnø 2004, BIT 44: 489–502)."""
    g = 0.26
    rows = [
        [g, g],
        [0.13, 0.84033320996790809, g],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, g],
        [0.16648564323248321, 0.10450018841591720, 0.03631482272098715,
         -0.13090704451073998, g],
        [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141,
         0.61943039072480676, g],
        [0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046,
         0.62993304899016403, 0.06962479448202728, g],
    ]
    b = np.array(rows[-1])
    b_hat = np.array(rows[-2] + [0.0])  # the embedded fourth-order solution is Y_6
    c = [0.0] + [sum(row) for row in rows]
    return _tableau(
        "kvaerno5", c, rows, b, order=5, error=b - b_hat, error_order=4, fsal=True,
        dense=_hermite_cubic_fsal(b, 7),
    )


KVAERNO3 = _kvaerno3()
KVAERNO5 = _kvaerno5()

DIRK_TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t for t in (IMPLICIT_EULER, CRANK_NICOLSON, KVAERNO3, KVAERNO5)
}


def _kvaerno3_predictor() -> list[list[float]]:
    g = 0.43586652150845899942
    theta = 1 / (2 * g)  # linear extrapolation of K through c_1 = 0, c_2 = 2γ to c_3 = 1
    a = KVAERNO3.a
    return [[], [1.0], [1.0 - theta, theta], [a[2, 0], a[2, 1], g]]


DIRK_PREDICTORS: dict[str, list[list[float]]] = {
    "implicit_euler": [[], [1.0]],
    "crank_nicolson": [[], [1.0]],
    "kvaerno3": _kvaerno3_predictor(),
    # Interpolation-based predictors of OrdinaryDiffEq.jl's Kvaerno5 (with α_21 = 1), as
    # tabulated by diffrax; the last stage is predicted by the embedded solution's weights.
    "kvaerno5": [
        [],
        [1.0],
        [-1.366025403784441, 2.3660254037844357],
        [-0.19650552613122207, 0.8113579546496623, 0.38514757148155954],
        [0.10375304369958693, 0.937994698066431, -0.04174774176601781, 0.0],
        [-0.17281112873898072, 0.6235784481025847, 0.5492326806363959, 0.0, 0.0],
        list(KVAERNO5.a[5, :6]),
    ],
}
