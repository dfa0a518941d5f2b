"""Dynamical systems with known long-run behaviour: the validation suite for trajectory verdicts.

Each :class:`System` is a batched torch map with a sampler of initial states and the label (and
period) :func:`fixedpoint.verdicts.classify` must give at the validation horizon K = 256 loops
(REFERENCE.md §4: linear maps, rotations, spirals, logistic map regimes, Hénon map, tanh
contractions, plus drifting systems). ``System.embed`` places a system in a higher-dimensional
state space under a random rotation and offset, ``f_E(y) = Q f(Q^T (y - o)) + o`` with zeros in the
extra coordinates, so tests can check that verdicts do not depend on the coordinates.

Known answers, with the source of each:
- linear ``x* + A (x - x*)``: converges iff the spectral radius < 1; eigenvalue -1 gives a
  2-cycle, |lambda| > 1 diverges. |lambda| = 0.995 still moves after 256 steps (0.995^256 = 0.28),
  hence ``converging``; 0.9^256 ~ 2e-12, hence ``converged``.
- rotation by 2pi/n: period n; by the golden angle 2pi(1 - 1/phi): quasi-periodic (irrational
  rotation number; no return closer than 0.2 radii within 16 steps).
- logistic map x -> r x (1 - x) (May 1976, Nature 261): r = 2.8 stable fixed point (multiplier
  -0.8); 3.2 stable 2-cycle; 3.5 stable 4-cycle; 3.83 stable 3-cycle (period-3 window opens at
  1 + sqrt 8 = 3.8284); r = 4 chaotic with Lyapunov exponent ln 2. Computed in float64: in float32
  x ~ 1/2 rounds 4x(1 - x) to exactly 1 and then 0 (about 4% of r = 4 orbits die within 400 steps).
- Hénon map a = 1.4, b = 0.3 (Hénon 1976, Commun. Math. Phys. 50): chaotic, largest Lyapunov
  exponent ~0.42.
- tanh(W x + b) with ||W||_2 = 0.8 < 1: a contraction (tanh is 1-Lipschitz), unique fixed point.
- translation x + c and a helix (rotation plus translation): no attractor, the centroid drifts.
- logistic windows r = 3.56 (period 8) and 3.74 (period 5): stable cycles inside
  the chaotic range (May 1976); checked by iterating 5000 steps in float64.
- tent map with slope 1.9: chaotic, Lyapunov exponent ln 1.9 (slope 2 collapses to 0 in binary
  floating point, so it is not used).
- Henon map b = 0.3 at a = 1.0 (stable 4-cycle) and a = 1.25 (stable 7-cycle, a periodic window).
- Chirikov standard map ``p' = p + K sin t, t' = t + p'`` on the torus, embedded as
  (cos t, sin t, cos p, sin p) so that no coordinate wraps: K = 0.5 near the elliptic point
  (pi, 0) is a KAM island (quasi-periodic); K = 6 is the chaotic sea (exponent ~ ln(K/2)).
- Lorenz system (sigma 10, rho 28, beta 8/3) by RK4 with dt = 0.01: chaotic, largest exponent
  ~0.9 per time unit = ~0.009 per step (Sprott, *Chaos and Time-Series Analysis*, 2003).
- Jordan blocks of eigenvalue 0.95, sizes 8 and 16: stable (rho 0.95) despite transient growth of
  ~1e7 in norm; still growing or barely turning at K = 256, hence ``converging``.
- slow contraction z -> c + 0.999 (z - c): 0.999^256 = 0.77, hence ``converging``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from common.registry import Registry

Sampler = Callable[[int, torch.Generator], Tensor]
GOLDEN_ANGLE = 2 * math.pi * (1 - 2 / (1 + math.sqrt(5)))


@dataclass(frozen=True)
class System:
    """A batched map with known behaviour.

    Attributes:
        name: registry name, e.g. ``"logistic_3.5"``.
        f: (B, dim) -> (B, dim), rows independent, device and dtype of its input.
        sample: ``sample(batch, generator) -> (batch, dim)`` initial states (CPU, ``dtype``).
        label: the verdict expected at K = 256 when the map is given to ``classify`` (``chaotic``
            and ``quasi_periodic`` read ``aperiodic`` without it).
        period: expected period (0 unless ``label == "periodic"``).
        dim: state dimension.
        dtype: dtype the trajectory is computed in.
        note: one line on why the answer is known.
    """

    name: str
    f: Callable[[Tensor], Tensor]
    sample: Sampler
    label: str
    period: int
    dim: int
    dtype: torch.dtype = torch.float32
    note: str = ""
    embedding: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def embed(self, dim: int, seed: int = 0, offset_scale: float = 1.0) -> System:
        """This system in ``dim`` dimensions under a random rotation ``Q`` and offset ``o``.

        ``f_E(y) = Q pad(f((Q^T (y - o))[:, :d])) + o`` where ``pad`` appends zeros; initial states
        are ``o + Q pad(x0)``. Labels and periods are unchanged.

        Args:
            dim: embedding dimension, >= ``self.dim``.
            seed: seeds ``Q`` (Haar-random orthogonal via QR) and ``o`` (N(0, offset_scale^2)).
            offset_scale: standard deviation of each offset coordinate.
        """
        if not isinstance(dim, int) or dim < self.dim:
            raise ValueError(
                f"embedding dim must be an int >= {self.dim} for {self.name}, got {dim!r}"
            )
        gen = torch.Generator().manual_seed(seed)
        gauss = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        q = (q * torch.sign(torch.diagonal(r))).to(self.dtype)  # Haar measure: fix column signs
        offset = offset_scale * torch.randn(dim, generator=gen, dtype=torch.float64)
        offset = offset.to(self.dtype)
        small, inner_f, inner_sample = self.dim, self.f, self.sample

        def f_embedded(y: Tensor) -> Tensor:
            qy, oy = q.to(y), offset.to(y)
            x = ((y - oy) @ qy)[:, :small]  # (B, d): coordinates in the system's own space
            return inner_f(x) @ qy[:, :small].T + oy  # (B, dim)

        def sample_embedded(batch: int, generator: torch.Generator) -> Tensor:
            x = inner_sample(batch, generator)  # (B, d)
            return x @ q[:, :small].T + offset  # (B, dim)

        return replace(
            self,
            name=f"{self.name}@{dim}",
            f=f_embedded,
            sample=sample_embedded,
            dim=dim,
            embedding={"rotation": q, "offset": offset},
        )


SYSTEMS: Registry[System] = Registry("system")


def get_system(name: str) -> System:
    """The registered system ``name``; ``KeyError`` listing the known names otherwise."""
    return SYSTEMS.get(name)


def all_systems() -> list[System]:
    """Every registered system, sorted by name."""
    return [SYSTEMS.get(name) for name in SYSTEMS]


def trajectory(
    system: System,
    steps: int,
    batch: int,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Iterate ``system.f`` from sampled initial states: (steps, batch, dim), row 0 the start.

    Args:
        system: the system to run.
        steps: number of states K (the first is the sampled initial state).
        batch: trajectories B.
        seed: seeds the initial-state sampler.
        device: where to compute (default CPU).
    """
    if not isinstance(system, System):
        raise TypeError(f"system must be a System, got {type(system).__name__}")
    if not isinstance(steps, int) or steps < 1 or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"steps and batch must be ints >= 1, got steps={steps!r}, batch={batch!r}")
    gen = torch.Generator().manual_seed(seed)
    z = system.sample(batch, gen).to(device=device, dtype=system.dtype)
    states = [z]
    with torch.no_grad():
        for _ in range(steps - 1):
            z = system.f(z)
            states.append(z)
    return torch.stack(states)  # (K, B, dim)


# --- constructors -----------------------------------------------------------------------------


def _uniform(low: float, high: float, dim: int, dtype: torch.dtype = torch.float32) -> Sampler:
    def sample(batch: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(batch, dim, generator=generator, dtype=torch.float64)
        return (low + (high - low) * u).to(dtype)

    return sample


def _affine(matrix: Tensor, center: Tensor) -> Callable[[Tensor], Tensor]:
    """x -> center + (x - center) A^T for a (d, d) matrix and (d,) center."""

    def f(x: Tensor) -> Tensor:
        c = center.to(x)
        return c + (x - c) @ matrix.to(x).T

    return f


def _rotation(angle: float, scale: float = 1.0) -> Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return scale * torch.tensor([[c, -s], [s, c]])


def _linear(eigenvalue: float) -> System:
    # Dominant eigenvalue `eigenvalue`, the others smaller in modulus, in a non-orthogonal basis.
    basis = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.3, 0.0, 1.0]])
    diag = torch.diag(torch.tensor([1.0, 0.6, 0.3]) * eigenvalue)
    matrix = basis @ diag @ torch.linalg.inv(basis)
    if abs(eigenvalue) > 1:
        label, period = "diverging", 0
    elif eigenvalue == -1:
        label, period = "periodic", 2
    elif abs(eigenvalue) >= 0.99:
        label, period = "converging", 0
    else:
        label, period = "converged", 0
    return System(
        name=f"linear{eigenvalue:+g}",
        f=_affine(matrix, torch.tensor([0.5, -0.25, 1.0])),
        sample=_uniform(-1.0, 1.0, 3),
        label=label,
        period=period,
        dim=3,
        note=f"affine map with dominant eigenvalue {eigenvalue:+g}",
    )


def _planar(name: str, matrix: Tensor, label: str, period: int, note: str) -> System:
    return System(
        name=name,
        f=_affine(matrix, torch.tensor([0.3, -0.7])),
        sample=_uniform(-1.0, 1.0, 2),
        label=label,
        period=period,
        dim=2,
        note=note,
    )


def _logistic(r: float, label: str, period: int) -> System:
    def f(x: Tensor) -> Tensor:
        return r * x * (1 - x)

    return System(
        name=f"logistic_{r:g}",
        f=f,
        sample=_uniform(0.05, 0.95, 1, torch.float64),
        label=label,
        period=period,
        dim=1,
        dtype=torch.float64,
        note=f"logistic map r = {r:g}",
    )


def _henon(x: Tensor, a: float = 1.4, b: float = 0.3) -> Tensor:
    u, v = x[:, 0], x[:, 1]
    return torch.stack([1 - a * u * u + v, b * u], dim=1)  # (B, 2)


def _tanh_contraction() -> System:
    gen = torch.Generator().manual_seed(1234)
    weight = torch.randn(8, 8, generator=gen)
    weight = 0.8 * weight / torch.linalg.matrix_norm(weight, ord=2)
    bias = 0.5 * torch.randn(8, generator=gen)
    return System(
        name="tanh_contraction",
        f=lambda x: torch.tanh(x @ weight.to(x).T + bias.to(x)),
        sample=_uniform(-2.0, 2.0, 8),
        label="converged",
        period=0,
        dim=8,
        note="tanh(W x + b), ||W||_2 = 0.8",
    )


def _torus() -> System:
    # Two incommensurate rotations (golden angle, sqrt(2) rad): orbit dense on a 2-torus.
    block = torch.zeros(4, 4)
    block[:2, :2] = _rotation(GOLDEN_ANGLE)
    block[2:, 2:] = _rotation(math.sqrt(2.0))
    return System(
        name="torus",
        f=_affine(block, torch.tensor([0.1, 0.2, -0.3, 0.4])),
        sample=_uniform(-1.0, 1.0, 4),
        label="quasi_periodic",
        period=0,
        dim=4,
        note="two incommensurate rotations",
    )


def _helix() -> System:
    rotation = torch.zeros(3, 3)
    rotation[:2, :2] = _rotation(0.7)
    rotation[2, 2] = 1.0
    step = torch.tensor([0.0, 0.0, 0.05])
    return System(
        name="helix",
        f=lambda x: x @ rotation.to(x).T + step.to(x),
        sample=_uniform(-1.0, 1.0, 3),
        label="drifting",
        period=0,
        dim=3,
        note="rotation in a plane plus a constant step along its normal",
    )


def _tent(x: Tensor) -> Tensor:
    return 1.9 * torch.minimum(x, 1 - x)


def _standard(kick: float) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        theta, momentum = torch.atan2(x[:, 1], x[:, 0]), torch.atan2(x[:, 3], x[:, 2])
        momentum = momentum + kick * torch.sin(theta)
        theta = theta + momentum
        return torch.stack([theta.cos(), theta.sin(), momentum.cos(), momentum.sin()], 1)

    return f


def _standard_sample(centre: tuple[float, float], spread: float) -> Sampler:
    def sample(batch: int, generator: torch.Generator) -> Tensor:
        u = torch.rand(batch, 2, generator=generator, dtype=torch.float64) * 2 - 1
        theta, momentum = centre[0] + spread * u[:, 0], centre[1] + spread * u[:, 1]
        return torch.stack([theta.cos(), theta.sin(), momentum.cos(), momentum.sin()], 1)

    return sample


def _lorenz(x: Tensor, dt: float = 0.01) -> Tensor:
    def field(s: Tensor) -> Tensor:
        a, b, c = s[:, 0], s[:, 1], s[:, 2]
        return torch.stack([10 * (b - a), a * (28 - c) - b, a * b - 8 / 3 * c], 1)

    k1 = field(x)
    k2 = field(x + 0.5 * dt * k1)
    k3 = field(x + 0.5 * dt * k2)
    k4 = field(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def _lorenz_sample(batch: int, generator: torch.Generator) -> Tensor:
    x = torch.tensor([1.0, 1.0, 20.0], dtype=torch.float64) + torch.randn(
        batch, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(1000):  # onto the attractor
            x = _lorenz(x)
    return x


def _jordan_system(size: int) -> System:
    return System(
        name=f"jordan{size}_0.95",
        f=_affine(jordan_matrix(size, 0.95), torch.zeros(size, dtype=torch.float64)),
        sample=_uniform(-1.0, 1.0, size, torch.float64),
        label="converging",
        period=0,
        dim=size,
        dtype=torch.float64,  # in float32 a dense embedding perturbs the spectrum by ~0.4
        note=f"{size}x{size} Jordan block, eigenvalue 0.95: transient growth, then decay",
    )


def _register_new() -> None:
    for r, period in ((3.56, 8), (3.74, 5)):
        SYSTEMS.register(f"logistic_{r:g}", _logistic(r, "periodic", period))
    SYSTEMS.register("tent_1.9", System("tent_1.9", _tent, _uniform(0.05, 0.95, 1, torch.float64),
                                        "chaotic", 0, 1, torch.float64, "tent map slope 1.9"))
    for a, period in ((1.0, 4), (1.25, 7)):
        SYSTEMS.register(f"henon_{a:g}", System(
            f"henon_{a:g}", lambda x, a=a: _henon(x, a=a), _uniform(-0.1, 0.1, 2, torch.float64),
            "periodic", period, 2, torch.float64, f"Henon map a = {a:g}, b = 0.3"))
    SYSTEMS.register("standard_island", System(
        "standard_island", _standard(0.5), _standard_sample((math.pi, 0.0), 0.3),
        "quasi_periodic", 0, 4, torch.float64, "standard map K = 0.5 near (pi, 0)"))
    SYSTEMS.register("standard_sea", System(
        "standard_sea", _standard(6.0), _standard_sample((1.0, 1.0), 1.0),
        "chaotic", 0, 4, torch.float64, "standard map K = 6"))
    SYSTEMS.register("lorenz", System("lorenz", _lorenz, _lorenz_sample, "chaotic", 0, 3,
                                      torch.float64, "Lorenz RK4 dt 0.01"))
    for size in (8, 16):
        SYSTEMS.register(f"jordan{size}_0.95", _jordan_system(size))
    SYSTEMS.register("slow_contraction", System(
        "slow_contraction", _affine(0.999 * torch.eye(3), torch.tensor([0.2, -0.1, 0.4])),
        _uniform(-1.0, 1.0, 3), "converging", 0, 3, note="z -> c + 0.999 (z - c)"))


def _register_all() -> None:
    for eigenvalue in (0.5, 0.9, -0.9, 0.995, -0.995, -1.0, 1.05, -1.05):
        SYSTEMS.register(f"linear{eigenvalue:+g}", _linear(eigenvalue))
    planar = [
        ("rotation_3", _rotation(2 * math.pi / 3), "periodic", 3, "rotation by 2pi/3"),
        ("rotation_5", _rotation(2 * math.pi / 5), "periodic", 5, "rotation by 2pi/5"),
        ("rotation_golden", _rotation(GOLDEN_ANGLE), "quasi_periodic", 0, "golden-angle rotation"),
        ("spiral_fast", _rotation(1.0, 0.9), "converged", 0, "rotation by 1 rad scaled 0.9"),
        ("spiral_slow", _rotation(0.3, 0.99), "converging", 0, "rotation by 0.3 rad scaled 0.99"),
    ]
    for name, matrix, label, period, note in planar:
        SYSTEMS.register(name, _planar(name, matrix, label, period, note))
    for r, label, period in [
        (2.8, "converged", 0),
        (3.2, "periodic", 2),
        (3.5, "periodic", 4),
        (3.83, "periodic", 3),
        (4.0, "chaotic", 0),
    ]:
        SYSTEMS.register(f"logistic_{r:g}", _logistic(r, label, period))
    SYSTEMS.register(
        "henon",
        System(
            name="henon",
            f=_henon,
            sample=_uniform(-0.1, 0.1, 2),
            label="chaotic",
            period=0,
            dim=2,
            note="Henon map a = 1.4, b = 0.3",
        ),
    )
    SYSTEMS.register("tanh_contraction", _tanh_contraction())
    SYSTEMS.register("torus", _torus())
    SYSTEMS.register(
        "translation",
        System(
            name="translation",
            f=lambda x: x + 0.01,
            sample=_uniform(-1.0, 1.0, 2),
            label="drifting",
            period=0,
            dim=2,
            note="x + c",
        ),
    )
    SYSTEMS.register("helix", _helix())
    _register_new()


def random_orthogonal(dim: int, seed: int = 0) -> Tensor:
    """A Haar-random (dim, dim) float64 orthogonal matrix (QR of a Gaussian, signs fixed)."""
    gauss = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r))


def jordan_matrix(size: int, eigenvalue: float) -> Tensor:
    """The (size, size) float64 Jordan block: ``eigenvalue`` on the diagonal, ones above it."""
    return eigenvalue * torch.eye(size, dtype=torch.float64) + torch.diag(
        torch.ones(size - 1, dtype=torch.float64), 1)


_register_all()
