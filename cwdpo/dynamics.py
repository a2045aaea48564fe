"""Learning-dynamics and calibration measurements (docs/method.md § Measurements) — pure functions of logits.

All take next-token logits at teacher-forced response positions, shape [T, V] (T positions pooled over
sequences), and return floats or small tensors:

- entropy:     mean_t H(π_t) = −Σ_v π_t(v) log π_t(v)                       (nats; uniform: ln V)
- top-1 mass:  mean_t max_v π_t(v)                                          ("peakiness")
- TV:          mean_t ½ Σ_v |π_t(v) − ρ_t(v)|                               (policy π vs reference ρ)
- JS:          mean_t ½ KL(π_t‖m_t) + ½ KL(ρ_t‖m_t), m_t = (π_t + ρ_t)/2     (nats, ≤ ln 2)
- ECE:         Σ_b (n_b/N) |acc_b − conf_b| over `n_bins` equal-width bins of confidence = top-1 prob,
               correct = (top-1 token == reference token)                  (Guo et al. 2017; token level)
- Brier:       mean_t (conf_t − correct_t)²                                 (binary, on the top-1 prediction)

No I/O here; `ProbeSet` and the training callback live in `cwdpo.probes`.
"""
from __future__ import annotations

import math

import torch


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def entropy(logits: torch.Tensor) -> float:
    """Mean next-token entropy (nats) over positions."""
    lp = _log_probs(logits)
    return float(-(lp.exp() * lp).sum(-1).mean())


def top1_mass(logits: torch.Tensor) -> float:
    """Mean probability of the most likely token over positions."""
    return float(_log_probs(logits).exp().max(-1).values.mean())


def tv_distance(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean total-variation distance ½‖π − ρ‖₁ between two next-token distributions, over positions."""
    p, q = _log_probs(p_logits).exp(), _log_probs(q_logits).exp()
    return float(0.5 * (p - q).abs().sum(-1).mean())


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean Jensen–Shannon divergence (nats) between two next-token distributions, over positions."""
    lp, lq = _log_probs(p_logits), _log_probs(q_logits)
    p, q = lp.exp(), lq.exp()
    lm = torch.log(0.5 * (p + q))
    kl_pm = (p * (lp - lm)).nan_to_num().sum(-1)
    kl_qm = (q * (lq - lm)).nan_to_num().sum(-1)
    return float((0.5 * (kl_pm + kl_qm)).clamp(min=0).mean())


def confidence_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence = top-1 probability, correct = top-1 token equals the reference token), each [T]."""
    probs = _log_probs(logits).exp()
    conf, pred = probs.max(-1)
    return conf, (pred == targets).double()


def reliability_bins(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> list:
    """Equal-width confidence bins: [{lo, hi, count, confidence, accuracy}] (empty bins have count 0).

    A confidence c falls in bin b with lo_b < c ≤ hi_b (the first bin also takes c = 0); `cwdpo.stats.bin_sums`."""
    from .stats import bin_sums
    counts, conf_sums, acc_sums = bin_sums(conf.double().cpu().numpy(), correct.double().cpu().numpy(), n_bins)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(counts[b]),
             "confidence": float(conf_sums[b] / counts[b]) if counts[b] else None,
             "accuracy": float(acc_sums[b] / counts[b]) if counts[b] else None} for b in range(n_bins)]


def ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_b (n_b/N)·|acc_b − conf_b| over equal-width bins (`cwdpo.stats.ece`)."""
    from .stats import ece as ece_np
    return ece_np(conf.double().cpu().numpy(), correct.double().cpu().numpy(), n_bins)


def brier(conf: torch.Tensor, correct: torch.Tensor) -> float:
    """Brier score of the top-1 prediction: mean (confidence − correct)²."""
    return float(((conf.double() - correct.double()) ** 2).mean()) if conf.numel() else math.nan


def per_position(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None) -> dict:
    """Per-position [T] vectors: entropy, top1, conf, correct (and tv, js against `ref_logits`).

    Lets a caller stream over batches and keep T numbers instead of T×V logits."""
    lp = _log_probs(logits)
    p = lp.exp()
    conf, pred = p.max(-1)
    out = {"entropy": -(p * lp).sum(-1), "top1": conf, "conf": conf, "correct": (pred == targets).double()}
    if ref_logits is not None:
        lq = _log_probs(ref_logits)
        q = lq.exp()
        out["tv"] = 0.5 * (p - q).abs().sum(-1)
        lm = torch.log(0.5 * (p + q))
        out["js"] = (0.5 * ((p * (lp - lm)).nan_to_num().sum(-1) + (q * (lq - lm)).nan_to_num().sum(-1))).clamp(min=0)
    return out


def distribution_measures(logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None = None,
                          n_bins: int = 15) -> dict:
    """Entropy, top-1 mass, ECE, Brier (and TV/JS against `ref_logits` when given) at the same positions."""
    conf, correct = confidence_correct(logits, targets)
    out = {"entropy": entropy(logits), "top1": top1_mass(logits), "ece": ece(conf, correct, n_bins),
           "brier": brier(conf, correct), "accuracy": float(correct.mean()), "positions": int(targets.numel())}
    if ref_logits is not None:
        out["tv"] = tv_distance(logits, ref_logits)
        out["js"] = js_divergence(logits, ref_logits)
    return out
