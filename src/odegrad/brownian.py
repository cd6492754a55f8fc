"""The Brownian Interval (Kidger et al. 2021, "Efficient and accurate gradients for neural SDEs"):
a Brownian motion W on [t0, t1] that answers W(tb) − W(ta) for any ta, tb, the same value on
every query in any order, so that a backward pass can query the increments of the forward pass
again instead of storing them.

The structure is a binary tree of intervals. The root is [t0, t1]; a node is split in two at a
query point (or at its midpoint, see below) and each node carries a 64-bit seed. A node's
increment is never stored for good: it is sampled from the Brownian bridge given its parent's
increment, with normal noise drawn from a `torch.Generator` seeded by the parent's seed, and kept
in a small LRU cache. When it has been evicted it is sampled again from the same seed, so every
query sees the same path whatever the cache did in between.

Bridge of a split [a, b] = [a, m] ∪ [m, b], h1 = m − a, h2 = b − m, h = h1 + h2, r_i = h_i / h,
given the parent's increment W (and space-time Lévy area H), Z1, Z2 ~ N(0, I) independent:

- increment only: W1 = r1 W + sqrt(h r1 r2) Z1, W2 = W − W1, i.e. W1 | W ~ N(r1 W, h1 h2 / h).
- with H (d = r1³ + r2³; the conditional law of (W1, H1) given (W, H) of the Gaussian vector of
  independent (W1, H1, W2, H2) and the aggregation rule below, written out in closed form):

      W1 = r1 W + 6 r1 r2 H + sqrt(h r1 r2 d) Z1,                       W2 = W − W1,
      H1 = r1² H − sqrt(h) r1^{5/2} r2^{1/2} / (2 sqrt d) Z1 + sqrt(h r1 r2³ / (12 d)) Z2,
      H2 = r2² H − sqrt(h) r1^{1/2} r2^{5/2} / (2 sqrt d) Z1 − sqrt(h r1³ r2 / (12 d)) Z2.

Space-time Lévy area (Foster's convention, diffrax's `SpaceTimeLevyArea.H`):
H_{s,t} = (1/h) ∫_s^t (W_r − W_s) dr − W_{s,t}/2, h = t − s, so H ~ N(0, h/12) independent of
W_{s,t}. torchsde's `return_U=True` returns U = ∫_s^t (W_r − W_s) dr = h (W_{s,t}/2 + H).
Over s < u < t (h1 = u − s, h2 = t − u):
H_{s,t} = (h1 H_{s,u} + h2 H_{u,t} + (h2 W_{s,u} − h1 W_{u,t})/2) / h.

Full Lévy area (levy_area="davie" or "foster", returned with `return_area=True`): the
antisymmetric matrix A_{s,t} = ½(∫ W^i dW^j − ∫ W^j dW^i) (W from W_s; i, j over the last
dimension, the leading dimensions are a batch; a `shape` of 0 or 1 dimensions is a batch of
scalar motions, whose area is 0, of `shape`, as in torchsde). Given (W, H) over [s, t],
A = H⊗W − W⊗H + b exactly (A_ij = H_i W_j − W_i H_j + b_ij), b the area of the bridge part,
Var(b_ij) = h²/12 (so Var(A_ij) = h²/4) and E[b_ij² | H] = h²/20 + (h/5)(H_i² + H_j²). Each
node's A is that mean plus λ, with λ_ij = −λ_ji for i < j independent normals from the node's
own seed (the same A on every query, like H), of variance
- Davie (Davie 2014; Foster 2020, "Numerical approximations for SDEs", §7): h²/12;
- Foster (ibid.): h²/20 + (h/5)(H_i² + H_j²), the exact conditional variance given (W, H).
torchsde 0.2.6 draws λ = σ(N − Nᵀ), twice these variances for Davie (h²/6) and with h²/50 for
Foster's constant: its A has Var(A_ij) = h²/3 (Davie), 11h²/50 (Foster) instead of h²/4.
A query over several nodes adds them by Chen's relation over s < u < t:
A_{s,t} = A_{s,u} + A_{u,t} + ½(W_{s,u}⊗W_{u,t} − W_{u,t}⊗W_{s,u}). A reversed query (tb < ta)
gives −A (the same curve traversed backwards). As in torchsde, a node's A is not Chen's sum of
its children's (each is its own approximation), so A depends on how the tree tiles a query.

Depth. Splitting every node at the query point itself turns a forward pass over a grid
t_0 < t_1 < ... into a chain of depth N, and re-sampling an evicted step at the end of the chain
then walks N nodes (the backward pass would cost O(N²)). So a node [a, b] is split at the query
point only when the point lies in its middle three quarters [a + (b−a)/8, b − (b−a)/8];
otherwise it is split at its midpoint and the half holding the point is treated the same way.
Every node is then at most 7/8 as long as its parent, the depth is O(log((t1 − t0) / δ)) for
query points δ apart, and a re-sample costs O(log) noise draws whatever the query order (the
chains of query splits inside one midpoint cell are ~8 long on an even grid, inside the cache).
This replaces torchsde's `dt` hint and its dependency tree: nothing has to be told in advance.
A forward pass over a grid of N steps draws about 2.2N samples, the backward pass as many.

Determinism. The path is a function of the seed and of the order in which new query points
first appear (as in torchsde, where only the much slower "halfway tree" removes the latter).
Once a point has been queried, every later query, in any order, returns bitwise the same values.
Times are compared exactly: a backward pass must query the same floats as the forward pass
(t + dt − dt is a different point, and its increment differs by O(sqrt(ulp))).

Memory. Tensors are held only by the LRU cache: at most `cache_size` intervals, each one
increment (and one Lévy area) of `shape`. The tree itself is made of small Python objects,
about 130 bytes a node (a slotted object, two floats and an int; measured with tracemalloc),
two new nodes per split; a grid of N steps creates about 3.5N nodes (the query splits and the
midpoint splits above them), so 10⁶ steps hold ~450 MB of tree.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import InvalidInputError, UnknownNameError, UnsupportedCombinationError

__all__ = ["BrownianInterval", "LEVY_AREAS"]

LEVY_AREAS = ("none", "space-time", "davie", "foster")

_MASK64 = (1 << 64) - 1
_LEFT_KEY = 0x243F6A8885A308D3  # arbitrary distinct 64-bit constants: the digits of pi
_RIGHT_KEY = 0x13198A2E03707344
_NOISE_KEY = 0xA4093822299F31D0
_ROOT_KEY = 0x082EFA98EC4E6C89
_AREA_KEY = 0xBE5466CF34E90C6C
_SPLIT_MARGIN = 0.125  # a node is split at a query point at least this fraction from its ends
_OUT_OF_RANGE_ULPS = 4  # a query this many ulps past t0 or t1 is clamped, beyond that refused


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters nearby inputs, used to
    derive a child's seed from its parent's (Steele, Lea and Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class _Node:
    """One interval [start, end] of the tree; `mid`, `left`, `right` are set once it is split."""

    __slots__ = ("start", "end", "parent", "seed", "mid", "left", "right")

    def __init__(self, start: float, end: float, parent: _Node | None, seed: int):
        self.start = start
        self.end = end
        self.parent = parent
        self.seed = seed
        self.mid: float | None = None
        self.left: _Node | None = None
        self.right: _Node | None = None


def _as_time(value: float | Tensor, name: str) -> float:
    """A query or end time as a Python float (tensors are read, so W is not differentiable in t)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise InvalidInputError(
                f"{name} must be a float or a 0-dim tensor, got a tensor of shape "
                f"{tuple(value.shape)}")
        value = value.item()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"{name} must be a float or a 0-dim tensor, got {value!r}") from None
    if not math.isfinite(out):
        raise InvalidInputError(f"{name} must be finite, got {out}")
    return out


class BrownianInterval:
    """A seeded Brownian motion of shape `shape` on [t0, t1], queried as increments.

    `bm(ta, tb)` is W(tb) − W(ta), `bm(ta)` is W(ta) − W(t0); with `levy_area="space-time"`,
    `bm(ta, tb, return_levy=True)` is (W(tb) − W(ta), H) with H the space-time Lévy area of the
    interval (module docstring); with levy_area="davie" or "foster" also, `return_area=True`
    adds A, the Davie or Foster approximation of the full Lévy area, of shape (*shape, d)
    (module docstring): `bm(ta, tb, return_levy=True, return_area=True)` is (W, H, A),
    `bm(ta, tb, return_area=True)` is (W, A). Times may be floats or 0-dim tensors; they are
    read as floats, so the increments are constants for autograd (a Brownian path has no time
    derivative).
    `seed=None` draws a seed from Python's `random` (torch's global RNG is never touched; the
    seed is kept in `.seed`). `cache_size` bounds the cached intervals (None: unbounded).
    """

    def __init__(self, t0: float | Tensor, t1: float | Tensor, shape: Sequence[int] | torch.Size,
                 *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int | None = None, levy_area: str = "none",
                 cache_size: int | None = 45):
        t0, t1 = _as_time(t0, "t0"), _as_time(t1, "t1")
        if not t0 < t1:
            raise InvalidInputError(f"BrownianInterval needs t0 < t1, got t0={t0}, t1={t1}")
        try:
            shape = torch.Size(shape)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"shape must be a sequence of non-negative ints, got {shape!r}") from None
        if any(n < 0 for n in shape):
            raise InvalidInputError(f"shape must be non-negative, got {tuple(shape)}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
            raise InvalidInputError(f"dtype must be a real floating dtype, got {dtype}")
        device = torch.device("cpu" if device is None else device)
        if levy_area not in LEVY_AREAS:
            raise UnknownNameError(
                f"unknown levy_area {levy_area!r}; valid: {', '.join(map(repr, LEVY_AREAS))}")
        if cache_size is not None and (not isinstance(cache_size, int) or cache_size < 0):
            raise InvalidInputError(
                f"cache_size must be a non-negative int or None (unbounded), got {cache_size!r}")
        if seed is None:
            seed = random.getrandbits(63)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MASK64:
            raise InvalidInputError(f"seed must be an int in [0, 2**64 - 1] or None, got {seed!r}")

        self._t0, self._t1 = t0, t1
        self._shape, self._dtype, self._device = shape, dtype, device
        self._levy_area, self._with_levy = levy_area, levy_area != "none"
        self._with_area = levy_area in ("davie", "foster")
        self._seed, self._cache_size = seed, cache_size
        self._tolerance = _OUT_OF_RANGE_ULPS * math.ulp(max(abs(t0), abs(t1)))
        self._root = _Node(t0, t1, None, _mix64(seed))
        self._last = self._root  # searches start here: queries tend to follow each other
        self._cache: OrderedDict[_Node, tuple[Tensor, Tensor | None]] = OrderedDict()
        self._generator: torch.Generator | None = None
        self._n_nodes = 1
        self._n_draws = 0

    # -- read-only description ------------------------------------------------------------------

    t0 = property(lambda self: self._t0, doc="Start of the interval (float).")
    t1 = property(lambda self: self._t1, doc="End of the interval (float).")
    shape = property(lambda self: self._shape, doc="Shape of every increment (torch.Size).")
    dtype = property(lambda self: self._dtype, doc="dtype of the increments.")
    device = property(lambda self: self._device, doc="device of the increments.")
    levy_area = property(lambda self: self._levy_area,
                         doc='"none", "space-time", "davie" or "foster".')
    seed = property(lambda self: self._seed, doc="The seed that determines the path.")
    cache_size = property(lambda self: self._cache_size, doc="Most intervals cached at once.")
    n_cached = property(lambda self: len(self._cache), doc="Intervals cached now.")
    n_nodes = property(lambda self: self._n_nodes, doc="Intervals in the tree (~130 B each).")
    n_draws = property(lambda self: self._n_draws,
                       doc="Normal samples drawn so far (one per split sampled): a cost counter.")

    def __repr__(self) -> str:
        return (f"BrownianInterval(t0={self._t0}, t1={self._t1}, shape={tuple(self._shape)}, "
                f"dtype={self._dtype}, device={self._device}, seed={self._seed}, "
                f"levy_area={self._levy_area!r}, cache_size={self._cache_size})")

    def reset_cache(self) -> None:
        """Drop every cached tensor (the path does not change: values are sampled again)."""
        self._cache.clear()
        self._generator = None

    # -- queries --------------------------------------------------------------------------------

    def __call__(self, ta: float | Tensor, tb: float | Tensor | None = None,
                 return_levy: bool = False, return_area: bool = False
                 ) -> Tensor | tuple[Tensor, ...]:
        """W(tb) − W(ta) (W(ta) − W(t0) when tb is None); with `return_levy`, also H; with
        `return_area`, also A (last): (W, H, A), (W, H) or (W, A).

        tb < ta gives exactly the negated increment of [tb, ta], the same H (the definition
        H = (1/(tb−ta)) ∫_ta^tb (W_r − W_ta) dr − (W_tb − W_ta)/2 is symmetric in (ta, tb))
        and −A.
        """
        if return_levy and not self._with_levy:
            raise UnsupportedCombinationError(
                "return_levy=True needs the space-time Lévy area: construct the BrownianInterval "
                "with levy_area='space-time' (or 'davie' / 'foster')")
        if return_area and not self._with_area:
            raise UnsupportedCombinationError(
                "return_area=True needs an approximation of the full Lévy area: construct the "
                "BrownianInterval with levy_area='davie' or 'foster'")
        if tb is None:
            ta, tb = self._t0, self._clamp(_as_time(ta, "ta"), "ta")
        else:
            ta, tb = self._clamp(_as_time(ta, "ta"), "ta"), self._clamp(_as_time(tb, "tb"), "tb")
        if ta == tb:
            zero = torch.zeros(self._shape, dtype=self._dtype, device=self._device)
            w, h, a = zero, zero.clone(), (torch.zeros(self._area_shape(), dtype=self._dtype,
                                                       device=self._device)
                                           if return_area else None)
        else:
            reverse = tb < ta
            if reverse:
                ta, tb = tb, ta
            w, h, a = self._increment(ta, tb, return_area)
            if reverse:
                w = -w
                a = -a if a is not None else None
        if not (return_levy or return_area):
            return w
        return (w,) + ((h,) if return_levy else ()) + ((a,) if return_area else ())

    def _area_shape(self) -> torch.Size:
        """(*shape, d) for a shape of 2 or more dimensions, else `shape` (module docstring)."""
        return self._shape + self._shape[-1:] if len(self._shape) >= 2 else self._shape

    def _clamp(self, t: float, name: str) -> float:
        if t < self._t0:
            if self._t0 - t > self._tolerance:
                raise InvalidInputError(
                    f"{name}={t} is outside the Brownian interval [{self._t0}, {self._t1}]")
            return self._t0
        if t > self._t1:
            if t - self._t1 > self._tolerance:
                raise InvalidInputError(
                    f"{name}={t} is outside the Brownian interval [{self._t0}, {self._t1}]")
            return self._t1
        return t

    def _increment(self, ta: float, tb: float, area: bool = False
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(W, H, A) over [ta, tb], ta < tb: the sum over the nodes that tile it (fresh tensors;
        A is None unless `area`), H and A by the aggregation rules of the module docstring."""
        nodes = self._tiling(ta, tb)
        w, h = self._values(nodes[0])
        a = self._area(nodes[0], w, h) if area else None
        if len(nodes) == 1:
            return w.clone(), (h.clone() if h is not None else None), a
        start = nodes[0].start
        pairs = len(self._shape) >= 2
        for node in nodes[1:]:
            w_i, h_i = self._values(node)
            if h is not None:
                before, length = node.start - start, node.end - node.start
                h = ((before * h + length * h_i + 0.5 * (length * w - before * w_i))
                     / (before + length))
            if a is not None:
                a = a + self._area(node, w_i, h_i)
                if pairs:
                    cross = w.unsqueeze(-1) * w_i.unsqueeze(-2)
                    a = a + 0.5 * (cross - cross.transpose(-1, -2))
            w = w + w_i
        return w, h, a

    def _area(self, node: _Node, w: Tensor, h: Tensor) -> Tensor:
        """A node's Davie or Foster area: H⊗W − W⊗H + λ, λ_ij = −λ_ji (i < j) normals from
        the node's seed, of variance h²/12 (Davie) or h²/20 + (h/5)(H_i² + H_j²) (Foster)."""
        if len(self._shape) < 2:
            return torch.zeros(self._shape, dtype=self._dtype, device=self._device)
        length = node.end - node.start
        if self._generator is None:
            self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(_mix64(node.seed ^ _AREA_KEY))
        self._n_draws += 1
        noise = torch.randn(self._area_shape(), dtype=self._dtype, device=self._device,
                            generator=self._generator).triu(1)
        noise = noise - noise.transpose(-1, -2)  # independent N(0, 1) above the diagonal
        if self._levy_area == "foster":
            square = h * h
            noise = noise * (length * length / 20
                             + length / 5 * (square.unsqueeze(-1) + square.unsqueeze(-2))).sqrt()
        else:
            noise = noise * math.sqrt(length * length / 12)
        mean = h.unsqueeze(-1) * w.unsqueeze(-2)
        return mean - mean.transpose(-1, -2) + noise

    # -- the tree -------------------------------------------------------------------------------

    def _tiling(self, ta: float, tb: float) -> list[_Node]:
        """The nodes that tile [ta, tb], left to right, splitting nodes where needed."""
        node = self._last
        while not (node.start <= ta and tb <= node.end):
            node = node.parent
        out: list[_Node] = []
        stack = [(node, ta, tb)]
        while stack:
            node, a, b = stack.pop()
            if a == node.start and b == node.end:
                out.append(node)
                continue
            if node.mid is None:
                self._split(node, a if a > node.start else b)
            mid = node.mid
            if b <= mid:
                stack.append((node.left, a, b))
            elif a >= mid:
                stack.append((node.right, a, b))
            else:
                stack.append((node.right, mid, b))
                stack.append((node.left, a, mid))
        self._last = out[-1]
        return out

    def _split(self, node: _Node, t: float) -> None:
        """Split `node` at t if t is in its middle three quarters, else at its midpoint (module
        docstring)."""
        margin = _SPLIT_MARGIN * (node.end - node.start)
        mid = t
        if not node.start + margin <= t <= node.end - margin:
            half = 0.5 * (node.start + node.end)
            if node.start < half < node.end:
                mid = half
        node.mid = mid
        node.left = _Node(node.start, mid, node, _mix64(node.seed ^ _LEFT_KEY))
        node.right = _Node(mid, node.end, node, _mix64(node.seed ^ _RIGHT_KEY))
        self._n_nodes += 2

    # -- values ---------------------------------------------------------------------------------

    def _values(self, node: _Node) -> tuple[Tensor, Tensor | None]:
        """(W, H) of a node: from the cache, else bridged down from the nearest cached ancestor."""
        path = []
        values = None
        while values is None:
            values = self._cache.get(node)
            if values is not None:
                self._cache.move_to_end(node)
            elif node.parent is None:
                values = self._root_values()
                self._remember(node, values)
            else:
                path.append(node)
                node = node.parent
        while path:
            child = path.pop()
            left, right = self._bridge(child.parent, values)
            if child is child.parent.left:
                self._remember(child.parent.right, right)
                values = left
            else:
                self._remember(child.parent.left, left)
                values = right
            self._remember(child, values)
        return values

    def _remember(self, node: _Node, values: tuple[Tensor, Tensor | None]) -> None:
        if self._cache_size == 0:
            return
        self._cache[node] = values
        self._cache.move_to_end(node)
        if self._cache_size is not None and len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _normals(self, seed: int) -> tuple[Tensor, Tensor | None]:
        """Z1 (and Z2 with Lévy area) ~ N(0, I) of `shape`, a function of `seed` only."""
        if self._generator is None:
            self._generator = torch.Generator(device=self._device)
        self._generator.manual_seed(seed)
        self._n_draws += 1
        kwargs = dict(dtype=self._dtype, device=self._device, generator=self._generator)
        z1 = torch.randn(self._shape, **kwargs)
        return z1, (torch.randn(self._shape, **kwargs) if self._with_levy else None)

    def _root_values(self) -> tuple[Tensor, Tensor | None]:
        """W ~ N(0, h), H ~ N(0, h/12) over [t0, t1], independent."""
        z1, z2 = self._normals(_mix64(self._root.seed ^ _ROOT_KEY))
        length = self._t1 - self._t0
        w = z1.mul_(math.sqrt(length))
        return w, (z2.mul_(math.sqrt(length / 12)) if z2 is not None else None)

    def _bridge(self, node: _Node, values: tuple[Tensor, Tensor | None]
                ) -> tuple[tuple[Tensor, Tensor | None], tuple[Tensor, Tensor | None]]:
        """The two children's (W, H) given the node's, by the bridge formulas of the module
        docstring; W_left + W_right = W up to one rounding."""
        w, h = values
        h1, h2 = node.mid - node.start, node.end - node.mid
        length = h1 + h2
        r1, r2 = h1 / length, h2 / length
        z1, z2 = self._normals(_mix64(node.seed ^ _NOISE_KEY))
        if h is None:
            w_left = torch.add(z1.mul_(math.sqrt(length * r1 * r2)), w, alpha=r1)
            return (w_left, None), (w - w_left, None)
        d = r1**3 + r2**3
        root_h, root_d = math.sqrt(length), math.sqrt(d)
        z1_left = -root_h * r1**2.5 * r2**0.5 / (2 * root_d)  # coefficients of Z1 in H1, H2
        z1_right = -root_h * r1**0.5 * r2**2.5 / (2 * root_d)
        w_left = torch.add(torch.add(w * r1, h, alpha=6 * r1 * r2), z1,
                           alpha=root_h * math.sqrt(r1 * r2 * d))
        h_left = torch.add(torch.add(h * r1**2, z1, alpha=z1_left),
                           z2, alpha=math.sqrt(length * r1 * r2**3 / (12 * d)))
        h_right = torch.add(torch.add(h * r2**2, z1, alpha=z1_right),
                            z2, alpha=-math.sqrt(length * r1**3 * r2 / (12 * d)))
        return (w_left, h_left), (w - w_left, h_right)
