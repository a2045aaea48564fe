"""The training objectives of "Learning Dynamics of VLM Finetuning" (arXiv 2510.11978) — pure torch, no I/O.

Notation (docs/method.md): for a pair (x, y_w, y_l), log π(y|x) is the *summed* response log-prob,
Δ_w = log π_θ(y_w|x) − log π_ref(y_w|x), Δ_l likewise for the loser y_l, and ℓ̄_θ(y|x) the *token-mean*
log-prob. Every DPO-family function takes per-example tensors of shape [B] and returns
`(losses [B], info)`, where `info` holds detached diagnostics (rewards βΔ, margins, accuracies, ...).
The SFT functions take per-example token-mean NLLs and return a scalar loss (the SFT-C penalty acts on
the batch mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cooling_weight(avg_logp_rejected: torch.Tensor, *, l_floor: float, tau: float) -> torch.Tensor:
    """CW-DPO's cooling weight w_c = σ((ℓ̄_θ(y_l|x) − ℓ_floor) / τ) (paper §3.3), detached.

    w_c → 0 for easy negatives the policy already finds unlikely (ℓ̄ ≪ ℓ_floor) and → 1 for hard ones
    (ℓ̄ ≫ ℓ_floor). The paper's gradient treats it as a constant, hence `detach()`.
    Shape: avg_logp_rejected [B] → w_c [B].
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return torch.sigmoid((avg_logp_rejected.detach() - float(l_floor)) / float(tau))


def negative_filter_keep(avg_logp_rejected: torch.Tensor, *, l_floor: float, tau: float, k: float) -> torch.Tensor:
    """Negative filtering (paper §3.3): keep a pair unless ℓ̄_θ(y_l|x) < ℓ_floor − k·τ. Bool [B], detached."""
    return avg_logp_rejected.detach() >= float(l_floor) - float(k) * float(tau)


def _dpo_info(chosen_rewards, rejected_rewards, margins) -> dict:
    return {"chosen_rewards": chosen_rewards.detach(), "rejected_rewards": rejected_rewards.detach(),
            "margins": margins.detach(), "accuracies": (margins.detach() > 0).float()}


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float):
    """DPO (Rafailov et al. 2023): L = −log σ(β(Δ_w − Δ_l)).

    Args: the four summed response log-probs, each [B]; `beta` > 0.
    Returns: (losses [B], info) with info["chosen_rewards"] = βΔ_w, ["rejected_rewards"] = βΔ_l,
    ["margins"] = β(Δ_w − Δ_l), ["accuracies"] = 1[margin > 0].
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    return -F.logsigmoid(margins), _dpo_info(chosen_rewards, rejected_rewards, margins)


def focal_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                   ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
                   gamma: float = 2.0):
    """Focal-DPO: L = −(1 − p)^γ log p with p = σ(β(Δ_w − Δ_l)) (the paper's baseline, Appendix B).

    Focal modulation (Lin et al. 2017) of the whole DPO loss — our reading, since the paper names the
    baseline but not its form. The modulating factor stays in the graph, as in focal loss; γ = 0 is DPO.
    1 − p = σ(−z) is computed in log space for stability. Returns (losses [B], info) with info["focal_weight"].
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    log_p = F.logsigmoid(margins)
    weight = torch.exp(float(gamma) * F.logsigmoid(-margins)) if gamma != 0 else torch.ones_like(margins)
    info = _dpo_info(chosen_rewards, rejected_rewards, margins)
    info["focal_weight"] = weight.detach()
    return -weight * log_p, info


def cw_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                avg_logp_rejected: torch.Tensor, *, beta: float, l_floor: float, tau: float):
    """Cooling-weighted DPO (paper §3.3, Stage 2): L = −log σ(β(Δ_w − w_c·Δ_l)).

    w_c = cooling_weight(ℓ̄_θ(y_l|x)) uses the *current policy's* token-mean log-prob of the loser and is
    detached, so ∂L/∂Δ_l = w_c · (the DPO derivative at the same margin) and only the loser term is cooled.
    With w_c ≡ 1 this is DPO. Args: the four summed log-probs [B] and ℓ̄_θ(y_l|x) [B].
    Returns (losses [B], info) with info["w_c"] [B] and the rewards of `dpo_loss` (rejected scaled by w_c).
    """
    w_c = cooling_weight(avg_logp_rejected, l_floor=l_floor, tau=tau)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * w_c * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    info = _dpo_info(chosen_rewards, rejected_rewards, margins)
    info["w_c"] = w_c
    return -F.logsigmoid(margins), info


def sft_loss(pos_nll: torch.Tensor):
    """SFT: L = mean_i NLL_i, NLL_i = −ℓ̄_θ(y⁺_i|x_i) (per-example token-mean NLL). Returns (loss, info)."""
    loss = pos_nll.mean()
    return loss, {"pos_nll": pos_nll.detach().mean()}


def sft_c_loss(pos_nll: torch.Tensor, neg_nll: torch.Tensor, *, margin: float, lam: float):
    """SFT-C, Stage 1 with gentle negatives (paper §3.2): L = mean(NLL(y⁺)) + λ·ReLU(C − mean(NLL(y⁻))).

    NLLs are per-example token means; the ReLU acts on the batch mean of the negatives' NLL, so the penalty
    and its gradient vanish once negatives sit at NLL ≥ C (`margin`). Returns (loss, info) with
    info["penalty"] = λ·ReLU(C − mean NLL(y⁻)) and info["active"] = 1 when the constraint binds.
    """
    gap = float(margin) - neg_nll.mean()
    penalty = float(lam) * F.relu(gap)
    loss = pos_nll.mean() + penalty
    return loss, {"pos_nll": pos_nll.detach().mean(), "neg_nll": neg_nll.detach().mean(),
                  "penalty": penalty.detach(), "active": (gap.detach() > 0).float()}
