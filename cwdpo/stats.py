"""Statistics of the tables: confidence intervals, paired bootstrap, win-rates, convergence, verdicts.

- `seed_ci`: mean and a Student-t 95% interval over seeds (scipy.stats.t).
- `paired_bootstrap_ci`: percentile interval of the mean difference of two systems' per-image scores,
  resampling test images with replacement (scipy.stats.bootstrap, paired) — used when there are fewer
  than `min_seeds_for_t` seeds.
- `verdict`: a claim "A > B" (or "A < B") holds when its 95% interval of the difference excludes 0 on the
  claimed side, does not hold when it excludes 0 on the other side, and is inconclusive otherwise —
  decided by the interval, never by eye.
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


def difference_ci(a_runs: list, b_runs: list, min_seeds_for_t: int = 3, level: float = 0.95, seed: int = 0) -> dict:
    """95% interval of A − B for runs paired by seed; each run is {"value": float, "per_image": [..] or None}.

    With ≥ `min_seeds_for_t` seed pairs: a t-interval over the per-seed differences (training randomness is
    the main variance). Otherwise: a paired bootstrap over test images of the seed-averaged per-image
    scores (test-set variance only; said in the `method` field)."""
    n = min(len(a_runs), len(b_runs))
    if n == 0:
        return {"diff": None, "lo": None, "hi": None, "method": "n/a: no runs", "n": 0}
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


def verdict(lo, hi, direction: str) -> str:
    """'holds' / 'does not hold' / 'inconclusive' for the claim A − B > 0 (direction '>') or < 0 ('<')."""
    if lo is None or hi is None:
        return "inconclusive"
    if direction == ">":
        return "holds" if lo > 0 else ("does not hold" if hi < 0 else "inconclusive")
    if direction == "<":
        return "holds" if hi < 0 else ("does not hold" if lo > 0 else "inconclusive")
    raise ValueError(direction)


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


def ece_difference_ci(a_docs: list, b_docs: list, n_bins: int = 15, n_resamples: int = 1000, level: float = 0.95,
                      seed: int = 0) -> dict:
    """95% interval of ECE(A) − ECE(B): bootstrap over test images, resampling each image's positions
    together (ECE is a dataset-level statistic); seeds are pooled. Docs are measures.json["test"]."""
    def arrays(docs):
        conf = np.concatenate([np.asarray(d["conf"]) for d in docs])
        corr = np.concatenate([np.asarray(d["correct"], dtype=np.float64) for d in docs])
        img = np.concatenate([np.asarray(d["position_image"]) for d in docs])
        return conf, corr, img

    import torch  # the ECE of `cwdpo.dynamics` (the one implementation; measures.json holds its values)

    from .dynamics import ece

    def ece_of(conf, correct, n_bins):
        return ece(torch.from_numpy(conf), torch.from_numpy(correct), n_bins)

    ca, ka, ia = arrays(a_docs)
    cb, kb, ib = arrays(b_docs)
    n_img = int(max(ia.max(), ib.max())) + 1
    pos_a = [np.flatnonzero(ia == i) for i in range(n_img)]
    pos_b = [np.flatnonzero(ib == i) for i in range(n_img)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_resamples):
        pick = rng.integers(0, n_img, n_img)
        sa = np.concatenate([pos_a[i] for i in pick])
        sb = np.concatenate([pos_b[i] for i in pick])
        diffs.append(ece_of(ca[sa], ka[sa], n_bins) - ece_of(cb[sb], kb[sb], n_bins))
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff": ece_of(ca, ka, n_bins) - ece_of(cb, kb, n_bins), "lo": float(lo), "hi": float(hi),
            "n": len(a_docs), "method": f"bootstrap over {n_img} test images (positions resampled per image; "
                                        f"{len(a_docs)} seed(s) pooled)"}
