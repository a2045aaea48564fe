"""cwdpo/config.py: what reading a config adds to it — a calibrate table's `sweep` written once and expanded into
Stage-2 recipes and rows."""
import copy
import os

from cwdpo.config import deep_merge, read_config_file, stage2_recipe, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stack(*files) -> dict:
    c = {}
    for f in files:
        c = deep_merge(c, read_config_file(os.path.join(REPO, f)))
    return validate_config(c, check_paths=False)


def test_a_sweep_becomes_one_recipe_and_one_row_per_setting_beta_outer_lr_inner():
    c = _stack("config/config.yaml", "config/calibrate.yaml")
    table = c["tables"]["calibrate"]
    assert "sweep" not in table  # expanded once
    rows = table["rows"]
    assert rows[0] == {"name": "SFT", "stage1": "sft"} and len(rows) == 1 + 8 * 3
    assert [r["name"] for r in rows[1:4]] == ["DPO, lr 5e-5", "DPO, lr 1e-4", "DPO, lr 2e-4"]
    assert [r["name"] for r in rows[8:11]] == ["DPO, lr 1e-2", "DPO, lr 5e-5, β 0.3", "DPO, lr 1e-4, β 0.3"]
    assert rows[-1] == {"name": "DPO, lr 1e-2, β 1", "stage1": "sft_c", "stage2": "dpo_lr1e-2_b1"}
    default_beta = stage2_recipe(c, "dpo")["beta"]
    for row in rows[1:]:
        r = stage2_recipe(c, row["stage2"])
        assert r["method"] == "dpo"
        assert f"lr {row['name'].split('lr ')[1].split(',')[0]}" in row["name"]
        assert r["beta"] == (float(row["name"].split("β ")[1]) if "β" in row["name"] else default_beta)
    assert stage2_recipe(c, "dpo_lr5e-4_b0.3")["lr"] == 5e-4
    again = validate_config(copy.deepcopy(c), check_paths=False)
    assert again["tables"] == c["tables"] and again["stage2"]["recipes"] == c["stage2"]["recipes"]


def test_an_overlay_cuts_the_sweep_and_gives_its_rows_seeds():
    micro = _stack("config/config.yaml", "tests/configs/micro.yaml", "config/calibrate.yaml",
                   "tests/configs/micro_calibrate.yaml")
    assert [(r["name"], r.get("stage2")) for r in micro["tables"]["calibrate"]["rows"]] == [
        ("SFT", None), ("DPO, lr 5e-5", "dpo_lr5e-5"), ("DPO, lr 1e-2", "dpo_lr1e-2"),
        ("DPO, lr 1e-3, β 0.3", "dpo_lr1e-3_b0.3"), ("DPO, lr 1e-3, β 1", "dpo_lr1e-3_b1")]
    scale = _stack("config/config.yaml", "tests/configs/micro.yaml", "config/scale.yaml",
                   "tests/configs/micro_scale.yaml")
    assert scale["tables"]["calibrate"]["rows"][1:] == [
        {"name": "DPO, lr 1e-3", "stage1": "sft_c", "stage2": "dpo_lr1e-3", "seeds": [0]}]


def test_the_qa_overlay_pretrains_every_base_model_on_turns_in_an_experiment_of_its_own():
    """config/qa.yaml: QA turns in the data, half the pretraining examples for 6000 steps at lr 1e-3 — the base
    model and the stability seeds alike — and half of every Stage-1 recipe's, in results/tiny_qa, with no
    calibration record of the captions-only model."""
    from cwdpo.plan import Plan
    c = _stack("config/config.yaml", "config/qa.yaml")
    assert c["experiment"] == "tiny_qa" and c["data"]["shapes"]["qa"] is True
    assert c["regime"]["control_calibration"] is None
    plan = Plan(c)
    assert plan.shapes_spec().qa is True
    spec = plan.pretrain_spec()
    assert spec.qa_share == 0.5 and spec.hparams["steps"] == 6000 and spec.hparams["lr"] == 1e-3
    for recipe in c["stage1"]["recipes"]:
        assert plan.stage1_spec(recipe, 0).qa_share == 0.5
    for seed in plan.stability_seeds():
        assert plan.stability_spec(seed).train.qa_share == 0.5
        assert plan.stability_spec(seed).train.hparams == spec.hparams
    default = Plan(_stack("config/config.yaml"))
    assert default.pretrain_spec().qa_share == 0 and not default.shapes_spec().qa
    assert all(default.stage1_spec(recipe, 0).qa_share == 0 for recipe in c["stage1"]["recipes"])
