"""The trainer: every method trains; reference log-probs are computed once, cached, and reused."""
import json
import math
import os

import pytest


import micro_specs as specs
from cwdpo import reference as R
from cwdpo import train as T
from cwdpo.data import read_json
from cwdpo.negatives import build_pairs, write_pairs

PROMPT = specs.PROMPT
HPARAMS = {"lr": 1e-3, "steps": 4, "batch_size": 4, "schedule": "constant", "margin": 4.0, "lam": 0.5}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory, shapes_records):
    recs = [r for r in shapes_records if r.split == "finetune"][:12]
    pairs, summary = build_pairs(recs, specs.negatives(pairs_per_image=2, p_easy=0.5), rho=1.0, seed=0)
    path = str(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")
    write_pairs(path, pairs, PROMPT)
    assert summary["pairs"] == 24
    return path


def _spec(method, init, data_json, hparams=None, **changes):
    return specs.train(method, init, data_json, hparams={**HPARAMS, **(hparams or {})},
                       train={"logging_steps": 1, "save_steps": 100}, **changes)


@pytest.mark.slow
def test_reference_logps_computed_once_and_cached(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = R.completion_logps

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(R, "completion_logps", counting)
    out = str(tmp_path / "ref.json")
    doc = R.reference_logps(tiny_model_dir, pairs_file, out, specs.vlm(), batch_size=8)
    assert calls["n"] == 3 and doc["n_pairs"] == 24  # one forward per batch of 8 pairs
    assert all(math.isfinite(x) for x in doc["ref_chosen_logps"] + doc["ref_rejected_logps"])
    mtime = os.path.getmtime(out)
    again = R.reference_logps(tiny_model_dir, pairs_file, out, specs.vlm(), batch_size=8)
    assert calls["n"] == 3 and os.path.getmtime(out) == mtime and again == doc  # cache hit: no forward
    # a different pairs file is a cache miss (the key holds the pairs' hash)
    other = str(tmp_path / "pairs2.jsonl")
    with open(pairs_file) as f, open(other, "w") as g:
        g.write("".join(list(f)[:8]))
    R.reference_logps(tiny_model_dir, other, out, specs.vlm(), batch_size=8)
    assert calls["n"] == 4


@pytest.mark.train
@pytest.mark.parametrize("method", ["dpo", "focal_dpo", "cw_dpo"])
def test_stage2_reuses_cached_reference_across_epochs(tiny_model_dir, shapes_dir, pairs_file, tmp_path, method):
    ref = str(tmp_path / "ref.json")
    R.reference_logps(tiny_model_dir, pairs_file, ref, specs.vlm())
    # 24 pairs / batch 4 = 6 steps per epoch: 14 steps are more than two epochs
    spec = _spec(method, tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"), pairs=pairs_file,
                 ref_logps=ref, hparams={"steps": 14, "filter": {"enabled": method == "cw_dpo", "k": 2.0}})
    out = str(tmp_path / "run")
    seen = []
    real_collate = T.Collator.__call__

    def spy(self, items):
        batch = real_collate(self, items)
        seen.append(batch)
        return batch

    T.Collator.__call__ = spy
    try:
        metrics = T.run_training(spec, out, threads=1)
    finally:
        T.Collator.__call__ = real_collate
    assert metrics["steps"] == 14
    # passes over the set, before CW-DPO's filter: 14 steps × 4 pairs / 24 pairs
    assert metrics["data"]["pairs"] == 24 and metrics["data"]["passes"] == pytest.approx(14 * 4 / 24)
    assert read_json(os.path.join(out, "metrics.json"))["data"]["passes"] == pytest.approx(14 * 4 / 24)
    cached = read_json(ref)
    # every batch carried the cached reference values of its pairs; the trainer never ran a reference model
    for b in seen:
        idx = b["pair_index"].tolist()
        assert b["ref_chosen_logps"].tolist() == [cached["ref_chosen_logps"][i] for i in idx]
    log = T.read_train_log(os.path.join(out, "train_log.csv"))
    # policy == reference at step 1, so every margin is 0 and the loss is log 2 (focal: (1/2)^γ log 2)
    first = float(log[0]["loss"])
    expected = math.log(2) * (0.25 if method == "focal_dpo" else 1.0)
    assert first == pytest.approx(expected, abs=2e-4)
    assert all(math.isfinite(float(r["loss"])) for r in log)
    if method == "cw_dpo":
        assert 0 < float(log[-1]["w_c"]) <= 1 and "filtered_frac" in log[-1]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))


def test_stage2_refuses_reference_of_other_pairs(tiny_model_dir, shapes_dir, pairs_file, tmp_path):
    other = str(tmp_path / "other.jsonl")
    with open(pairs_file) as f, open(other, "w") as g:
        g.write("".join(list(f)[:8]))
    ref = str(tmp_path / "ref.json")
    R.reference_logps(tiny_model_dir, other, ref, specs.vlm())
    spec = _spec("dpo", tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"), pairs=pairs_file,
                 ref_logps=ref)
    with pytest.raises(ValueError, match="another pairs file"):
        T.run_training(spec, str(tmp_path / "run"), threads=1)


@pytest.mark.train
@pytest.mark.parametrize("method", ["sft", "sft_c"])
def test_stage1_methods_train(tiny_model_dir, shapes_dir, tmp_path, method):
    spec = _spec(method, tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"))
    metrics = T.run_training(spec, str(tmp_path / "run"), threads=1)
    log = T.read_train_log(str(tmp_path / "run" / "train_log.csv"))
    assert metrics["data"]["images"] == 30 and len(log) == 4
    assert metrics["data"]["passes"] == pytest.approx(4 * 4 / metrics["data"]["examples"])
    assert all(math.isfinite(float(r["loss"])) for r in log)
    if method == "sft_c":
        # a random-init model puts NLL ≈ ln V ≈ 6 on negatives: with C = 4 the constraint is inactive
        assert float(log[0]["penalty"]) == 0.0
        assert float(log[0]["neg_nll"]) > 4.0


@pytest.mark.train
def test_sft_c_hard_constraint_uses_hard_lambda(tiny_model_dir, shapes_dir, tmp_path):
    spec = _spec("sft_c", tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"),
                 hparams=dict(margin=10.0, lam=0.5, hard=True, hard_lam=100.0, steps=1))
    T.run_training(spec, str(tmp_path / "run"), threads=1)
    row = T.read_train_log(str(tmp_path / "run" / "train_log.csv"))[0]
    # penalty = λ_hard · (C − mean NLL(y−))
    assert float(row["penalty"]) == pytest.approx(100.0 * (10.0 - float(row["neg_nll"])), rel=1e-5)


@pytest.mark.train
def test_lora_stage1_then_stage2_continues_the_adapter(tiny_model_dir, shapes_dir, pairs_file, tmp_path):
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    spec = _spec("sft", tiny_model_dir, os.path.join(shapes_dir, "dataset_shapes.json"), lora=lora,
                 vlm=specs.vlm(base=tiny_model_dir))
    m1 = T.run_training(spec, str(tmp_path / "s1"), threads=1)
    adapter = str(tmp_path / "s1" / "model")
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))
    assert m1["trainable_parameters"] < m1["parameters"] / 5
    ref = str(tmp_path / "ref.json")
    R.reference_logps(adapter, pairs_file, ref, specs.vlm(base=tiny_model_dir))
    spec2 = _spec("cw_dpo", adapter, os.path.join(shapes_dir, "dataset_shapes.json"), pairs=pairs_file,
                  ref_logps=ref, lora=lora, vlm=specs.vlm(base=tiny_model_dir))
    T.run_training(spec2, str(tmp_path / "s2"), threads=1)
    log = T.read_train_log(str(tmp_path / "s2" / "train_log.csv"))
    assert float(log[0]["loss"]) == pytest.approx(math.log(2), abs=2e-4)  # starts exactly at its reference
    assert os.path.isfile(os.path.join(tmp_path, "s2", "model", "adapter_config.json"))


@pytest.mark.train
def test_a_recipe_is_evaluated_with_the_tau_and_floor_it_trained_with(tiny_model_dir, shapes_dir, pairs_file,
                                                                      tmp_path):
    """A CW-DPO recipe with its own τ (0.5, not stage2.defaults' 1.0) and ℓ_floor "mean": its metrics.json
    records both as resolved, and its evaluation computes the held-out pairs' w_c with them, not with the
    config's defaults."""
    import dataclasses
    from cwdpo import evaluate as E
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    ref = str(tmp_path / "ref.json")
    R.reference_logps(tiny_model_dir, pairs_file, ref, specs.vlm())
    spec = _spec("cw_dpo", tiny_model_dir, data_json, pairs=pairs_file, ref_logps=ref,
                 hparams={"steps": 2, "tau": 0.5, "l_floor": "mean"})
    out = str(tmp_path / "run")
    T.run_training(spec, out, threads=1)
    metrics = read_json(os.path.join(out, "metrics.json"))
    floor = T.resolve_l_floor("mean", ref)
    assert metrics["tau"] == 0.5 and metrics["l_floor"] == pytest.approx(floor) and floor != -5.0
    assert metrics["hparams"]["tau"] == 0.5 and metrics["hparams"]["l_floor"] == metrics["l_floor"]
    assert metrics["hparams"]["beta"] == spec.hparams["beta"] and metrics["hparams"]["filter"] == spec.hparams["filter"]
    plan = specs.micro_plan()
    key = next(k for k in plan.eval_keys() if k.endswith("/cw_dpo"))
    default = plan.eval_spec(key)
    assert default.tau == 1.0 and default.l_floor == -5.0  # what the config alone would give
    ev = dataclasses.replace(default, model=os.path.join(out, "model"), data=specs.data(data_json, ("test",)),
                             heldout_pairs=pairs_file, run_metrics=os.path.join(out, "metrics.json"),
                             reference=None, eval_sets=[], mcq_sets=[], pope_sets=(), objects=None, topk_beams=0,
                             max_new_tokens=8)
    E.run(ev, str(tmp_path / "captions.json"), str(tmp_path / "measures.json"), threads=1)
    held = read_json(str(tmp_path / "measures.json"))["heldout"]
    assert held["tau"] == 0.5 and held["l_floor"] == pytest.approx(floor)


def test_l_floor_mean_is_the_mean_negative_logp_under_the_reference(tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"ref_rejected_avg": [-4.0, -6.0, -8.0]}))
    assert T.resolve_l_floor("mean", str(ref)) == pytest.approx(-6.0)
    assert T.resolve_l_floor(-3, None) == -3.0


def test_unknown_method_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown method"):
        T.CWDPOTrainer(method="ppo", hparams={}, encoder=None)
