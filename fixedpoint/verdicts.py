"""Trajectory verdicts: is a loop converged, converging, cycling, chaotic, drifting or diverging?

``classify`` reads a recorded trajectory (K, B, ...) — everything after dim 1 is one sample's state
vector — and labels every sample with per-sample reductions only (no Python loop over samples).
The rules are those of REFERENCE.md §4, which labelled 998 of 1000 held-out synthetic trajectories
at K = 256; they are applied in this order, the first that fires wins:

1. ``diverging``: a non-finite state, or a norm past sqrt(finfo.max) (about to overflow).
2. ``converged``: over the last K/8 states the state stays within ``tol`` of the final state.
3. ``diverging``: the residual envelope grows (max residual per window rises in every one of up
   to 8 windows over the last half, by more than ``envelope_factor`` in all).
4. ``periodic``: the smallest p in 2..p_max whose p-step return error ||z_{k+p} - z_k||, at its 90th
   percentile over the last max(K/4, 3 p_max) states (not the median: near-returns of a chaotic
   orbit fool it), is below ``period_tol`` times the mean step ||z_{k+1} - z_k|| there; samples
   whose envelope shrinks (rule 5) are excluded — an alternating convergence (-0.995) is not a
   cycle, and a slow monotone one returns ~p steps away.
5. ``converging``: the residual envelope shrinks (mirror of 3).
6. ``drifting``: over the last half, the distance between the centroids of its two halves exceeds
   the radius of gyration (uniform motion: ratio sqrt 3; bounded orbits: ~0).
7. otherwise ``aperiodic``; with ``f`` given, split by the finite-time largest Lyapunov exponent
   from the final state (Benettin et al. 1980): > ``lyapunov_eps`` ``chaotic``, within
   +-``lyapunov_eps`` ``quasi_periodic``; a clearly negative exponent keeps ``aperiodic`` (a
   contracting orbit that has not settled, e.g. onto a cycle longer than p_max).

Scale-free by construction, so the verdict is invariant to rotation, uniform scaling and offset of
the state space: every distance is divided by the trajectory's *scale*, its largest distance from
the final state ``max_k ||z_k - z_{K-1}||`` (REFERENCE.md §4 warns against ||f(z)||, which
vanishes at a fixed point 0; its "mean norm" is not offset-invariant, so the extent of the
trajectory is used instead). The one absolute term is the rounding floor
``2 eps(dtype) ||z_{K-1}||``: below it, differences are rounding noise of the stored states (it is
what keeps a large offset harmless). Tolerances default from the dtype (bf16/fp16 need ~1e-2)
and are overridable.

``rate`` is the per-step contraction factor of the residual norms: the geometric-mean ratio of
successive residuals, estimated as exp of the least-squares slope of log ||z_{k+1} - z_k|| over
the last half of the residuals above 4x the rounding floor (a plain mean of log-ratios telescopes
to its two endpoints and is noisy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fixedpoint import evidence
from fixedpoint.evidence import distances as _distances
from fixedpoint.evidence import q90 as _q90
from fixedpoint.spectral import _operator, spectral_radius, tangent_growth, whole_batch

LABELS = (
    "converged",
    "converging",
    "periodic",
    "quasi_periodic",
    "chaotic",
    "aperiodic",
    "drifting",
    "diverging",
    "undetermined",
)
_INDEX = {name: i for i, name in enumerate(LABELS)}
_UNDECIDED = -1

# Why a sample is ``undetermined`` (index 0: it is not). Each names what the label would need.
REASONS = (
    "",
    "too short for a trend: a growing or shrinking residual envelope needs 8 windows of >= 2 "
    "steps in the last half (K >= 33)",
    "too short to rule out a cycle: every period up to p_max needs 3 repeats in the window "
    "(K >= 3 p_max); record more steps or pass a smaller p_max",
    "the centroid moves, but uniform motion is not resolved from a slow contraction (the "
    "deceleration ratio's error exceeds 1% at the measured noise)",
    "the residuals grow but their growth decelerates (polynomial, like a non-normal transient "
    "of a contraction): pass f to decide",
    "tangent growth neither clearly exponential nor bounded (its error exceeds 4 nats), or the "
    "orbit from the final state overflowed (a noisy final state escaped the attractor)",
    "the states grow while the map's Jacobian reliably contracts (rho + error < 1)",
    "settled exactly on a fixed point whose Jacobian expands (rho - error > 1): rounding put it "
    "there, it is no attractor",
)
_SHORT_TREND, _SHORT_PERIOD, _DRIFT, _POLYNOMIAL, _GROWTH, _GROW_CONTRACT, _UNSTABLE = range(1, 8)
_ENVELOPE_WINDOWS, _ENVELOPE_LENGTH = 8, 2  # a monotone run of 8 happens by chance w.p. 1/8!
_REPEATS = 3  # a period p is believed after 3 repeats of it (2 returns of every state)
_RATE_FLOOR = 1e-3  # asymptotic log-growth per step that counts as exponential divergence
_SETTLED = 4  # converged: at least this many final states within tol

# (tol, period_tol) per dtype, relative to the trajectory's scale.
_DEFAULT_TOLS = {
    torch.float64: (1e-6, 1e-4),
    torch.float32: (1e-4, 1e-3),
    torch.bfloat16: (1e-2, 3e-2),
    torch.float16: (1e-2, 3e-2),
}


@dataclass
class Verdicts:
    """Per-sample trajectory verdicts; every field is flat over ``n = prod(shape)`` samples.

    Attributes:
        label: (n,) numpy array of str, each in ``LABELS``.
        period: (n,) int64 tensor, the period of ``periodic`` samples, else 0.
        rate: (n,) contraction factor per step of the residual norms (< 1 shrinking).
        residual: (n,) last residual ||z_{K-1} - z_{K-2}|| divided by the trajectory's scale.
        spectral_radius: (n,) Jacobian spectral radius at the final state (per-step Floquet
            multiplier of the cycle for periodic samples); NaN without ``f``.
        lyapunov: (n,) finite-time largest Lyapunov exponent from the final state; NaN without f.
        shape: batch shape: ``(B,)``, or ``(B, T)`` with ``per_token=True``.
        reason: (n,) numpy array of str: why an ``undetermined`` sample could not be decided
            (what the label would need, ``REASONS``); ``""`` for every other label.
    """

    label: np.ndarray
    period: Tensor
    rate: Tensor
    residual: Tensor
    spectral_radius: Tensor
    lyapunov: Tensor
    shape: tuple[int, ...]
    reason: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.reason is None:
            self.reason = np.full(len(self.label), "", dtype=object)

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> dict[str, int]:
        """Number of samples per label, every label of ``LABELS`` present (in that order)."""
        return {name: int((self.label == name).sum()) for name in LABELS}

    def as_dict(self) -> dict[str, np.ndarray]:
        """Columns as flat numpy arrays (``sample``, and ``token`` when per token), table-ready."""
        columns: dict[str, np.ndarray] = {}
        index = np.indices(self.shape).reshape(len(self.shape), -1)
        columns["sample"] = index[0]
        if len(self.shape) == 2:
            columns["token"] = index[1]
        columns["label"] = self.label
        for name in ("period", "rate", "residual", "spectral_radius", "lyapunov"):
            columns[name] = getattr(self, name).detach().cpu().numpy()
        return columns

    def grid(self, name: str) -> np.ndarray:
        """Field ``name`` reshaped to ``shape``, e.g. (B, T) labels of a per-token verdict."""
        if name not in ("label", "period", "rate", "residual", "spectral_radius", "lyapunov"):
            raise KeyError(f"unknown Verdicts field {name!r}")
        values = self.label if name == "label" else getattr(self, name).detach().cpu().numpy()
        return values.reshape(self.shape)


def default_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(tol, period_tol) for states of ``dtype``: fp64 (1e-6, 1e-4), fp32 (1e-4, 1e-3),
    bf16/fp16 (1e-2, 3e-2)."""
    return _DEFAULT_TOLS.get(dtype, _DEFAULT_TOLS[torch.float32])


def classify(
    states: Tensor,
    *,
    f: Callable[..., Tensor] | None = None,
    inputs: Any = None,
    tol: float | None = None,
    period_tol: float | None = None,
    p_max: int = 16,
    per_token: bool = False,
    envelope_factor: float = 1.1,
    lyapunov_steps: int = 128,
    lyapunov_max_steps: int = 4096,
    spectral_iters: int = 64,
    method: str = "vjp",
) -> Verdicts:
    """Label every trajectory of ``states`` (K, B, ...) by its long-run behaviour.

    Args:
        states: (K, B, ...) recorded states, K >= 8 (K ~ 256 separates slow convergence from
            cycles; with K <= 4 periodicity cannot be established).
        f: the map that produced the trajectory ((B, ...) -> (B, ...), any form ``solve``
            accepts); when given, ``aperiodic`` splits into ``chaotic`` / ``quasi_periodic`` (or
            ``undetermined``), an affine map's verdict follows its spectral radius, and the radius
            and Lyapunov exponent are filled in.
        inputs: per-sample inputs of ``f``, as for ``solve``.
        tol: convergence tolerance relative to the trajectory's scale; default from the dtype.
        period_tol: p-step return tolerance; default ``max(dtype default, 3 tol)``.
        p_max: largest period looked for.
        per_token: fold dim 2 (tokens) into the batch: each token's (K, ...) trajectory gets its own
            verdict; fields are flat (B*T,) with ``shape == (B, T)``. Spectral radius and Lyapunov
            exponent stay per sample (tokens interact) and are repeated over tokens; the sample's
            radius uses the lcm of its tokens' periods (one step if that exceeds ``p_max``).
        envelope_factor: total rise (fall) of the residual envelope that counts as growing
            (shrinking).
        lyapunov_steps: fewest tangent steps; aperiodic samples get up to ``lyapunov_max_steps``,
            at least 128 / omega with omega the orbit's turn per step (``fixedpoint.evidence``).
        lyapunov_max_steps: most tangent steps.
        spectral_iters: Krylov dimension of the spectral radius.
        method: how Jacobian products are taken for the map quantities, ``"vjp"`` (default:
            reverse mode works through every op) or ``"jvp"``.

    Returns:
        Verdicts.

    Example:
        >>> z = torch.randn(4, 8)
        >>> states = torch.stack([z * 0.5**k for k in range(64)])  # (64, 4, 8)
        >>> classify(states).counts()["converged"]  # 4
    """
    x, shape = _flatten(states, per_token)
    tol, period_tol = _tolerances(states.dtype, tol, period_tol)
    if not isinstance(p_max, int) or p_max < 2:
        raise ValueError(f"p_max must be an int >= 2, got {p_max!r}")
    if envelope_factor <= 1:
        raise ValueError(f"envelope_factor must be > 1, got {envelope_factor!r}")
    if not isinstance(lyapunov_max_steps, int) or lyapunov_max_steps < lyapunov_steps:
        raise ValueError(f"lyapunov_max_steps must be an int >= lyapunov_steps "
                         f"({lyapunov_steps}), got {lyapunov_max_steps!r}")
    eps = torch.finfo(states.dtype).eps
    label, period, rate, residual, noisy, why = _label_trajectories(
        x, tol, period_tol, p_max, eps, envelope_factor
    )
    n = x.shape[1]
    rho = torch.full((n,), math.nan, device=x.device)
    lyap = torch.full((n,), math.nan, device=x.device)
    if f is not None:
        evidence_ = _map_quantities(f, inputs, states, period, shape, p_max, spectral_iters,
                                    method, x, label, noisy, lyapunov_steps, lyapunov_max_steps)
        overflowed = ~torch.isfinite(residual)  # non-finite or past sqrt(finfo.max)
        nonfinite = overflowed & ~torch.isfinite(x.amax((0, 2)) - x.amin((0, 2)))
        label, rho, lyap, why = _weigh_map(label, noisy, why, evidence_, x.shape[0], nonfinite)
    why = torch.where(label == _INDEX["undetermined"], why, torch.zeros_like(why))
    names = np.asarray(LABELS)[label.cpu().numpy()]
    reasons = np.asarray(REASONS, dtype=object)[why.cpu().numpy()]
    return Verdicts(names, period, rate, residual, rho, lyap, shape, reasons)


def _tangent_steps(x: Tensor, label: Tensor, noisy: Tensor, affine: Tensor, low: int,
                   high: int) -> int:
    """Tangent steps for the Lyapunov evidence: enough orbit turns for the samples the map's
    growth may decide (aperiodic, noisy cycles, and the moving or undetermined samples of a
    non-affine map: a slow chaotic flow seen for a fraction of a turn looks like a drift, a
    convergence or nothing)."""
    moving = torch.zeros_like(noisy)
    for name in ("drifting", "converging", "undetermined", "diverging"):
        moving |= label == _INDEX[name]
    need = (label == _INDEX["aperiodic"]) | noisy | (moving & ~affine)
    if not bool(need.any()):
        return low
    omega = evidence.angular_speed(x[:, need]).clamp_min(1e-6)
    return int(min(high, max(low, math.ceil(float((96 / omega).max())))))


def _weigh_map(label: Tensor, noisy: Tensor, why: Tensor, ev: dict[str, Tensor], k: int,
               nonfinite: Tensor) -> tuple[Tensor, ...]:
    """Combine the trajectory's labels with the map's evidence (see the module docstring).

    ``nonfinite`` (n,): samples whose recorded states reached inf / NaN. They stay ``diverging``
    whatever the map says: the loop as computed overflowed (a Jordan block of eigenvalue 1.01
    embedded in fp32 is estimated at 0.97 +- 0.02 from a Krylov space its rounding scatters).
    """
    rho, error, lyap, code = ev["rho"], ev["rho_error"], ev["lyapunov"], ev["growth"]
    undetermined = label == _INDEX["undetermined"]
    # An affine map's fate is its spectral radius, whatever its transient growth looked like
    # (a Jordan block's norm grows ~1e7x before it decays), and whatever the data were too short
    # to show.
    moving = (label == _INDEX["diverging"]) | (label == _INDEX["drifting"]) | undetermined
    affine = ev["affine"] & moving
    # a bounded but unsettled orbit of a contracting affine map is a transient too; the
    # contraction must show within the K observed steps (a rotation rounded to |lambda| = 1 - 4e-8
    # is no convergence)
    settling = ev["affine"] & (moving | (label == _INDEX["aperiodic"]))
    visible = (1 - rho - error) * k > 1e-3
    label = torch.where(settling & visible & ~nonfinite, _INDEX["converging"], label)
    label = torch.where(affine & (rho - error > 1), _INDEX["diverging"], label)
    lyap = torch.where(ev["affine"], rho.clamp_min(1e-300).log(), lyap)
    aperiodic = label == _INDEX["aperiodic"]
    label = torch.where(aperiodic & (code == 1), _INDEX["chaotic"], label)
    label = torch.where(aperiodic & (code == 0), _INDEX["quasi_periodic"], label)
    label = torch.where(aperiodic & (code == 2), _INDEX["undetermined"], label)
    why = torch.where(aperiodic & (code == 2), _GROWTH, why)
    label = torch.where(noisy & (code == 1), _INDEX["chaotic"], label)  # band chaos, not a cycle
    # Exponential separation along the orbit is stronger evidence than a slow chaotic flow seen
    # for a fraction of a turn, which can look like a drift, a convergence or nothing decidable.
    # Only for non-affine maps: an affine map's tangent growth is its spectral radius, above.
    unsure = (label == _INDEX["drifting"]) | (label == _INDEX["undetermined"])
    unsure |= (label == _INDEX["converging"]) & ~ev["affine"]
    label = torch.where(unsure & (code == 1) & ~settling, _INDEX["chaotic"], label)
    # Growth of the states under a Jacobian that contracts reliably, on a non-affine map: the
    # data support neither verdict.
    growing = (label == _INDEX["diverging"]) & ~ev["affine"] & (rho + error < 1)
    label = torch.where(growing, _INDEX["undetermined"], label)
    why = torch.where(growing, _GROW_CONTRACT, why)
    # Settled on a fixed point that repels (logistic r = 4 in float32 rounds onto 0).
    unstable = (label == _INDEX["converged"]) & (rho - error > 1)
    label = torch.where(unstable, _INDEX["undetermined"], label)
    why = torch.where(unstable, _UNSTABLE, why)
    return label, rho, lyap, why


def _flatten(states: Tensor, per_token: bool) -> tuple[Tensor, tuple[int, ...]]:
    """(K, B, ...) -> (K, n, M) in float32/float64 and the batch shape."""
    if not isinstance(states, Tensor):
        raise TypeError(f"states must be a torch.Tensor (K, B, ...), got {type(states).__name__}")
    if not (states.is_floating_point()):
        raise TypeError(f"states must be floating point, got dtype {states.dtype}")
    min_dim = 3 if per_token else 2
    if states.dim() < min_dim:
        what = "(K, B, T, ...)" if per_token else "(K, B, ...)"
        raise ValueError(f"states must be {what}, got shape {tuple(states.shape)}")
    if states.shape[0] < 8:
        raise ValueError(f"need K >= 8 states to classify a trajectory, got K={states.shape[0]}")
    if states.numel() == 0:
        raise ValueError(f"states must hold at least one sample with at least one value, got "
                         f"shape {tuple(states.shape)}")
    shape = tuple(states.shape[1:3]) if per_token else (states.shape[1],)
    k, n = states.shape[0], math.prod(shape)
    work = torch.float64 if states.dtype == torch.float64 else torch.float32
    return states.detach().reshape(k, n, -1).to(work), shape  # (K, n, M)


def _tolerances(dtype: torch.dtype, tol: float | None, period_tol: float | None) -> tuple:
    default_tol, default_period = default_tolerances(dtype)
    for name, value in (("tol", tol), ("period_tol", period_tol)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    tol = default_tol if tol is None else float(tol)
    if period_tol is None:
        period_tol = max(default_period, 3 * tol)
    return tol, float(period_tol)


def _label_trajectories(
    x: Tensor, tol: float, period_tol: float, p_max: int, eps: float, envelope_factor: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rules 1-7 on (K, n, M) states: label index (n,), period, rate, relative last residual,
    which periods were found only up to the measured noise floor, and the reason index (n,) of
    each ``undetermined`` sample (``REASONS``).

    Minimum evidence: each label is only given when the data hold what it needs, else the sample
    is ``undetermined`` with the reason: ``converged`` >= 4 settled states; a residual trend
    (``converging`` / ``diverging`` by the envelope) 8 windows of >= 2 steps; ``periodic(p)`` 3
    repeats of p; ``aperiodic`` every period up to ``p_max`` testable (3 p_max states);
    ``drifting`` a uniform motion resolved from a deceleration; ``diverging`` by the envelope a
    growth that does not decelerate (exponential, not a polynomial transient).

    Two full passes over the states (steps, distances from the final state); everything after
    works on (K, n) reductions or on the still undecided samples only.
    """
    k, n, _ = x.shape
    label = torch.full((n,), _UNDECIDED, dtype=torch.long, device=x.device)
    period = torch.zeros(n, dtype=torch.long, device=x.device)
    step = _distances(x[1:], x[:-1])  # (K-1, n)
    from_last = _distances(x, x[-1])  # (K, n)
    scale = from_last.amax(0)
    # A non-finite state makes some step non-finite; a huge one overflows the squared norms.
    overflow = math.sqrt(torch.finfo(x.dtype).max)
    bad = ~torch.isfinite(step).all(0) | ~torch.isfinite(scale) | (scale > overflow)
    label[bad] = _INDEX["diverging"]
    why = torch.zeros_like(label)
    # Rounding floor: differences below a few ulps of the final state are noise.
    final_norm = torch.linalg.vector_norm(x[-1], dim=-1).nan_to_num(0.0, 0.0, 0.0)
    floor = 2 * eps * final_norm + torch.finfo(x.dtype).tiny

    settled = from_last[-max(_SETTLED, k // 8) :].amax(0) <= tol * scale + floor
    settled |= evidence.settled_in_noise(x, scale, floor)  # converged up to measured noise
    _decide(label, settled, "converged")
    growing, shrinking, polynomial, short = _envelope_trend(step, envelope_factor)
    _decide(label, growing & ~polynomial, "diverging")
    _undetermined(label, why, growing & polynomial, _POLYNOMIAL)
    window = min(k, max(k // 4, _REPEATS * p_max))
    motion = step[-(window - 1) :].mean(0)  # mean step over the window: the orbit's own size
    atol = motion * period_tol + floor
    _find_periods(x[k - window :], from_last[k - window :], label, period, ~shrinking, atol, p_max)
    rows = ((label == _UNDECIDED) & ~shrinking).nonzero().squeeze(1)
    noisy_period = evidence.noisy_periods(x[k - window :], rows, motion, floor,
                                          min(p_max, window // _REPEATS))
    noisy = torch.zeros_like(bad)
    noisy[rows[noisy_period > 0]] = True
    period[rows[noisy_period > 0]] = noisy_period[noisy_period > 0]
    label[rows[noisy_period > 0]] = _INDEX["periodic"]
    _decide(label, shrinking, "converging")
    _undetermined(label, why, short, _SHORT_TREND)  # nothing below decides a short trend
    rows = (label == _UNDECIDED).nonzero().squeeze(1)
    rows = rows[_drifting(x, rows)]
    slowing, uniform = evidence.drift_verdict(x, rows)  # a slow contraction, not a drift
    label[rows[slowing]] = _INDEX["converging"]
    label[rows[uniform & ~slowing]] = _INDEX["drifting"]
    _undetermined(label, why, torch.zeros_like(bad).index_fill_(0, rows, True), _DRIFT)
    # aperiodic claims no period up to p_max: each must have been testable with _REPEATS (3) repeats
    if window < _REPEATS * p_max:
        _undetermined(label, why, torch.ones_like(bad), _SHORT_PERIOD)
    _decide(label, torch.ones_like(bad), "aperiodic")

    rate = _contraction_rate(step, floor)
    residual = step[-1] / scale.clamp_min(torch.finfo(x.dtype).tiny)
    residual = torch.where(bad, torch.full_like(residual, math.inf), residual)
    return label, period, rate, residual, noisy, why


def _undetermined(label: Tensor, why: Tensor, condition: Tensor, reason: int) -> None:
    """Mark the still undecided samples where ``condition`` holds ``undetermined`` (in place)."""
    chosen = (label == _UNDECIDED) & condition
    label[chosen] = _INDEX["undetermined"]
    why[chosen] = reason


def _decide(label: Tensor, condition: Tensor, name: str) -> None:
    """Give ``name`` to the still undecided samples where ``condition`` holds (in place)."""
    label[(label == _UNDECIDED) & condition] = _INDEX[name]


def _envelope_trend(step: Tensor, factor: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Growing / shrinking residual envelope over the last half, four (n,) bool masks: growing,
    shrinking, growth that decelerates, and too short to tell.

    The envelope is the largest residual in each of 8 equal windows; it grows when it rises
    from every window to the next and by more than ``factor`` overall (a monotone run of 8 happens
    by chance with probability 1/8! = 2.5e-5 in a bounded chaotic orbit). Windows hold >= 2 steps
    (the max of one alternating step is no envelope), so a trend needs K >= 33; shorter
    trajectories get neither (``short``). Growth decelerates when the log-envelope rose in the last
    three windows by less than 0.8 of what it rose in the first three: exponential divergence rises
    steadily, the transient k^(s-1) rho^k of a size-s Jordan block (rho < 1) slows down.
    """
    tail = step.shape[0] // 2
    length = tail // _ENVELOPE_WINDOWS
    n = step.shape[1]
    if length < _ENVELOPE_LENGTH:
        no = torch.zeros(n, dtype=torch.bool, device=step.device)
        return no, no, no, torch.ones_like(no)
    windows = _ENVELOPE_WINDOWS
    recent = step[step.shape[0] - windows * length :]  # (windows*length, n)
    envelope = recent.reshape(windows, length, -1).amax(1)  # (windows, n)
    rising = (envelope[1:] > envelope[:-1]).all(0)
    falling = (envelope[1:] < envelope[:-1]).all(0)
    growing = rising & (envelope[-1] > factor * envelope[0])
    shrinking = falling & (envelope[-1] * factor < envelope[0])
    log_env = envelope.clamp_min(torch.finfo(step.dtype).tiny).log()
    early, late = log_env[3] - log_env[0], log_env[-1] - log_env[-4]
    polynomial = growing & (late < 0.8 * early)
    if bool(polynomial.any()):
        # a decelerating growth whose rate still tends to a clearly positive limit is divergence
        # with a polynomial prefactor (a Jordan block of eigenvalue 1.01), not a transient
        ends = torch.arange(1, windows + 1, device=step.device) * length
        ends = ends + (step.shape[0] - windows * length)
        rows = polynomial.nonzero().squeeze(1)
        # the limit must be clear against the rate still observed (a tenth of it): rounding of
        # a dense embedding turns a huge transient into a slow growth whose onset is no evidence
        observed = late[rows] / (3 * length)
        limit = torch.clamp(0.1 * observed, min=_RATE_FLOOR)
        exponential = evidence.asymptotic_rate(log_env[:, rows], ends) > limit
        polynomial[rows[exponential]] = False
    return growing, shrinking, polynomial, torch.zeros_like(growing)


def _find_periods(
    recent: Tensor,
    from_last: Tensor,
    label: Tensor,
    period: Tensor,
    eligible: Tensor,
    atol: Tensor,
    p_max: int,
) -> None:
    """Rule 4, in place: smallest p whose 90th-percentile p-step return error is below ``atol``.

    ``recent`` (W, n, M) holds the last W states and ``from_last`` (W, n) their distances from the
    final state. ``atol`` is relative to the mean step size in the window, so a cycle must return
    much closer than it moves (a slow monotone convergence returns about p steps away, never
    closer). A shrinking residual envelope is not a cycle (-0.995 alternates but converges). Only
    undecided eligible samples are examined.

    Cost: two filters rule out (p, sample) pairs with lower bounds of the return distance, and
    the exact elementwise check runs only on the survivors (the verdict is the exact check's):
    |d(z_{k+p}, z_end) - d(z_k, z_end)| is free and rules out nearly every chaotic or
    quasi-periodic sample; a batched Gram matrix of the centred window then bounds the rest.
    """
    rows = ((label == _UNDECIDED) & eligible).nonzero().squeeze(1)
    p_top = min(p_max, recent.shape[0] // _REPEATS)
    if rows.numel() == 0 or p_top < 2:
        return
    anchor = from_last[:, rows]  # (W, r)
    possible = torch.stack(
        [_q90((anchor[p:] - anchor[:-p]).abs()) <= 2 * atol[rows] for p in range(2, p_top + 1)]
    )  # (p_top - 1, r)
    keep = possible.any(0)
    rows, possible = rows[keep], possible[:, keep]
    if rows.numel() == 0:
        return
    recent = recent[:, rows]  # (W, r, M)
    possible &= _gram_possible(recent, atol[rows], p_top)
    for p in range(2, p_top + 1):
        cand = possible[p - 2].nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        window = recent[:, cand]  # (W, c, M)
        returns = _distances(window[p:], window[:-p])  # (W-p, c)
        found = cand[_q90(returns) <= atol[rows[cand]]]
        # an orbit still closing in on a d-cycle (d | p) returns within tol only at lag p: its lag-d
        # returns shrink (Henon a = 0.9, 2-step multiplier near -1, read period 4)
        period[rows[found]] = _settling_divisor(recent[:, found], p)
        label[rows[found]] = _INDEX["periodic"]
        possible[:, found] = False


def _settling_divisor(window: Tensor, p: int) -> Tensor:
    """(c,) for (W, c, M) states that return within tol at lag p: the smallest divisor d >= 2 of p
    whose lag-d return errors shrink (8-window envelope falling in every window, by > 1.1 in all)
    — the orbit converges onto that d-cycle — else p."""
    out = torch.full((window.shape[1],), p, dtype=torch.long, device=window.device)
    for d in range(p - 1, 1, -1):  # descending, so the smallest shrinking divisor wins
        if p % d:
            continue
        returns = _distances(window[d:], window[:-d])  # (W-d, c)
        length = returns.shape[0] // _ENVELOPE_WINDOWS
        if length < _ENVELOPE_LENGTH:
            continue
        env = returns[-_ENVELOPE_WINDOWS * length:].reshape(_ENVELOPE_WINDOWS, length, -1).amax(1)
        shrinking = (env[1:] < env[:-1]).all(0) & (env[-1] * 1.1 < env[0])
        out = torch.where(shrinking, torch.full_like(out, d), out)
    return out


def _gram_possible(recent: Tensor, atol: Tensor, p_top: int) -> Tensor:
    """Which periods 2..p_top a sample may have: (p_top - 1, r) bool, never wrongly False.

    Squared distances from the Gram matrix of the centred window, ``|a-b|^2 = aa + bb - 2ab``,
    carry a rounding error of at most about ``M eps (|a|^2 + |b|^2)`` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, §3.1: a length-M dot product errs by <= M u sum|a_i b_i|);
    subtracting it gives a lower bound of each return distance, and the 90th percentile is monotone,
    so a p whose lower bound fails the test (with a factor 2 margin) cannot pass the exact one.
    """
    dim = recent.shape[2]
    centred = (recent - recent.mean(0)).transpose(0, 1)  # (r, W, M)
    gram = centred @ centred.transpose(1, 2)  # (r, W, W)
    sq_norm = torch.diagonal(gram, dim1=1, dim2=2)  # (r, W)
    slack = (dim + 4) * torch.finfo(recent.dtype).eps
    possible = []
    for p in range(2, p_top + 1):
        a, b = sq_norm[:, :-p], sq_norm[:, p:]  # (r, W-p)
        sq_dist = a + b - 2 * torch.diagonal(gram, offset=p, dim1=1, dim2=2)
        lower = (sq_dist - slack * (a + b)).clamp_min(0).sqrt()
        possible.append(_q90(lower.T) <= 2 * atol)
    return torch.stack(possible)  # (p_top - 1, r)


def _drifting(x: Tensor, rows: Tensor) -> Tensor:
    """Rule 6 for samples ``rows``: over the last half, centroid drift > radius of gyration."""
    tail = x[x.shape[0] - x.shape[0] // 2 :]  # (K/2, n, M)
    if rows.numel() < tail.shape[1] // 2:  # copy the few rows; else compute all on the view
        tail = tail[:, rows]
    half = tail.shape[0] // 2
    early, late = tail[:half].mean(0), tail[half:].mean(0)  # (r, M)
    drift = torch.linalg.vector_norm(late - early, dim=-1)  # (r,)
    centre = (early * half + late * (tail.shape[0] - half)) / tail.shape[0]
    spread = _distances(tail, centre).square().mean(0).sqrt()
    drifting = drift > spread
    return drifting if drifting.shape[0] == rows.numel() else drifting[rows]


def _contraction_rate(step: Tensor, floor: Tensor) -> Tensor:
    """exp(least-squares slope of log residual over the last half of those above the floor)."""
    valid = step > 4 * floor  # (K-1, n): above rounding noise
    # Rank of each residual among the valid ones counted from the end; keep the last half.
    from_end = valid.flip(0).cumsum(0).flip(0)  # (K-1, n): valid residuals at or after k
    keep = valid & (from_end <= ((valid.sum(0) + 1) // 2).clamp_min(3))
    weight = keep.to(step.dtype)
    t = torch.arange(step.shape[0], dtype=step.dtype, device=step.device)[:, None]
    log_step = step.clamp_min(torch.finfo(step.dtype).tiny).log()
    count = weight.sum(0).clamp_min(1)
    t_mean = (weight * t).sum(0) / count
    y_mean = (weight * log_step).sum(0) / count
    cov = (weight * (t - t_mean) * (log_step - y_mean)).sum(0)
    var = (weight * (t - t_mean).square()).sum(0)
    slope = cov / var.clamp_min(torch.finfo(step.dtype).tiny)
    return torch.where(keep.sum(0) >= 2, slope.exp(), torch.full_like(slope, math.nan))


def _affine_along(g: Callable[[Tensor], Tensor], states: Tensor, method: str) -> Tensor:
    """(B,) bool: the same Jacobian at 8 states spread over the trajectory (an affine map).

    Eight, not two: a piecewise-linear map (the tent map) has one Jacobian per branch, and all
    eight states fall on one branch with probability 2^-7 only.
    """
    k = states.shape[0]
    picks = sorted({k - 1 - (i * (k - 1)) // 8 for i in range(8)})
    gen = torch.Generator(device="cpu").manual_seed(1)
    final = states[-1].detach()
    v = torch.randn(final.reshape(final.shape[0], -1).shape, generator=gen, dtype=torch.float64)
    v = v.to(final.device)
    eps = torch.finfo(states.dtype).eps
    ref = _operator(g, final, method)(v)
    same = torch.ones(final.shape[0], dtype=torch.bool, device=final.device)
    for index in picks[:-1]:
        other = _operator(g, states[index].detach(), method)(v)
        size = torch.maximum(torch.linalg.vector_norm(ref, dim=1),
                             torch.linalg.vector_norm(other, dim=1))
        same &= torch.linalg.vector_norm(ref - other, dim=1) <= 1e3 * eps * size + 1e-300
    return same


def _per_trajectory(values: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Per-sample (B,) values repeated over the tokens of a per-token verdict: (n,)."""
    return values.repeat_interleave(shape[1]) if len(shape) == 2 else values


def _map_quantities(
    f: Callable[..., Tensor],
    inputs: Any,
    states: Tensor,
    period: Tensor,
    shape: tuple[int, ...],
    p_max: int,
    spectral_iters: int,
    method: str,
    x: Tensor,
    label: Tensor,
    noisy: Tensor,
    low_steps: int,
    high_steps: int,
) -> dict[str, Tensor]:
    """Spectral radius with error (p-step for period-p samples), Jacobian constancy and tangent
    growth from the final state, per sample (repeated over tokens)."""
    final = states[-1].detach()  # (B, ...)
    batch = final.shape[0]
    per_sample_period = period
    if len(shape) == 2:  # a sample cycles with the lcm of its tokens' periods
        lcm = np.lcm.reduce(period.reshape(shape).clamp_min(1).cpu().numpy(), axis=1)
        lcm[lcm > p_max] = 1
        per_sample_period = torch.as_tensor(lcm, device=period.device)
    rho = torch.full((batch,), math.nan, device=final.device)
    error = torch.full_like(rho, math.inf)
    for p in per_sample_period.clamp_min(1).unique().tolist():
        # The whole batch per distinct period keeps f's batch contract (rows need not be subset).
        est = spectral_radius(f, final, spectral_iters, inputs=inputs, period=int(p),
                              method=method, with_error=True)
        chosen = per_sample_period.clamp_min(1) == p
        rho = torch.where(chosen, est.rho.to(rho), rho)
        error = torch.where(chosen, est.error.to(rho), error)
    g = whole_batch(f, batch, inputs)
    affine = _affine_along(g, states, method)
    lyapunov_steps = _tangent_steps(x, label, noisy, _per_trajectory(affine, shape), low_steps,
                                    high_steps)
    growth = tangent_growth(f, final, lyapunov_steps, warmup=8, method=method, inputs=inputs)
    code, lyap = evidence.growth_verdict(growth.to(rho))
    out = {"rho": rho, "rho_error": error, "lyapunov": lyap, "growth": code, "affine": affine}
    if len(shape) == 2:
        out = {key: value.repeat_interleave(shape[1]) for key, value in out.items()}
    return out
