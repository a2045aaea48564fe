"""cwdpo/config.py: what reading a config adds to it — a calibrate table's `sweep` written once and expanded into
Stage-2 recipes and rows."""
import copy
import dataclasses
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
    for row in rows[1:]:
        r = stage2_recipe(c, row["stage2"])
        assert r["method"] == "dpo"
        assert f"lr {row['name'].split('lr ')[1].split(',')[0]}" in row["name"]
        # a row without β runs at the sweep's pinned β, 0.1 (config/calibrate.yaml), not the default's 0.3
        assert r["beta"] == (float(row["name"].split("β ")[1]) if "β" in row["name"] else 0.1)
    assert stage2_recipe(c, "dpo_lr5e-4_b0.3")["lr"] == 5e-4
    again = validate_config(copy.deepcopy(c), check_paths=False)
    assert again["tables"] == c["tables"] and again["stage2"]["recipes"] == c["stage2"]["recipes"]


def test_a_sweep_pins_its_beta_so_an_overlay_that_moves_the_default_beta_sweeps_the_same_rows():
    """stage2.defaults' β is 0.3 (the default's calibration outcome); the sweep runs its first grid at its own
    β 0.1 over it and over an overlay that moves the default β, with the same recipe names and training specs."""
    from cwdpo.plan import Plan
    from cwdpo.specs import to_json
    default = _stack("config/config.yaml", "config/calibrate.yaml")
    moved = deep_merge(read_config_file(os.path.join(REPO, "config/config.yaml")),
                       {"stage2": {"defaults": {"beta": 1.0}}})  # an overlay that moves the default β
    moved = validate_config(deep_merge(moved, read_config_file(os.path.join(REPO, "config/calibrate.yaml"))),
                            check_paths=False)
    assert stage2_recipe(default, "dpo")["beta"] == 0.3 and stage2_recipe(moved, "dpo")["beta"] == 1.0
    assert moved["tables"]["calibrate"]["rows"] == default["tables"]["calibrate"]["rows"]
    moved_plan, default_plan = Plan(moved), Plan(default)
    for row in default["tables"]["calibrate"]["rows"][1:]:
        beta = float(row["name"].split("β ")[1]) if "β" in row["name"] else 0.1
        assert stage2_recipe(default, row["stage2"])["beta"] == beta
        assert stage2_recipe(moved, row["stage2"])["beta"] == beta
        spec = default_plan.stage2_spec("sft_c", 0, row["stage2"])
        assert spec.hparams == moved_plan.stage2_spec("sft_c", 0, row["stage2"]).hparams, row
    # without the pin a first-grid recipe would run at the default's β 0.3: another run than the sweep's
    unpinned = _stack("config/config.yaml", "config/calibrate.yaml")
    del unpinned["stage2"]["recipes"]["dpo_lr1e-4"]["beta"]
    unpinned_spec = Plan(unpinned).stage2_spec("sft_c", 0, "dpo_lr1e-4")
    assert unpinned_spec.hparams["beta"] == 0.3
    assert to_json(unpinned_spec) != to_json(default_plan.stage2_spec("sft_c", 0, "dpo_lr1e-4"))


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


def test_the_default_pretrains_every_base_model_on_turns_and_the_gpu_configs_on_captions():
    """The default: QA turns in the data, half the pretraining examples for 6000 steps at lr 1e-3 — the base
    model and the stability seeds alike — and half of every Stage-1 recipe's; Stage 2 at its calibration's
    outcome (lr 2e-4, β 0.3, every method), recorded for T-regime. The GPU configs (COCO captions, no turns)
    mix none in and keep DPO's common β 0.1."""
    from cwdpo.plan import Plan
    from cwdpo.specs import StabilitySpec, from_json, to_json
    c = _stack("config/config.yaml")
    assert c["experiment"] == "tiny" and c["data"]["shapes"]["qa"] is True
    record = c["regime"]["control_calibration"]
    assert record["met_both"] is False and "lr 2e-4, β 0.3" in record["setting"]
    plan = Plan(c)
    for recipe in c["stage2"]["recipes"]:  # the ablations and sweeps differ from it in their own setting only
        hp = plan.stage2_spec("sft_c", 0, recipe).hparams
        assert (hp["lr"], hp["beta"]) == (2e-4, 0.3), recipe
    assert plan.shapes_spec().qa is True
    spec = plan.pretrain_spec()
    assert spec.qa_share == 0.5 and spec.hparams["steps"] == 6000 and spec.hparams["lr"] == 1e-3
    for recipe in c["stage1"]["recipes"]:
        assert plan.stage1_spec(recipe, 0).qa_share == 0.5
    for seed in plan.stability_seeds():
        assert plan.stability_spec(seed).train.qa_share == 0.5
        assert plan.stability_spec(seed).train.hparams == spec.hparams
        # each seed answers the MCQ set the base model answers (T-regime's MCQ stability row)
        (mcq,) = plan.stability_spec(seed).mcq_sets
        (base_mcq,) = plan.eval_spec("base").mcq_sets
        assert dataclasses.replace(mcq, out=base_mcq.out) == base_mcq
        assert from_json(StabilitySpec, to_json(plan.stability_spec(seed))) == plan.stability_spec(seed)
    for gpu_config in ("config/qwen3b.yaml", "config/paper.yaml"):
        gpu = _stack("config/config.yaml", gpu_config)
        assert gpu["data"]["source"] == "karpathy" and gpu["regime"]["control_calibration"] is None
        assert all(Plan(gpu).stage1_spec(recipe, 0).qa_share == 0 for recipe in gpu["stage1"]["recipes"])
        assert all(stage2_recipe(gpu, recipe)["beta"] == 0.1 for recipe in ("dpo", "focal_dpo", "cw_dpo"))
