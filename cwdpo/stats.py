"""Statistics of the tables: confidence intervals, paired bootstrap, win-rates, convergence, verdicts.

- `seed_ci`: mean and a Student-t 95% interval over seeds (scipy.stats.t).
- `paired_bootstrap_ci`: percentile interval of the mean difference of two systems' per-image scores,
  resampling test images with replacement (scipy.stats.bootstrap, paired) — used when there are fewer
  than `min_seeds_for_t` seeds.
- `hierarchical_bootstrap_ci`: percentile interval of the mean over seeds of A − B, resampling seeds and,
  within each seed, test images (the same images for A and B: a paired design); it carries both the
  training (seed) and the test-set (image) variance.
- `verdict`: a claim "A > B" (or "A < B") holds when the 95% interval of its effect lies above 0, does
  not hold when it lies below the smallest effect of interest δ (fixed before the runs), and is
  inconclusive otherwise — decided by the interval, never by eye.
- `win_rate`: per image 1 when A's score beats B's, ½ on a tie, 0 otherwise; averaged over images.
- `convergence_step`: the first step at which a curve reaches `frac` (95%) of its final value.
No torch import.
"""
from __future__ import annotations

import math

import numpy as np


def seed_ci(values: list, level: float = 0.95) -> tuple:
    """(mean, lo, hi) with a t-interval; (mean, None, None) for fewer than two values."""
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(vals) == 0:
        return None, None, None
    m = float(vals.mean())
    if len(vals) < 2:
        return m, None, None
    from scipy import stats
    half = float(stats.t.ppf(0.5 + level / 2, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals)))
    return m, m - half, m + half


def paired_bootstrap_ci(a: list, b: list, level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple:
    """(mean(a − b), lo, hi): percentile bootstrap over paired items (test images)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError("paired samples must have the same, non-zero length")
    diff = a - b
    if np.all(diff == diff[0]):
        return float(diff[0]), float(diff[0]), float(diff[0])
    from scipy import stats
    res = stats.bootstrap((diff,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True)
    return float(diff.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def hierarchical_bootstrap_ci(a: list, b: list, level: float = 0.95, n_resamples: int = 2000,
                              seed: int = 0) -> tuple:
    """(mean over seeds of mean_i(A − B), lo, hi): a two-level percentile bootstrap. `a`, `b`: per-image
    values [seeds][images], paired by seed and image. Each resample draws seeds with replacement and,
    within each drawn seed, images with replacement (the same images for A and B)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError("per-image values must be [seeds][images] with the same shape for A and B")
    s, n = d.shape
    rng = np.random.default_rng(seed)
    stats_ = np.empty(n_resamples)
    for start in range(0, n_resamples, 200):  # blocks of resamples keep the index arrays small
        r = min(200, n_resamples - start)
        seeds = rng.integers(0, s, (r, s))
        images = rng.integers(0, n, (r, s, n))
        stats_[start:start + r] = d[seeds[:, :, None], images].mean(axis=(1, 2))
    lo, hi = np.quantile(stats_, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def difference_ci(a_runs: list, b_runs: list, min_seeds_for_t: int = 3, level: float = 0.95, seed: int = 0,
                  interval: str = "t") -> dict:
    """95% interval of A − B for runs paired by seed; each run is {"value": float, "per_image": [..] or None}.

    interval "t": with ≥ `min_seeds_for_t` seed pairs, a t-interval over the per-seed differences (training
    randomness); "hierarchical": with ≥ 2 seed pairs that have per-image values, the two-level bootstrap
    over seeds and test images (`hierarchical_bootstrap_ci`). Otherwise: a paired bootstrap over test
    images of the seed-averaged per-image scores (test-set variance only; said in the `method` field)."""
    n = min(len(a_runs), len(b_runs))
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "method": "n/a: no runs", "n": 0}
    per = [r.get("per_image") for r in a_runs[:n] + b_runs[:n]]
    if interval == "hierarchical" and n >= 2 and all(p is not None for p in per):
        m, lo, hi = hierarchical_bootstrap_ci(per[:n], per[n:], level, seed=seed)
        return {"diff": m, "lo": lo, "hi": hi, "n": n,
                "method": f"hierarchical bootstrap over {n} seeds × {len(per[0])} test images"}
    if interval not in ("t", "hierarchical"):
        raise ValueError(f"interval must be 't' or 'hierarchical', not {interval!r}")
    if n >= min_seeds_for_t:
        diffs = [a["value"] - b["value"] for a, b in zip(a_runs, b_runs)]
        m, lo, hi = seed_ci(diffs, level)
        return {"diff": m, "lo": lo, "hi": hi, "method": f"t-interval over {n} seeds", "n": n}
    per_a = [r.get("per_image") for r in a_runs[:n]]
    per_b = [r.get("per_image") for r in b_runs[:n]]
    if any(p is None for p in per_a + per_b):
        diffs = [a["value"] - b["value"] for a, b in zip(a_runs, b_runs)]
        return {"diff": float(np.mean(diffs)), "lo": None, "hi": None, "n": n,
                "method": f"n/a: {n} seed(s) and no per-image scores to bootstrap"}
    ma, mb = np.mean(per_a, axis=0), np.mean(per_b, axis=0)
    m, lo, hi = paired_bootstrap_ci(ma, mb, level, seed=seed)
    return {"diff": m, "lo": lo, "hi": hi, "n": n,
            "method": f"paired bootstrap over {len(ma)} test images ({n} seed(s))"}


def verdict(lo, hi, direction: str, delta: float | None = None) -> str:
    """The verdict on a claim from the 95% interval [lo, hi] of A − B. The claim's effect e is A − B
    (direction '>' or '>=') or B − A ('<' or '<=').

    - superiority, A > B ('>') or A < B ('<'): 'holds' when the interval of e lies above 0, 'does not hold'
      when it lies below `delta` (no effect as large as the smallest that would matter; without a delta:
      below 0);
    - non-inferiority, A ≥ B − δ ('>=') or A ≤ B + δ ('<='), `delta` the margin δ > 0 (required): 'holds'
      when the interval of e lies above −δ (A is at most δ worse), 'does not hold' when it lies below −δ;
    'inconclusive' otherwise."""
    if direction not in (">", "<", ">=", "<="):
        raise ValueError(direction)
    if direction in (">=", "<=") and (delta is None or not delta > 0):
        raise ValueError(f"a non-inferiority claim ({direction}) needs its margin δ > 0, got {delta}")
    if lo is None or hi is None:
        return "inconclusive"
    e_lo, e_hi = (lo, hi) if direction.startswith(">") else (-hi, -lo)
    if direction in (">=", "<="):
        return "holds" if e_lo > -delta else "does not hold" if e_hi < -delta else "inconclusive"
    if e_lo > 0:
        return "holds"
    if e_hi < (0.0 if delta is None else float(delta)):
        return "does not hold"
    return "inconclusive"


def win_rate(a: list, b: list) -> float:
    """Share of items where a beats b (ties count ½)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.mean(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))


def convergence_step(steps: list, values: list, frac: float = 0.95):
    """The step from which the curve stays within (1 − frac) = 5% of its final value (None without a
    positive final value).

    For a rising curve this is "the validation CIDEr-D reaches 95% of its final value" (docs/method.md) and then
    stays there; the "stays" part also makes it meaningful for curves that fall (DPO degrading a
    model) or oscillate, where "first reaches" would trivially be step 0."""
    pts = [(s, v) for s, v in zip(steps, values) if v is not None and np.isfinite(v)]
    if not pts or pts[-1][1] <= 0:
        return None
    final = pts[-1][1]
    tol = (1 - frac) * final
    step = pts[-1][0]
    for s, v in reversed(pts):
        if abs(v - final) > tol:
            break
        step = s
    return step


def bin_sums(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> tuple:
    """(counts, confidence sums, correct sums) [n_bins] of equal-width confidence bins; a confidence c falls in
    bin b with lo_b < c ≤ hi_b (the first bin also takes c = 0)."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    return (np.bincount(idx, minlength=n_bins).astype(np.float64), np.bincount(idx, weights=conf, minlength=n_bins),
            np.bincount(idx, weights=correct, minlength=n_bins))


def ece_from_sums(counts, conf_sums, acc_sums) -> float:
    """ECE = Σ_b (n_b/N)·|acc_b − conf_b| = Σ_b |Σ correct − Σ conf| / N over the bins' sums (the last axis);
    several sets of sums at once give one ECE each."""
    n = np.sum(counts, axis=-1)
    return np.sum(np.abs(np.asarray(acc_sums) - np.asarray(conf_sums)), axis=-1) / n


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Token-level expected calibration error (Guo et al. 2017) over equal-width bins: the one implementation
    (`cwdpo.dynamics.ece` and the bootstraps call it)."""
    if len(conf) == 0:
        return math.nan
    return float(ece_from_sums(*bin_sums(np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64),
                                         n_bins)))


def _image_bin_sums(doc: dict, n_bins: int) -> np.ndarray:
    """[3, images, n_bins]: each test image's bin sums (counts, confidence, correct) of a measures.json["test"]."""
    conf, correct = np.asarray(doc["conf"], dtype=np.float64), np.asarray(doc["correct"], dtype=np.float64)
    img = np.asarray(doc["position_image"])
    n_img = int(img.max()) + 1 if len(img) else 0
    edges = np.linspace(0, 1, n_bins + 1)
    b = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    flat = img * n_bins + b
    size = n_img * n_bins
    return np.stack([np.bincount(flat, minlength=size), np.bincount(flat, weights=conf, minlength=size),
                     np.bincount(flat, weights=correct, minlength=size)]).reshape(3, n_img, n_bins).astype(np.float64)


def ece_difference_ci(a_docs: list, b_docs: list, n_bins: int = 15, n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0, by_seed: bool = False) -> dict:
    """95% interval of ECE(A) − ECE(B): bootstrap over test images, resampling each image's positions
    together (ECE is a dataset-level statistic), through each image's bin sums. Docs are
    measures.json["test"], one per seed, paired. Seeds pooled, or with `by_seed` a hierarchical bootstrap:
    seeds resampled, and within each the same test images for A and B; the statistic is then the mean over
    seeds of ECE(A_s) − ECE(B_s)."""
    rng = np.random.default_rng(seed)
    a = [_image_bin_sums(d, n_bins) for d in a_docs]
    b = [_image_bin_sums(d, n_bins) for d in b_docs]
    if not by_seed:  # pooled: an image's positions of every seed move together
        a, b = [np.sum(a, axis=0)], [np.sum(b, axis=0)]
    s, n_img = len(a), a[0].shape[1]
    per_seed = [ece_from_sums(*x.sum(axis=1)) - ece_from_sums(*y.sum(axis=1)) for x, y in zip(a, b)]
    diffs = np.empty(n_resamples)
    for r in range(n_resamples):
        seeds = rng.integers(0, s, s)
        diffs[r] = np.mean([ece_from_sums(*a[k][:, pick].sum(axis=1)) - ece_from_sums(*b[k][:, pick].sum(axis=1))
                            for k, pick in ((k, rng.integers(0, n_img, n_img)) for k in seeds)])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    how = (f"hierarchical bootstrap over {s} seeds × {n_img} test images" if by_seed else
           f"bootstrap over {n_img} test images ({len(a_docs)} seed(s) pooled)")
    return {"diff": float(np.mean(per_seed)), "lo": float(lo), "hi": float(hi), "n": len(a_docs),
            "method": how + " (positions resampled per image)"}
