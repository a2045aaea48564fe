"""Measurements against hand-computed values on tiny distributions; the probe callback on the tiny model."""
import math
import os

import numpy as np
import pytest
import torch

import micro_specs as specs
from cwdpo import dynamics as D
from cwdpo import stats


def logits_of(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64))


def test_tv_of_two_known_distributions():
    p = logits_of([[0.5, 0.5, 0.0 + 1e-300], [1.0, 1e-300, 1e-300]])
    q = logits_of([[0.25, 0.25, 0.5], [1e-300, 1.0, 1e-300]])
    # row 1: ½(0.25 + 0.25 + 0.5) = 0.5; row 2: ½(1 + 1) = 1 -> mean 0.75
    assert D.tv_distance(p, q) == pytest.approx(0.75, abs=1e-12)
    assert D.tv_distance(p, p) == pytest.approx(0.0, abs=1e-15)


def test_js_is_symmetric_bounded_and_known():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(50, 7, generator=g) * 3, torch.randn(50, 7, generator=g) * 3
    assert D.js_divergence(p, q) == pytest.approx(D.js_divergence(q, p), abs=1e-12)
    assert 0 <= D.js_divergence(p, q) <= math.log(2)
    disjoint_p, disjoint_q = logits_of([[1.0, 1e-300]]), logits_of([[1e-300, 1.0]])
    assert D.js_divergence(disjoint_p, disjoint_q) == pytest.approx(math.log(2), abs=1e-9)
    # closed form for p = (½, ½), q = (1, 0): m = (¾, ¼); JS = ½[½ln(2/3)+½ln 2] + ½ ln(4/3)
    p, q = logits_of([[0.5, 0.5]]), logits_of([[1.0, 1e-300]])
    expected = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert D.js_divergence(p, q) == pytest.approx(expected, abs=1e-9)


def test_entropy_of_uniform_is_log_v_and_top1():
    v = 448
    u = torch.zeros(5, v)
    assert D.entropy(u) == pytest.approx(math.log(v), abs=1e-9)
    assert D.top1_mass(u) == pytest.approx(1 / v)
    peaked = logits_of([[0.9, 0.05, 0.05]])
    assert D.top1_mass(peaked) == pytest.approx(0.9)
    assert D.entropy(peaked) == pytest.approx(-(0.9 * math.log(0.9) + 2 * 0.05 * math.log(0.05)))


def test_ece_of_a_perfectly_calibrated_set_is_near_zero_and_of_a_biased_one_is_the_gap():
    rng = np.random.default_rng(0)
    conf = torch.tensor(rng.uniform(0.05, 1.0, 200_000))
    correct = torch.tensor((rng.uniform(size=200_000) < conf.numpy()).astype(np.float64))
    assert D.ece(conf, correct, 15) < 0.005
    # always 0.9 confident, right half the time: ECE = |0.5 - 0.9| = 0.4; Brier = mean (0.9 - y)^2 = 0.41
    conf2 = torch.full((1000,), 0.9)
    corr2 = torch.tensor([1.0, 0.0] * 500)
    assert D.ece(conf2, corr2) == pytest.approx(0.4)
    assert D.brier(conf2, corr2) == pytest.approx(0.5 * 0.01 + 0.5 * 0.81)
    # the ECE bootstrap of T-paper computes the same ECE as the measures (one implementation)
    def doc(c, y):
        return {"conf": c.tolist(), "correct": y.tolist(), "position_image": [i % 50 for i in range(len(c))]}

    d = stats.ece_difference_ci([doc(conf[:5000], correct[:5000])], [doc(conf2, corr2)], n_resamples=20)
    assert d["diff"] == D.ece(conf[:5000], correct[:5000]) - D.ece(conf2, corr2)


def test_reliability_bins_partition_the_positions():
    conf = torch.tensor([0.0, 0.05, 1 / 15, 0.5, 0.99, 1.0], dtype=torch.float64)
    bins = D.reliability_bins(conf, torch.ones(6), 15)
    assert sum(b["count"] for b in bins) == 6
    assert bins[0]["count"] == 3 and bins[-1]["count"] == 2  # 1/15 is in (0, 1/15]; 0 goes to the first bin


def test_per_position_matches_the_means():
    g = torch.Generator().manual_seed(1)
    lg, rf = torch.randn(40, 9, generator=g), torch.randn(40, 9, generator=g)
    tg = torch.randint(0, 9, (40,), generator=g)
    pp = D.per_position(lg, tg, rf)
    m = D.distribution_measures(lg, tg, rf)
    for k in ("entropy", "top1", "tv", "js"):
        assert float(pp[k].mean()) == pytest.approx(m[k], abs=1e-12)


def test_stats_helpers():
    m, lo, hi = stats.seed_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2 - 4.302652729911275 / math.sqrt(3)) and hi > 3
    assert stats.verdict(0.1, 0.5, ">") == "holds" and stats.verdict(-0.5, -0.1, ">") == "does not hold"
    assert stats.verdict(-0.1, 0.5, ">") == "inconclusive" and stats.verdict(-0.5, -0.1, "<") == "holds"
    assert stats.win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert stats.convergence_step([0, 10, 20, 30], [0.1, 0.5, 0.96, 1.0]) == 20
    # reaching 95% once is not enough: it must stay within 5% of the final value
    assert stats.convergence_step([0, 10, 20, 30, 40], [0.1, 0.97, 0.5, 0.96, 1.0]) == 30
    # a falling curve (a degrading model) settles when it stops moving, not at step 0
    assert stats.convergence_step([0, 10, 20, 30], [2.0, 1.5, 1.02, 1.0]) == 20
    d, lo, hi = stats.paired_bootstrap_ci([1.0, 2.0, 3.0, 4.0] * 10, [0.0, 1.0, 2.5, 3.0] * 10)
    assert d == pytest.approx(0.875) and lo < d < hi and lo > 0  # differences 1, 1, 0.5, 1
    # seeds >= 3: a t-interval over paired per-seed differences
    r = stats.difference_ci([{"value": 3.0}, {"value": 4.0}, {"value": 5.0}],
                            [{"value": 1.0}, {"value": 1.5}, {"value": 2.5}])
    assert r["diff"] == pytest.approx(7 / 3) and "t-interval" in r["method"]


@pytest.mark.train
def test_probe_callback_runs_on_the_tiny_model_and_writes_finite_values(tiny_model_dir, shapes_dir, shapes_records,
                                                                       tmp_path):
    import json
    from cwdpo import train as T
    from cwdpo.negatives import build_probe_set
    recs = [r for r in shapes_records if r.split == "test"][:6]
    samples = {r.image_id: [{"text": "a red circle", "score": 0.1}] for r in recs}
    rows = build_probe_set(recs, samples, specs.negatives(), seed=0)
    assert all(r["gentle"] and r["easy"] and r["onpolicy"] == "a red circle" for r in rows)
    probe_path = tmp_path / "probe.jsonl"
    probe_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from cwdpo.specs import ProbesSpec
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    probes = ProbesSpec(rows=str(probe_path), interval=3, batch_size=8, n_bins=15, images=6,
                        val=specs.data(data_json, ["test"]), val_images=6, val_interval=3, top5=True, max_new_tokens=8)
    spec = specs.train("sft", tiny_model_dir, data_json, stage=None, probes=probes,
                       hparams={"lr": 3e-3, "steps": 6, "batch_size": 8, "schedule": "constant"},
                       train={"logging_steps": 3})
    T.run_training(spec, str(tmp_path / "run"), threads=1)
    probes = T.read_train_log(str(tmp_path / "run" / "probes.csv"))
    assert [int(r["step"]) for r in probes] == [0, 3, 6]
    first = probes[0]
    assert float(first["tv"]) == 0.0 and float(first["dlogp_positive"]) == 0.0  # θ0 is its own reference
    for r in probes:
        for col in ("tv", "js", "entropy", "top1", "ece", "brier", "dlogp_positive", "dlogp_gentle", "dlogp_easy",
                    "dlogp_onpolicy", "val_cider", "val_cider_top5"):
            assert math.isfinite(float(r[col])), (r["step"], col)
    assert float(probes[-1]["tv"]) > 0 and "train_loss" in probes[-1] and float(probes[-1]["train_loss"]) > 0
    assert os.path.isfile(tmp_path / "run" / "probe_ref.pt")
