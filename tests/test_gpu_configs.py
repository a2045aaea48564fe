"""What config/qwen3b.yaml and config/paper.yaml train: LoRA on the language model only (the vision tower
stays frozen: vLLM does not apply adapter weights to the tower, so on-policy samples would come from
another model than the one trained), and one SFT-C margin for every Stage-1 recipe."""
import os

import pytest

from conftest import REPO


@pytest.mark.parametrize("name", ["qwen3b", "paper"])
def test_no_vision_parameter_is_trainable_under_the_gpu_configs_lora(name, tiny_model_dir):
    from cwdpo.config import load_config
    from cwdpo.models import load_model
    lora = load_config(os.path.join(REPO, "config", f"{name}.yaml"), check_paths=False)["model"]["lora"]
    model = load_model(tiny_model_dir, trainable=True, lora=lora)  # the real Qwen2.5-VL classes, tiny sizes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    vision = [n for n, p in model.named_parameters() if ".visual." in n]
    assert vision and not [n for n in trainable if ".visual." in n]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".visual." in n)
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    # every projection of every decoder layer is adapted (what the paper's recipe targets)
    layers = model.get_base_model().config.text_config.num_hidden_layers
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"):
        hits = {n.split(".layers.")[1].split(".")[0] for n in trainable if f".{proj}.lora_A" in n}
        assert hits == {str(i) for i in range(layers)}, proj


@pytest.mark.parametrize("name,margin", [("config", 2.0), ("qwen3b", 3.0), ("paper", 3.0)])
def test_every_sft_c_recipe_shares_the_configs_margin(name, margin):
    """qwen3b/paper set margin 3.0 on sft, sft_c and sft_c_hard only, so the cheaper-Stage-1 table compared
    sft_c (3.0) with sft_c_f50 / sft_c_f25 (2.0, the tiny default). Shared settings live in stage1.defaults:
    the rows of that table differ only in the share of negatives."""
    from cwdpo.config import load_config, stage1_recipe
    c = load_config(os.path.join(REPO, "config", f"{name}.yaml"), check_paths=False)
    recipes = {r: stage1_recipe(c, r) for r in c["stage1"]["recipes"]}
    sft_c = {r: hp for r, hp in recipes.items() if hp["method"] == "sft_c"}
    assert {"sft_c", "sft_c_hard", "sft_c_f50", "sft_c_f25"} <= set(sft_c)
    assert {hp["margin"] for hp in sft_c.values()} == {margin}
    assert {hp["lam"] for hp in sft_c.values()} == {0.5} and sft_c["sft_c_hard"]["hard_lam"] == 100.0
    rows = [row["stage1"] for row in c["tables"]["stage1_cost"]["rows"]]
    base = {k: v for k, v in recipes["sft_c"].items() if k != "penalty_fraction"}
    for r in rows:
        if recipes[r]["method"] == "sft_c":
            assert {k: v for k, v in recipes[r].items() if k != "penalty_fraction"} == base, r
