"""The open questions' machinery (config/scale.yaml, modality.yaml, negsource.yaml): the text input, the
model's own wrong beams as negatives, the calibrated learning rate, variants of an experiment and the tables
across them — unit level; the micro overlays run end to end in tests/test_pipeline.py."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

import micro_specs as specs
from conftest import REPO, copy_workflow, run
from cwdpo import negatives as N
from cwdpo.config import (ConfigError, deep_merge, load_config, read_config_file, stage2_recipe, validate_config,
                          variant_config)
from cwdpo.grounding import ground
from cwdpo.plan import Plan
from cwdpo.shapes import scene_text, scene_texts
from cwdpo.specs import Vlm, from_json, to_json


def overlay(*names, overrides=None, check_paths=False):
    """The validated config of config/config.yaml + the given files (repo-relative), as Snakemake merges them."""
    cfg = {}
    for name in ("config/config.yaml",) + names:
        cfg = deep_merge(cfg, read_config_file(os.path.join(REPO, name)))
    return validate_config(deep_merge(cfg, overrides or {}), check_paths=check_paths)


# ---------------------------------------------------------------------------------------------------
# the text input

def test_scene_text_states_exactly_what_the_image_shows(shapes_records, shapes_dir):
    """The attribute record as text carries the image's information: parsed with the captions' grammar it
    names every object, no other, with its colour, shape and size; the same record gives the same text."""
    for rec in shapes_records[:40]:
        text = scene_text(rec.attributes)
        g = ground(text, rec.attributes)
        assert g["hallucinated"] == 0 and g["recalled"] == g["objects"] == len(rec.attributes["objects"]), text
        assert g["colour"][0] == g["colour"][1] and g["size"][0] == g["size"][1] == g["objects"]
        assert scene_text(dict(rec.attributes)) == text
    texts = scene_texts(os.path.join(shapes_dir, "dataset_shapes.json"))
    assert texts[shapes_records[0].path] == scene_text(shapes_records[0].attributes)


def _text_encoder(processor, shapes_dir):
    from cwdpo.logprobs import make_encoder
    vlm = dataclasses.replace(specs.vlm(), input="text", scenes=os.path.join(shapes_dir, "dataset_shapes.json"))
    return make_encoder(processor, vlm)


def test_text_input_runs_the_language_model_alone(tiny_model_dir, processor, shapes_dir, shapes_records):
    """With text input a batch has no image token and no pixels (the vision tower never runs), the scene text
    stands in the prompt, and the one-forward log-probs (plain and shared-prefix) equal the stock forward of
    the same token ids."""
    from cwdpo.logprobs import completion_logps
    from cwdpo.models import load_model
    from cwdpo.prefix import completion_logps_shared_prefix
    enc = _text_encoder(processor, shapes_dir)
    model = load_model(tiny_model_dir, dtype="float64")
    recs = shapes_records[:3]
    rows = [(0, recs[0].captions[0]), (0, "a red star"), (1, recs[1].captions[1]), (2, recs[2].captions[0])]
    b = enc.build([r.path for r in recs], rows)
    assert b.pixel_values.numel() == 0 and b.image_grid_thw.shape[0] == 0
    assert not (b.input_ids == enc.image_token_id).any()
    prompt = enc.tokenizer.decode(b.input_ids[0][: int(b.completion_mask[0].nonzero()[0])])
    assert scene_text(recs[0].attributes) + "\n" + specs.PROMPT in prompt and "<|vision_start|>" not in prompt
    out = completion_logps(model, b, enc.image_token_id)
    shared = completion_logps_shared_prefix(model, b, enc.image_token_id)
    torch.testing.assert_close(shared.sums, out.sums, atol=1e-9, rtol=0)
    for r in range(b.n_rows):
        keep = b.attention_mask[r].bool()
        ids = b.input_ids[r][keep].unsqueeze(0)
        logits = model(input_ids=ids).logits[0]
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
        ref = lp[b.completion_mask[r][keep][1:]].sum()
        torch.testing.assert_close(out.sums[r], ref, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="no attribute record"):
        enc.build(["elsewhere.png"], [(0, "a red star")])


def test_text_input_generates_without_pixels(tiny_model_dir, processor, shapes_dir, shapes_records):
    from cwdpo.generation import generate_captions, prompt_batch
    from cwdpo.models import load_model
    enc = _text_encoder(processor, shapes_dir)
    paths = [r.path for r in shapes_records[:4]]
    assert set(prompt_batch(enc, paths)) == {"input_ids", "attention_mask"}
    model = load_model(tiny_model_dir)
    beams = generate_captions(model, enc, paths, num_beams=2, num_return=2, max_new_tokens=8)
    samples = generate_captions(model, enc, paths, num_return=2, do_sample=True, seed=3, max_new_tokens=8)
    assert [len(b) for b in beams] == [len(s) for s in samples] == [2] * 4
    assert samples == generate_captions(model, enc, paths, num_return=2, do_sample=True, seed=3, max_new_tokens=8)


def test_text_input_needs_shapes_data_and_no_mcq_set():
    with pytest.raises(ConfigError, match="mcq_sets.shapes_mcq: multiple-choice sets ask about an image"):
        overlay(overrides={"model": {"input": "text"}})
    cfg = overlay(overrides={"model": {"input": "text"}, "mcq_sets": {"shapes_mcq": {"enabled": False}}})
    vlm = Plan(cfg).vlm()
    assert vlm.input == "text" and vlm.scenes == "results/tiny/data/dataset_shapes.json"
    with pytest.raises(ConfigError, match="negatives.onpolicy.backend: vllm samples from images"):
        overlay(overrides={"model": {"input": "text"}, "mcq_sets": {"shapes_mcq": {"enabled": False}},
                           "negatives": {"onpolicy": {"backend": "vllm"}}})


def test_specs_leave_out_optional_fields_at_their_default():
    """A setting added later (text input, beams share, calibrated lr) does not change the spec text of a config
    that does not use it (so its jobs do not rerun); given, it round-trips."""
    plan = specs.micro_plan()
    assert '"input"' not in to_json(plan.vlm()) and '"scenes"' not in to_json(plan.vlm())
    assert '"beams"' not in to_json(plan.pairs_spec("sft_c", 0, "mix"))
    assert '"lr_choice"' not in to_json(plan.stage2_spec("sft_c", 0, "cw_dpo"))
    text = dataclasses.replace(plan.vlm(), input="text", scenes="d.json")
    assert from_json(Vlm, to_json(text)) == text and from_json(Vlm, to_json(plan.vlm())) == plan.vlm()


# ---------------------------------------------------------------------------------------------------
# the model's own wrong beams

def test_a_beam_is_wrong_when_it_hallucinates_or_misses_an_object(shapes_records):
    from cwdpo.metrics import corpus_scorer
    from cwdpo.sampling import ground_beams
    rec = next(r for r in shapes_records if len(r.attributes["objects"]) == 2)
    first, second = rec.attributes["objects"]
    right = rec.captions[0]
    missing = f"a {first['size']} {first['colour']} {first['shape']}"
    other = next(c for c in ("red", "green", "blue") if c not in (first["colour"], second["colour"]))
    wrong = f"a {other} {first['shape']} and a {second['colour']} {second['shape']}"
    rows = ground_beams([rec], [[right, missing, wrong, missing, ""]], corpus_scorer(shapes_records))
    s = rows[0]["samples"]
    assert [x["kind"] for x in s] == [None, "missing", "hallucinated_missing", "missing", "missing"]
    # kept: wrong, not empty, not a reference, not a repeat of a higher beam
    assert [x["kept"] for x in s] == [False, True, True, False, False]
    assert s[1]["missing"] == 1 and s[2]["hallucinated"] == 1 and s[0]["is_reference"]


def test_pairs_mix_dataset_beam_and_onpolicy_negatives_at_their_shares(shapes_records):
    recs = shapes_records[:30]
    pool = {r.image_id: [{"text": f"sample {i} of {r.image_id}", "score": 0.1} for i in range(3)] for r in recs}
    beams = {r.image_id: [{"text": f"beam {i} of {r.image_id}", "score": 0.2, "kind": "missing"} for i in range(3)]
             for r in recs}
    cfg = specs.negatives(pairs_per_image=3)
    pairs, summary = N.build_pairs(recs, cfg, rho=0.34, seed=2, onpolicy=pool, beams=beams, beam_share=0.33)
    by = summary["by_source"]
    # round(0.34 · 90) = 31 dataset, round(0.33 · 90) = 30 beams, the rest (29) on-policy
    assert summary["pairs"] == 90 and by["beam"] == summary["beams"] == 30 and by["onpolicy"] == 29
    assert sum(by.get(k, 0) for k in ("gentle", "easy")) == summary["dataset"] == 31
    assert all(p["kind"] == "missing" for p in pairs if p["source"] == "beam")
    # only beams, from a pool of 30 for a target of 90: the set holds what the pool has and says so
    pairs, summary = N.build_pairs(recs, cfg, rho=0.0, seed=2, beams={k: v[:1] for k, v in beams.items()},
                                   beam_share=1.0)
    assert summary["pairs"] == 30 and set(summary["by_source"]) == {"beam"}
    assert summary["fill"] == pytest.approx(1 / 3) and summary["targets"]["beams"] == 90
    # a set without beams draws exactly what it drew before beams existed, and its summary keeps its keys
    plain = N.build_pairs(recs, cfg, rho=0.5, seed=2, onpolicy=pool)
    again = N.build_pairs(recs, cfg, rho=0.5, seed=2, onpolicy=pool, beams=beams, beam_share=0.0)
    assert plain == again and "beams" not in plain[1]


def test_beam_negatives_need_shapes_data_and_fit_in_the_set():
    with pytest.raises(ConfigError, match=r"negatives.sets.x: rho 0.8 \+ beams 0.5 exceed 1"):
        overlay(overrides={"negatives": {"sets": {"x": {"rho": 0.8, "beams": 0.5}}}})
    with pytest.raises(ConfigError, match="negatives.sets.b.beams: beam negatives need the `shapes` data"):
        overlay(overrides={"data": {"source": "karpathy", "karpathy": {"json": "x.json"}},
                           "negatives": {"sets": {"b": {"rho": 0.0, "beams": 1.0}}}})


def test_pairs_of_a_set_with_beams_need_the_beams_file_before_any_work(tmp_path):
    from cwdpo.data import DataError
    from cwdpo.specs import PairsSpec
    missing = str(tmp_path / "absent.json")  # not read: the check comes first
    spec = PairsSpec(prompt=specs.PROMPT, data=specs.data(missing, ["finetune"]), negatives=specs.negatives(),
                     rho=0.5, p_easy=None, seed=0, tokenizer=str(tmp_path), max_response_tokens=8, beams=0.5)
    with pytest.raises(DataError, match=r"mixes in wrong beams \(beams 0.5\) but no --beams file was given"):
        N.make_pairs(spec, None, str(tmp_path / "pairs.jsonl"), str(tmp_path / "summary.json"))
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------------
# the calibrated learning rate

@pytest.mark.slow
def test_a_calibrated_recipe_reads_the_rule_outcome_of_its_sweep():
    plan = Plan(overlay("config/scale.yaml"))
    spec = plan.stage2_spec("sft_c", 0, "cw_dpo_cal")
    assert spec.hparams["lr"] == "calibrated" and spec.lr_choice == "results/tiny/calibration/calibrate.json"
    assert plan.stage2_inputs("sft_c", 0, "cw_dpo_cal")["lr_choice"] == spec.lr_choice
    assert "lr_choice" not in plan.stage2_inputs("sft_c", 0, "dpo_lr1e-4")
    from cwdpo.report import calibration_inputs
    files = calibration_inputs(plan, "calibrate")  # measures, captions, probes: never scores (no wait on scoring)
    assert files and all(f.endswith(("measures.json", "captions.json", "probes.csv")) for f in files)
    # the task side of the rule reads the controls' own Stage-1 model (SFT-C) of every seed
    assert {f"results/tiny/eval/stage1/sft_c/s{s}/captions.json" for s in range(3)} <= set(files)
    with pytest.raises(ConfigError, match="needs stage2.calibration .'calibrate'. to name a table of kind calibrate"):
        overlay(overrides={"stage2": {"recipes": {"x": {"method": "dpo", "lr": "calibrated"}}}})
    with pytest.raises(ConfigError, match="is not vanilla DPO; the calibration sweeps the control only"):
        overlay("config/scale.yaml", overrides={"tables": {"calibrate": {"rows": [
            {"name": "SFT", "stage1": "sft"}, {"name": "c", "stage1": "sft_c", "stage2": "cw_dpo"}]}}})
    with pytest.raises(ConfigError, match="takes its lr from this very sweep"):
        overlay("config/scale.yaml", overrides={"tables": {"calibrate": {"rows": [
            {"name": "SFT", "stage1": "sft"}, {"name": "c", "stage1": "sft_c", "stage2": "dpo_cal"}]}}})


@pytest.mark.train
def test_training_takes_the_calibrated_lr_and_records_it(tmp_path, tiny_model_dir, shapes_dir):
    """A Stage-2 run with `lr: calibrated` trains at the lr of the rule's outcome file (its Trainer's lr) and
    says so in metrics.json; a run with a set lr keeps its metrics' keys."""
    import json
    from cwdpo.data import load_karpathy
    from cwdpo.reference import reference_logps
    from cwdpo.train import run_training
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    recs = load_karpathy(data_json, splits=["finetune"])[:8]
    pairs, _ = N.build_pairs(recs, specs.negatives(pairs_per_image=1), rho=1.0, seed=0)
    N.write_pairs(str(tmp_path / "pairs.jsonl"), pairs, specs.PROMPT)
    reference_logps(tiny_model_dir, str(tmp_path / "pairs.jsonl"), str(tmp_path / "ref.json"), specs.vlm())
    (tmp_path / "choice.json").write_text(json.dumps({"lr": 0.0123, "row": "DPO, lr 0.0123", "signature": False,
                                                      "outcome": "no signature", "table": "calibrate"}))
    spec = specs.train("dpo", tiny_model_dir, data_json, hparams={"lr": "calibrated", "steps": 1, "batch_size": 4},
                       train={"logging_steps": 1}, stage="stage2", pairs=str(tmp_path / "pairs.jsonl"),
                       ref_logps=str(tmp_path / "ref.json"), lr_choice=str(tmp_path / "choice.json"))
    metrics = run_training(spec, str(tmp_path / "run"))
    assert metrics["lr_calibrated"]["lr"] == 0.0123 and metrics["lr_calibrated"]["signature"] is False
    from cwdpo.train import read_train_log
    assert float(read_train_log(str(tmp_path / "run" / "train_log.csv"))[0]["learning_rate"]) == pytest.approx(0.0123)
    plain = run_training(dataclasses.replace(spec, hparams={**spec.hparams, "lr": 0.001}, lr_choice=None),
                         str(tmp_path / "run2"))
    assert "lr_calibrated" not in plain


# ---------------------------------------------------------------------------------------------------
# variants and the tables across them

def test_a_variant_is_the_experiment_patched_with_its_own_tree_and_rules():
    cfg = overlay("config/scale.yaml")
    plan = Plan(cfg)
    assert [s for s, _ in plan.all_plans()] == ["", "__h32", "__h64"]
    h32 = plan.variant_plans()["h32"]
    assert h32.out == "results/tiny/variants/h32" and h32.c["model"]["tiny"]["hidden_size"] == 32
    assert h32.c["stage2"]["recipes"]["cw_dpo_cal"]["lr"] == "calibrated"  # the experiment's recipes
    # no table of its own; the tables across variants are left out of it; what T-scale reads is scored there
    assert h32.enabled_tables() == {} and "scale" not in h32.c["tables"] and "scale" not in h32.c["figures"]
    assert set(h32.eval_keys()) == {f"stage1/sft/s{s}" for s in (0, 1, 2)} | \
        {f"stage2/sft_c/s{s}/{r}" for s in (0, 1, 2) for r in ("dpo_cal", "cw_dpo_cal")}
    assert h32.stage2_spec("sft_c", 0, "cw_dpo_cal").lr_choice == "results/tiny/variants/h32/calibration/calibrate.json"
    # the experiment itself serves the default size: its score job also scores those runs
    assert "stage2/sft_c/s2/cw_dpo_cal" in plan.eval_keys()
    # the default config has no variant: one plan, the rules' names unchanged
    assert [s for s, _ in Plan(overlay()).all_plans()] == [""]
    patched = variant_config(cfg, "h32")
    assert patched["variants"] == {} and not any(t["enabled"] for t in patched["tables"].values())


@pytest.mark.parametrize("patch,needle", [
    ({"variants": {"bad-name": {}}}, "bad-name"),
    ({"variants": {"v": {"variants": {"w": {}}}}}, "variants.v.variants: a variant has no variants of its own"),
    ({"variants": {"v": {"model": {"tiny": {"hidden_sise": 8}}}}}, "variants.v: model.tiny: unknown key"),
    ({"tables": {"t": {"kind": "scale", "arms": [{"name": "a", "variant": "nope"}]}}},
     "tables.t.arms[0].variant: unknown variant 'nope'"),
    ({"tables": {"t": {"kind": "modality"}}}, "tables.t.arms: a table of kind modality needs its arms"),
    ({"tables": {"t": {"kind": "negsource", "arms": [{"name": "a", "runs": {"CW-DPO": {"stage1": "sft_c"}}}]}}},
     "arm 'a' has no run named 'DPO'"),
    ({"figures": {"scale": {"table": "main"}}}, "figures.scale.table: 'main' is not a table of kind scale"),
])
def test_bad_variants_and_arms_are_named(patch, needle):
    with pytest.raises(ConfigError) as e:
        overlay(overrides=patch)
    assert needle in str(e.value)


@pytest.mark.slow
def test_config_scale_sizes_span_ten_times_the_parameters(shapes_records, tmp_path):
    """config/scale.yaml: at least three sizes, the largest ≥ 10× the smallest in parameters (built and
    counted with the code that builds them)."""
    from cwdpo.models import build_tiny
    plan = Plan(overlay("config/scale.yaml"))
    arms = plan.c["tables"]["scale"]["arms"]
    corpus = [c for r in shapes_records for c in r.captions]
    counts = []
    for i, arm in enumerate(arms):
        m = plan.arm_plan(arm).c["model"]
        info = build_tiny(str(tmp_path / str(i)), corpus, {**m["tiny"], "min_pixels": m["min_pixels"],
                                                           "max_pixels": m["max_pixels"]}, specs.PROMPT)
        counts.append(info["parameters"])
    assert len(counts) >= 3 and counts == sorted(counts) and counts[-1] >= 10 * counts[0], counts


@pytest.mark.slow
@pytest.mark.parametrize("name,rules", [
    ("scale", ["stage2__h32", "pretrain__h64", "calibration_choice", "calibration_choice__h32", "figure"]),
    ("modality", ["pretrain__text", "stage2__text", "score__text"]),
    ("negsource", ["beam_negatives"]),
])
def test_each_overlay_plans_its_runs_table_and_figure(tmp_path, name, rules):
    """`snakemake -n` of the overlay over the default config: the DAG holds the variants' rules, the table (and
    F-scale) among the targets of `all`, and the Snakefile still parses fast and lints clean."""
    import time
    wf = copy_workflow(tmp_path / "wf")
    t = time.perf_counter()
    out = run([sys.executable, "-m", "snakemake", "-n", "--configfile", "config/config.yaml",
               f"config/{name}.yaml"], cwd=wf)
    assert time.perf_counter() - t < 60
    stats = out.stdout.split("Job stats:")[1].split("\n\n")[0]
    counts = {line.split()[0]: int(line.split()[1]) for line in stats.splitlines()[3:] if line.strip()}
    for rule in rules:
        assert counts.get(rule, 0) >= 1, (rule, counts)
    assert f"results/tiny/tables/{name}.md" in out.stdout
    if name == "scale":
        assert "results/tiny/figures/scale.png" in out.stdout
    lint = subprocess.run([sys.executable, "-m", "snakemake", "--lint", "--configfile", "config/config.yaml",
                           f"config/{name}.yaml"], cwd=wf, capture_output=True, text=True)
    assert "Congratulations" in lint.stdout + lint.stderr, lint.stdout[-3000:]


@pytest.mark.slow
def test_overlays_validate_as_files():
    for name in ("scale", "modality", "negsource"):
        cfg = load_config(os.path.join(REPO, "config", f"{name}.yaml"), check_paths=False)
        assert cfg["tables"][name]["kind"] == name


def test_negsource_info_rows_give_pairs_per_seed_to_one_decimal():
    from cwdpo.report import _info_rows
    stats = {"mean": 0.5, "std": 0.1, "lo": 0.3, "hi": 0.7}
    spec = {"kind": "negsource", "arms": [{"name": "beams", "calibration": None,
                                           "runs": {"DPO": {}, "CW-DPO": {}},
                                           "negatives": {"DPO": {"method": "dpo"}, "CW-DPO": {"method": "cw_dpo"}}}]}
    info = {"values": {col: {"DPO": 1.0, "CW-DPO": 2.0} for col in ("CIDEr", "CHAIR_s", "top-1")},
            "negatives": {"CW-DPO": {"pairs_by_source": {"beam": 1262 / 3, "onpolicy": 206 / 3, "easy": 492.0},
                                     "size": {"pairs": 2942 / 3, "fill": 0.98, "passes": 3.2653},
                                     "w_c_start_by_source": {"beam": 0.99123}, "train_w_c": stats}}}
    rows = {r[0]: r[1:] for r in _info_rows(spec, [{"name": "beams", "info": info}])}
    assert rows["pairs per seed by source (CW-DPO)"] == ["beam 420.7 · onpolicy 68.7 · easy 492"]
    assert rows["pairs per seed (of the target), passes over them (CW-DPO)"] == ["981 (98%), 3.27 passes"]
    assert rows["mean w_c at the start, by source (CW-DPO, reference model)"] == ["beam 0.991"]
    assert rows["mean w_c during training (CW-DPO)"] == ["0.500 ± 0.100 [0.300, 0.700]"]


@pytest.mark.parametrize("names", [(), ("config/calibrate.yaml",), ("config/scale.yaml",), ("config/modality.yaml",),
                                   ("config/negsource.yaml",)])
def test_every_stage2_run_of_the_default_and_the_overlays_makes_at_most_max_passes(names):
    """Stage 2 is fed by construction: a set below min_fill of its target is refused (make-pairs), so a run's
    passes are at most steps × batch × accumulation / (min_fill × target) — within regime.max_passes for every
    Stage-2 recipe of the default config and of every overlay (its variants included)."""
    cfg = overlay(*names)
    configs = [cfg] + [validate_config(variant_config(cfg, v), check_paths=False) for v in cfg["variants"]]
    for c in configs:
        d = c["data"]["shapes"]["splits"]["finetune"]
        images = d - int(round(c["stage1"]["fraction"] * d))  # (cwdpo.data.stage_split)
        for name in c["stage2"]["recipes"]:
            hp = stage2_recipe(c, name)
            s = c["negatives"]["sets"][hp["negatives"]]
            floor = c["negatives"]["min_fill"] if s.get("min_fill") is None else s["min_fill"]
            target = c["negatives"]["pairs_per_image"] * images
            worst = hp["steps"] * hp["batch_size"] * hp["grad_accum"] / (floor * target)
            assert floor >= c["regime"]["set_fill"] and worst <= c["regime"]["max_passes"], (names, name, worst)


def test_negsource_w_c_at_the_start_uses_the_floor_and_tau_the_run_trained_with(tmp_path):
    """T-negsource's "w_c at the start" per source reads ℓ_floor (a "mean" floor resolved by the training job)
    and τ from the run's metrics.json — the values it trained with — not the config's."""
    import json
    import math
    from cwdpo.report import _mean_w_c_by_source
    pairs, ref, metrics = (str(tmp_path / n) for n in ("pairs.jsonl", "ref.json", "metrics.json"))
    with open(pairs, "w") as f:
        for source in ("onpolicy", "dataset", "onpolicy"):
            f.write(json.dumps({"source": source}) + "\n")
    json.dump({"ref_rejected_avg": [-2.0, -6.0, -4.0]}, open(ref, "w"))
    json.dump({"l_floor": -3.5, "tau": 0.5}, open(metrics, "w"))
    neg = {"method": "cw_dpo", "files": [{"pairs": pairs, "ref": ref, "metrics": metrics, "summary": "-"}]}

    def w(lp):
        return 1.0 / (1.0 + math.exp(-(lp - (-3.5)) / 0.5))
    got = _mean_w_c_by_source(neg)
    assert got == pytest.approx({"dataset": w(-6.0), "onpolicy": (w(-2.0) + w(-4.0)) / 2}, abs=1e-12)
