r"""Per-loop diagnostics of a looped model's trajectory (REFERENCE.md §4).

Notation: a recorded trajectory ``states`` has shape (K+1, B, T, D) and holds h_0 (the initial
state) and h_1 .. h_K (after loops 1 .. K). The update of loop k is D_k = h_k - h_{k-1}. Norms of a
sample are Frobenius norms over its (T, D) block; batch values are means over samples. Everything is
accumulated in float64 whatever the input dtype unless a function is given ``dtype=torch.float32``
(the evaluator does: float32 trajectories need no float64 copy, and the values then differ from
the float64 ones by float32 rounding only — bounded in tests/experiments/test_diagnostics_fast.py);
every loop-indexed result has K entries, entry k-1 belonging to loop k (NaN where a loop has no
value, e.g. cos_prev at loop 1).

* relative residual r_k = ||D_k|| / ||h_k||.
* update coherence: cos_prev_k = cos(D_k, D_{k-1}); cos_total_k = cos(D_k, h_K - h_0). A cosine
  of -1 does not by itself mean non-convergence (lin(-0.9) converges, lin(-1) cycles, lin(-1.05)
  diverges, all with cosine -1); read it beside the residual and the period-2 return error.
* period-2 return error e_k = ||h_k - h_{k-2}|| / ||h_k|| (small while r_k stays large = a 2-cycle).
* attention divergence: Jensen-Shannon divergence between two attention distributions per head and
  query, JS(p, q) = KL(p||m)/2 + KL(q||m)/2 with m = (p + q)/2, averaged; 0 <= JS <= ln 2.
* effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective
  dimensionality"): exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j over the singular values of
  the (uncentred) matrix X; the identity of size n has effective rank n.
* participation ratio (sum_i l_i)^2 / sum_i l_i^2 over the eigenvalues of the covariance of X.
* linear CKA (Kornblith et al. 2019, "Similarity of neural network representations revisited"):
  ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (N, D); invariant to orthogonal
  maps and isotropic scaling.
* logit lens (nostalgebraist 2020; Belrose et al. 2023): KL(p_final || p_k) per loop, with p_k the
  softmax of the readout after loop k, averaged over tokens.
* distance to the final state ||h_k - h_K|| per token, and PCA phase portraits (the two leading
  principal components fitted on the tail of the trajectory, all states projected): Huginn's
  trajectory study (Geiping et al. 2025, arXiv 2502.05171, §7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from common.constants import IGNORE_INDEX

EPS = 1e-12
CKA_BLOCK_ENTRIES = 2**24  # entries of one band of cka_matrix's cross-covariance product
IGNORE = IGNORE_INDEX


def _trajectory(states: Tensor | Sequence[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    """Stack/validate a (K+1, B, T, D) trajectory (a (K+1, B, D) one gets T = 1) in ``dtype``
    (no copy when it already is)."""
    if not isinstance(states, Tensor):
        states = torch.stack(list(states))
    if states.dim() == 3:
        states = states.unsqueeze(2)  # (K+1, B, 1, D)
    if states.dim() != 4:
        raise ValueError(f"states must have shape (K+1, B, T, D), got {tuple(states.shape)}")
    if states.shape[0] < 2:
        raise ValueError(f"states need at least 2 entries (h_0 and h_1), got {states.shape[0]}")
    return states.detach().to(dtype)


def finite_per_sample(states: Tensor) -> Tensor:
    """(B,) bool of a (K+1, B, T, D) trajectory: no NaN/Inf anywhere in the sample's states.

    Two reductions instead of an elementwise ``isfinite`` of the whole trajectory (about 8x
    cheaper on the study's (33, 1024, 25, 64) trajectories): the sample's largest and smallest
    values are both finite exactly when all of them are (a NaN propagates through ``amax`` /
    ``amin``, +-Inf is the extreme itself)."""
    flat = states.flatten(start_dim=2)  # (K+1, B, T*D)
    return (torch.isfinite(flat.amax(dim=2).amax(dim=0))
            & torch.isfinite(flat.amin(dim=2).amin(dim=0)))


def _sample_norm(x: Tensor) -> Tensor:
    return x.flatten(start_dim=-2).norm(dim=-1)  # (..., B) over (T, D)


def _sample_cos(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.flatten(start_dim=-2), b.flatten(start_dim=-2)  # (..., B, T*D)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=EPS)


def relative_residual(states: Tensor, per_sample: bool = False,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """||h_k - h_{k-1}|| / ||h_k|| for k = 1..K: (K,) batch mean, or (B, K) with ``per_sample``."""
    h = _trajectory(states, dtype)
    ratio = _sample_norm(h[1:] - h[:-1]) / _sample_norm(h[1:]).clamp(min=EPS)  # (K, B)
    return ratio.T if per_sample else ratio.mean(dim=1)


def update_coherence(states: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """(cos(D_k, D_{k-1}), cos(D_k, h_K - h_0)) per loop k, each (K,); cos_prev[0] is NaN."""
    h = _trajectory(states, dtype)
    updates = h[1:] - h[:-1]  # (K, B, T, D)
    cos_prev = torch.full((updates.shape[0],), math.nan, dtype=h.dtype, device=h.device)
    if updates.shape[0] > 1:
        cos_prev[1:] = _sample_cos(updates[1:], updates[:-1]).mean(dim=1)
    total = (h[-1] - h[0]).expand_as(updates)
    return cos_prev, _sample_cos(updates, total).mean(dim=1)


def period2_return_error(states: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """||h_k - h_{k-2}|| / ||h_k|| per loop k = 1..K (K,); loop 1 is NaN (no h_{-1})."""
    h = _trajectory(states, dtype)
    out = torch.full((h.shape[0] - 1,), math.nan, dtype=h.dtype, device=h.device)
    if h.shape[0] > 2:
        err = _sample_norm(h[2:] - h[:-2]) / _sample_norm(h[2:]).clamp(min=EPS)  # (K-1, B)
        out[1:] = err.mean(dim=1)
    return out


def attention_js(p: Tensor, q: Tensor) -> Tensor:
    """Mean Jensen-Shannon divergence (nats) between attention maps ``p`` and ``q`` (..., T_k).

    The last dim is the key axis (each row a distribution); all other dims (batch, head, query) are
    averaged. Rows whose mass is zero in both (fully masked queries) are skipped.
    """
    if p.shape != q.shape:
        raise ValueError(f"attention shapes differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = p.detach().double(), q.detach().double()
    m = 0.5 * (p + q)

    def kl_to_m(x: Tensor) -> Tensor:
        return torch.where(x > 0, x * (x.clamp(min=EPS) / m.clamp(min=EPS)).log(), 0.0).sum(-1)

    js = 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)  # (...)
    live = (p.sum(-1) > 0) | (q.sum(-1) > 0)
    return js[live].mean() if live.any() else js.new_tensor(math.nan)


def _rows(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    if x.dim() < 2:
        raise ValueError(f"expected a matrix (N, D) or (..., D), got shape {tuple(x.shape)}")
    return x.detach().to(dtype).reshape(-1, x.shape[-1])  # (N, D)


def effective_rank(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Roy & Vetterli effective rank of ``x`` (N, D) (leading dims are flattened into N)."""
    sv = torch.linalg.svdvals(_rows(x, dtype))
    if sv.sum() <= 0:
        return sv.new_zeros(())
    p = sv / sv.sum()
    entropy = -torch.where(p > 0, p * p.clamp(min=EPS).log(), 0.0).sum()
    return entropy.exp()


def participation_ratio(x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """(sum l)^2 / sum l^2 over eigenvalues l of the covariance of ``x`` (N, D)."""
    rows = _rows(x, dtype)
    centred = rows - rows.mean(dim=0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / max(rows.shape[0] - 1, 1)).clamp(min=0)
    denom = (eig**2).sum()
    return eig.sum() ** 2 / denom if denom > 0 else eig.new_zeros(())


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between representations ``x`` (N, D1) and ``y`` (N, D2) of the same N rows."""
    a, b = _rows(x), _rows(y)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"CKA needs the same rows: {a.shape[0]} vs {b.shape[0]}")
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    cross = (b.T @ a).square().sum()
    denom = (a.T @ a).norm() * (b.T @ b).norm()
    return cross / denom if denom > 0 else cross.new_tensor(math.nan)


def cka_matrix(states: Tensor, max_rows: int = 2048, dtype: torch.dtype = torch.float64) -> Tensor:
    """Linear CKA between every pair of states h_0..h_K: (K+1, K+1), symmetric, diagonal 1.

    Each state's (B, T, D) is flattened to (B*T, D); above ``max_rows`` rows an evenly strided
    subset is used. All cross-covariances come from one product: with the centred states side by
    side, A = [X_0 .. X_K] (N, (K+1) D), block (i, j) of A^T A is X_i^T X_j, whose squared
    Frobenius norm is CKA's numerator (its diagonal blocks give the denominators).
    """
    h = _trajectory(states, dtype)
    flat = h.reshape(h.shape[0], -1, h.shape[-1])  # (K+1, N, D)
    if flat.shape[1] > max_rows:
        flat = flat[:, torch.linspace(0, flat.shape[1] - 1, max_rows).long()]
    flat = flat - flat.mean(dim=1, keepdim=True)
    n, rows, width = flat.shape
    side = flat.permute(1, 0, 2).reshape(rows, n * width)  # (N, (K+1) D)
    # a band of states at a time keeps the product's memory bounded for wide or long trajectories
    band = max(1, CKA_BLOCK_ENTRIES // (width * n * width))
    cross = torch.empty(n, n, dtype=flat.dtype, device=flat.device)
    for start in range(0, n, band):
        stop = min(n, start + band)
        blocks = side[:, start * width:stop * width].T @ side  # rows: X_i^T, i in the band
        blocks = blocks.reshape(stop - start, width, n, width)  # [i, :, j, :] = X_i^T X_j
        cross[start:stop] = blocks.square().sum(dim=(1, 3))  # ||X_i^T X_j||_F^2
    gram_norm = cross.diagonal().sqrt()  # ||X_i^T X_i||_F
    out = cross / (gram_norm[:, None] * gram_norm[None, :]).clamp(min=EPS)
    out.fill_diagonal_(1.0)
    return out


def logit_lens_kl(logits_per_loop: Tensor | Sequence[Tensor], final: Tensor,
                  chunk_rows: int = 4096) -> Tensor:
    """KL(p_final || p_k) per loop (K,), averaged over tokens; computed ``chunk_rows`` at a time.

    Args:
        logits_per_loop: (K, B, T, V) readout logits after each loop (or a list of (B, T, V)).
        final: (B, T, V) the reference logits (usually the last loop's).
    """
    if not isinstance(logits_per_loop, Tensor):
        logits_per_loop = torch.stack(list(logits_per_loop))
    if logits_per_loop.shape[1:] != final.shape:
        raise ValueError(f"per-loop logits {tuple(logits_per_loop.shape)} do not match final "
                         f"{tuple(final.shape)} (expected (K, *final.shape))")
    vocab = final.shape[-1]
    per_loop = logits_per_loop.detach().reshape(logits_per_loop.shape[0], -1, vocab)  # (K, N, V)
    reference = final.detach().reshape(-1, vocab)  # (N, V)
    totals = torch.zeros(per_loop.shape[0], dtype=torch.float64, device=per_loop.device)
    for start in range(0, reference.shape[0], chunk_rows):
        log_ref = reference[start:start + chunk_rows].double().log_softmax(-1)  # (n, V)
        log_k = per_loop[:, start:start + chunk_rows].double().log_softmax(-1)  # (K, n, V)
        totals += (log_ref.exp() * (log_ref - log_k)).sum(-1).sum(-1)
    return totals / max(reference.shape[0], 1)


def distance_to_final(states: Tensor, relative: bool = False,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """||h_k - h_K|| per token for k = 1..K: (B, T, K); ``relative`` divides by ||h_K||."""
    h = _trajectory(states, dtype)
    dist = (h[1:] - h[-1]).norm(dim=-1)  # (K, B, T)
    if relative:
        dist = dist / h[-1].norm(dim=-1).clamp(min=EPS)
    return dist.permute(1, 2, 0)  # (B, T, K)


def pca_portrait(states: Tensor, tail: int = 8, components: int = 2,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """Project every state on the principal axes of the trajectory's last ``tail`` states.

    Returns:
        (K+1, B, T, components) coordinates; the axes are fitted on the pooled token states of
        h_{K-tail+1}..h_K (all samples, all tokens; non-finite states are left out of the fit and
        project to NaN), centred on their mean.
    """
    h = _trajectory(states, dtype)
    if tail < 1:
        raise ValueError(f"tail must be >= 1, got {tail!r}")
    fit = h[-min(tail, h.shape[0]):].reshape(-1, h.shape[-1])  # (tail*B*T, D)
    fit = fit[torch.isfinite(fit).all(dim=1)]  # diverged states would break the SVD
    if fit.shape[0] == 0:
        return h.new_full((*h.shape[:-1], components), math.nan)
    mean = fit.mean(dim=0)
    _, _, vh = torch.linalg.svd(fit - mean, full_matrices=False)
    axes = vh[:components].T  # (D, c)
    if axes.shape[1] < components:  # fewer features than components: pad with zeros
        axes = torch.cat([axes, axes.new_zeros(axes.shape[0], components - axes.shape[1])], 1)
    return (h - mean) @ axes  # (K+1, B, T, c)


def _sequence_accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    mask = targets != IGNORE
    right = (logits.argmax(-1) == targets.to(logits.device)) | ~mask
    return right.all(dim=-1)


def _attention_rows(attention: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """JS between the attention of loop k and loop k-1 for each matching (layer, kind)."""
    by_key: dict[tuple[int, int, str], Tensor] = {}
    for entry in attention:
        by_key[(int(entry["loop"]), int(entry["layer"]), str(entry["kind"]))] = entry["probs"]
    per_loop: dict[int, list[float]] = {}
    for (step, layer, kind), probs in by_key.items():
        previous = by_key.get((step - 1, layer, kind))
        if previous is not None and previous.shape == probs.shape:
            per_loop.setdefault(step + 1, []).append(float(attention_js(probs, previous)))
    return [(loop, sum(v) / len(v)) for loop, v in sorted(per_loop.items())]


def per_loop_table(
    states: Tensor,
    attention: list[dict[str, Any]] | None = None,
    step_logits: Tensor | None = None,
    targets: Tensor | None = None,
    score_fn: Callable[[Tensor, Tensor], Any] | None = None,
    dtype: torch.dtype = torch.float64,
) -> pd.DataFrame:
    """Every diagnostic per loop k >= 1 as a long table with columns (loop, metric, value).

    Args:
        states: (K+1, B, T, D) trajectory h_0..h_K; samples with a non-finite value anywhere
            (diverged) are left out of the state diagnostics instead of making them NaN.
        attention: captured attention, a list of ``{"loop", "layer", "kind", "probs"}`` where
            ``loop`` is the 0-based step index (as ``LoopContext.attention`` records it); the JS
            divergence of loop k is against loop k-1, matched by (layer, kind).
        step_logits: (K, B, T, V) readout logits after each loop 1..K (enables the logit lens and,
            with ``targets``, ``accuracy_at_loop``).
        targets: (B, T) targets with -100 ignored.
        score_fn: ``score_fn(logits, targets)`` returning a (B,) bool tensor or a dict with
            ``correct``; default: every target position right.
        dtype: the dtype of the state diagnostics (float64 by default; see module docstring).

    Returns:
        DataFrame with rows for relative_residual, cos_prev, cos_total, period2_return_error,
        effective_rank, participation_ratio, cka@j (j = 1..K, at loop i), and when given:
        attention_js, logit_lens_kl, accuracy_at_loop. NaN values are dropped.
    """
    h = _trajectory(states, dtype)
    n_loops = h.shape[0] - 1
    rows: list[tuple[int, str, float]] = []

    def add(metric: str, values: Tensor) -> None:
        rows.extend((k + 1, metric, float(v)) for k, v in enumerate(values.tolist()))

    # A diverged sample (NaN/Inf anywhere in its trajectory) would turn every batch statistic into
    # NaN, or make the SVD fail: the state diagnostics describe the samples that stayed finite.
    finite = finite_per_sample(h)  # (B,)
    h = h[:, finite]
    if h.shape[1] > 0:
        _state_rows(h, n_loops, add, rows)
    if attention:
        rows.extend((loop, "attention_js", value) for loop, value in _attention_rows(attention))
    if step_logits is not None:
        if step_logits.shape[0] != n_loops:
            raise ValueError(f"step_logits has {step_logits.shape[0]} loops, states {n_loops}")
        add("logit_lens_kl", logit_lens_kl(step_logits, step_logits[-1]))
        if targets is not None:
            add("accuracy_at_loop", torch.tensor([
                _correct(score_fn, step_logits[k], targets).double().mean().item()
                for k in range(n_loops)]))
    table = pd.DataFrame(rows, columns=["loop", "metric", "value"])
    return table[table["value"].notna()].reset_index(drop=True)


def _state_rows(h: Tensor, n_loops: int, add: Callable[[str, Tensor], None],
                rows: list[tuple[int, str, float]]) -> None:
    """The diagnostics of the states themselves (residual, coherence, rank, CKA)."""
    dtype = h.dtype  # the caller's choice, made in per_loop_table
    for metric, values in _step_metrics(h).items():
        add(metric, values)
    add("effective_rank", torch.stack([effective_rank(h[k], dtype)
                                       for k in range(1, n_loops + 1)]))
    add("participation_ratio",
        torch.stack([participation_ratio(h[k], dtype) for k in range(1, n_loops + 1)]))
    cka = cka_matrix(h, dtype=dtype)
    for i in range(1, n_loops + 1):
        rows.extend((i, f"cka@{j}", float(cka[i, j])) for j in range(1, n_loops + 1))


def _step_metrics(h: Tensor) -> dict[str, Tensor]:
    """``relative_residual``, ``cos_prev``, ``cos_total`` and ``period2_return_error`` of the
    trajectory ``h`` (K+1, B, T, D), in this order, from one pass: the updates D_k, their norms and
    the norms of the states are computed once and shared (the four functions above each recompute
    them, and ``update_coherence`` takes the norm of h_K - h_0 once per loop). Every value is the
    same reduction of the same numbers as in those functions, so the results are bit-identical
    (tests/experiments/test_diagnostics_shared.py)."""
    flat = h.flatten(start_dim=-2)  # (K+1, B, T*D)
    updates = flat[1:] - flat[:-1]  # (K, B, T*D)
    update_norm = updates.norm(dim=-1)  # (K, B)
    state_norm = flat[1:].norm(dim=-1)  # (K, B): ||h_k||, k = 1..K
    n_loops = updates.shape[0]
    residual = (update_norm / state_norm.clamp(min=EPS)).mean(dim=1)
    cos_prev = torch.full((n_loops,), math.nan, dtype=h.dtype, device=h.device)
    period2 = torch.full((n_loops,), math.nan, dtype=h.dtype, device=h.device)
    if n_loops > 1:
        dots = (updates[1:] * updates[:-1]).sum(-1)
        cos_prev[1:] = (dots / (update_norm[1:] * update_norm[:-1]).clamp(min=EPS)).mean(dim=1)
        back = (flat[2:] - flat[:-2]).norm(dim=-1)  # (K-1, B)
        period2[1:] = (back / state_norm[1:].clamp(min=EPS)).mean(dim=1)
    total = flat[-1] - flat[0]  # (B, T*D)
    dots = (updates * total).sum(-1)
    cos_total = (dots / (update_norm * total.norm(dim=-1)).clamp(min=EPS)).mean(dim=1)
    return {"relative_residual": residual, "cos_prev": cos_prev, "cos_total": cos_total,
            "period2_return_error": period2}


def _correct(score_fn: Callable[[Tensor, Tensor], Any] | None, logits: Tensor,
             targets: Tensor) -> Tensor:
    if score_fn is None:
        return _sequence_accuracy(logits, targets)
    scored = score_fn(logits, targets)
    return (scored["correct"] if isinstance(scored, dict) else scored).detach().cpu()
