"""The method registry: every training method one entry — its stage, its loss and the hyperparameters it
reads beyond the optimizer's (with their defaults and types).

`CWDPOTrainer.compute_loss` looks the loss up here; the config's method lists (`STAGE1_METHODS`,
`STAGE2_METHODS`) are these names; tests/test_methods.py checks the config schema's method enums, recipe keys
and defaults against the entries. Adding a method is one entry here and one function in `cwdpo/losses.py`.
The losses and their sections of the paper: docs/method.md. No torch import at module level (the config
imports this module).

A Stage-1 loss takes `(nll_pos [n], nll_neg [m], hp)` — token-mean NLLs of the references and of SFT-C's
negatives — and returns `(loss, info)`. A Stage-2 loss takes `(Δ inputs, hp)`: the policy's and the
reference's summed log-probs of the chosen and rejected responses [n] each, the policy's token-mean log-prob
of the rejected ones ℓ̄_θ(y_l) [n], and returns `(losses [n], info)`; the trainer applies the negative filter
and averages.
"""
from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Hparam:
    """A method's hyperparameter: its JSON-schema type, its default and what it is."""
    type: str
    default: object
    about: str


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    stage: int
    label: str  # the name tables and figures print
    loss: Callable
    hparams: dict  # name -> Hparam: what the loss reads besides the optimizer settings
    reads_negatives: bool = False  # Stage 1: whether its training data holds negatives (SFT-C's)

    @property
    def batch(self) -> str:
        """The collator kind of its batches (`cwdpo.logprobs.Collator`): "sft" references, "sft_c" [references;
        negatives], "pair" [chosen; rejected]."""
        return "pair" if self.stage == 2 else ("sft_c" if self.reads_negatives else "sft")


def _sft(nll_pos, nll_neg, hp):
    """L_SFT = mean NLL of the references (paper §3.1)."""
    from .losses import sft_loss
    return sft_loss(nll_pos)


def _sft_c(nll_pos, nll_neg, hp):
    """L_SFT-C = L_SFT + λ·max(0, C − mean NLL(negatives)) (paper §3.2); λ = hard_lam for the hard variant."""
    from .losses import sft_c_loss
    lam = float(hp["hard_lam"]) if hp["hard"] else float(hp["lam"])
    return sft_c_loss(nll_pos, nll_neg, margin=float(hp["margin"]), lam=lam)


def _dpo(pc, pr, rc, rr, avg_r, hp):
    """L_DPO = −log σ(β(Δ_w − Δ_l)) (paper §3.3, Rafailov et al. 2023)."""
    from .losses import dpo_loss
    return dpo_loss(pc, pr, rc, rr, beta=float(hp["beta"]))


def _focal_dpo(pc, pr, rc, rr, avg_r, hp):
    """Focal-DPO: L = −(1 − p)^γ log p, p = σ(β(Δ_w − Δ_l)) (the paper's baseline, Appendix B)."""
    from .losses import focal_dpo_loss
    return focal_dpo_loss(pc, pr, rc, rr, beta=float(hp["beta"]), gamma=float(hp["gamma"]))


def _cw_dpo(pc, pr, rc, rr, avg_r, hp):
    """L_CW-DPO = −log σ(β(Δ_w − w_c·Δ_l)), w_c = sg[σ((ℓ̄_θ(y_l) − ℓ_floor)/τ)] (paper §3.3); `cooling: false`
    is the ablation "w/o cooling weight" (w_c ≡ 1: DPO's loss, everything else as CW-DPO)."""
    import torch

    from .losses import cw_dpo_loss, dpo_loss
    if hp["cooling"]:
        return cw_dpo_loss(pc, pr, rc, rr, avg_r, beta=float(hp["beta"]), l_floor=float(hp["l_floor"]),
                           tau=float(hp["tau"]))
    losses, info = dpo_loss(pc, pr, rc, rr, beta=float(hp["beta"]))
    return losses, {**info, "w_c": torch.ones_like(avg_r)}


_BETA = Hparam("number", 0.1, "DPO's β: the strength of the KL anchor to the reference")
_SFT_C = {
    "margin": Hparam("number", 2.0, "SFT-C constraint C on the negatives' mean token NLL"),
    "lam": Hparam("number", 0.5, "SFT-C penalty weight λ"),
    "hard": Hparam("boolean", False, "hard-constraint variant (ablation 'w/o soft penalty'): λ = hard_lam"),
    "hard_lam": Hparam("number", 100.0, "λ of the hard-constraint variant"),
    "penalty_fraction": Hparam("number", 1.0, "share of each batch's negatives forwarded and penalised"),
}
_COOLING = {
    "beta": _BETA,
    "tau": Hparam("number", 1.0, "temperature τ of the cooling weight and of the filter's margin"),
    "l_floor": Hparam("number", -5.0, "ℓ_floor: a number, or 'mean' (mean ℓ̄ of the negatives under the "
                                      "reference)"),
    "cooling": Hparam("boolean", True, "false = ablation 'w/o cooling weight' (w_c ≡ 1)"),
    # the filter reads τ and ℓ_floor too: every Stage-2 method may use it (off by default)
    "filter": Hparam("object", {"enabled": False, "k": 2.0}, "drop pairs with ℓ̄_θ(y_l) < ℓ_floor − k·τ"),
}

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("sft", 1, "SFT", _sft, {}),
    Method("sft_c", 1, "SFT-C", _sft_c, _SFT_C, reads_negatives=True),
    Method("dpo", 2, "DPO", _dpo, {"beta": _BETA}),
    Method("focal_dpo", 2, "Focal-DPO", _focal_dpo,
           {"beta": _BETA, "gamma": Hparam("number", 2.0, "Focal-DPO's focusing exponent γ")}),
    Method("cw_dpo", 2, "CW-DPO", _cw_dpo, _COOLING),
)}
STAGE1_METHODS = tuple(n for n, m in REGISTRY.items() if m.stage == 1)
STAGE2_METHODS = tuple(n for n, m in REGISTRY.items() if m.stage == 2)
METHODS = STAGE1_METHODS + STAGE2_METHODS
# what the trainer reads of every Stage-2 recipe, whatever its method (the negative filter, the floor and τ
# it uses, and the floor and τ the evaluation's w_c uses)
STAGE2_SHARED = ("filter", "l_floor", "tau")


def method(name: str) -> Method:
    """The registry entry of `name`; a ValueError naming the known methods otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(REGISTRY)}")
    return REGISTRY[name]
