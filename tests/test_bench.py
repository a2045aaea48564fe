"""`cwdpo bench --quick` writes a well-formed report; `cwdpo estimate` matches a hand computation; the GPU
configs validate and dry-run with placeholder data."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, copy_workflow, run

RATIO_KEYS = ("cw_dpo_over_dpo", "focal_dpo_over_dpo", "sft_c_over_sft", "dpo_over_sft", "cached_ref_over_recompute",
              "dpo_over_trl", "shared_prefix_over_concat", "qa_mix_length_groups_over_one_forward",
              "patch_embed_matmul_over_conv3d", "qa_mix_both_over_neither")


@pytest.mark.slow
def test_bench_quick_writes_every_field(tmp_path):
    wf = copy_workflow(tmp_path / "wf")
    out = tmp_path / "bench"
    run(["cwdpo", "bench", "--quick", "--no-large", "--out", str(out), "--workdir", wf,
         "--experiment-dir", os.path.join(wf, "results", "tiny")], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    r = json.load(open(out / "bench.json"))
    for key in RATIO_KEYS:
        assert isinstance(r["ratios"][key], float) and r["ratios"][key] > 0, key
    for name, t in r["targets"].items():
        assert set(t) == {"value", "limit", "holds"}, name
    for method in ("sft", "sft_c", "sft_c_f50", "sft_c_f25", "dpo", "focal_dpo", "cw_dpo", "dpo_concat",
                   "dpo_recompute_ref"):
        assert r["tiny"][method] > 0
    # the peer comparison starts at log 2 on both sides (policy == reference)
    assert abs(r["trl"]["trl_default_first_loss"] - 0.693147) < 1e-3
    assert abs(r["trl"]["ours_first_loss"] - 0.693147) < 1e-3
    assert r["generation_captions_per_s"] > 0 and r["scoring"]["cider_only_captions_per_s"] > 0
    assert all(r["qa_mix"][f"{fwd}_{patch}"] > 0 for fwd in ("one_forward", "length_groups")
               for patch in ("conv3d", "matmul"))
    assert 0 < r["qa_mix"]["real_positions"] < 1  # the mixed batch pads: what the length groups skip
    assert r["peak_rss_mb"] > 0 and r["dag"]["dry_run_s"] > 0
    assert "noop_rerun_na" in r["dag"]  # no finished run in the fresh folder: said so, no number invented
    md = open(out / "bench.md").read()
    assert "## Targets" in md and "TRL" in md and "half question–answer turns" in md


def _tiny_params_by_hand(t):
    """Parameters of the tiny Qwen2.5-VL, written out layer by layer."""
    H, L, nh, kv, inter, V = (t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"],
                          t["num_key_value_heads"], t["intermediate_size"], t["vocab_size"])
    hd = H // nh
    layer = (H * H + H) + 2 * (H * kv * hd + kv * hd) + H * H + 3 * H * inter + 2 * H
    text = V * H + L * layer + H  # tied lm_head adds nothing
    Hv, D, Iv = t["vision_hidden_size"], t["vision_depth"], t["vision_intermediate_size"]
    block = 2 * Hv + (Hv * 3 * Hv + 3 * Hv) + (Hv * Hv + Hv) + 2 * (Hv * Iv + Iv) + (Iv * Hv + Hv)
    merger = Hv + (4 * Hv) * (4 * Hv) + 4 * Hv + (4 * Hv) * H + H
    vision = 3 * 2 * 14 * 14 * Hv + D * block + merger
    return text + vision, vision


CAPTIONS_ONLY = {"data": {"shapes": {"qa": False}}, "pretrain": {"qa_share": 0.0},
                 "stage1": {"defaults": {"qa_share": 0.0}}}


def test_estimate_matches_a_hand_computation_for_the_tiny_config():
    """The tiny config trained on captions alone (the turns' share: the next test)."""
    from cwdpo.config import load_config
    from cwdpo.estimate import estimate
    cfg = load_config(os.path.join(REPO, "config", "config.yaml"), CAPTIONS_ONLY, check_paths=False)
    est = estimate(cfg, mfu=0.5, peak_flops=1e12)
    n, vision = _tiny_params_by_hand(cfg["model"]["tiny"])
    assert est["parameters"]["total"] == n and est["parameters"]["vision"] == vision
    # side x side images -> (side / 28)^2 merged patches (84 px: 9 image tokens); 16 chat-template tokens;
    # 11.8 words + <|im_end|> + the newline that closes the assistant turn
    side, pre_cfg = cfg["data"]["shapes"]["image_size"], cfg["pretrain"]
    assert est["image_tokens"] == (side // 28) ** 2 and est["prefix_tokens"] == (side // 28) ** 2 + 16
    assert est["caption_tokens"] == pytest.approx(13.8)
    pre = next(r for r in est["rules"] if r["rule"] == "pretrain")
    tokens = pre_cfg["steps"] * pre_cfg["batch_size"] * (est["prefix_tokens"] + 13.8)
    assert pre["tokens"] == pytest.approx(tokens)
    assert pre["flops"] == pytest.approx(6 * n * tokens)
    assert pre["gpu_hours"] == pytest.approx(6 * n * tokens / (1e12 * 0.5) / 3600)
    stability = next(r for r in est["rules"] if r["rule"] == "stability")  # seeds 1 and 2: the pretraining again
    assert stability["jobs"] == 2 and stability["tokens"] == pytest.approx(2 * tokens)
    s2 = next(r for r in est["rules"] if r["rule"] == "stage2 (cw_dpo)")
    # shared prefix: one prefix + chosen + rejected per pair; steps x batch pairs per run
    hp = cfg["stage2"]["defaults"]
    per_pair = est["prefix_tokens"] + 2 * 13.8
    assert s2["tokens"] == pytest.approx(s2["jobs"] * hp["steps"] * hp["batch_size"] * per_pair)
    assert est["total"]["gpu_hours"] == pytest.approx(sum(r["gpu_hours"] for r in est["rules"]))


def test_estimate_counts_the_question_answer_turns_of_the_default():
    """The default: half the pretraining and Stage-1 examples are turns, each with its own prompt (≈ 21.3
    tokens longer than the caption prompt) and a 2.2-token answer + <|im_end|> and the newline; SFT-C adds the
    wrong answer of a turn (its penalty fraction of them) after the shared prefix."""
    from cwdpo.config import load_config
    from cwdpo.estimate import estimate
    cfg = load_config(os.path.join(REPO, "config", "config.yaml"), check_paths=False)
    assert cfg["pretrain"]["qa_share"] == 0.5 and cfg["stage1"]["defaults"]["qa_share"] == 0.5
    est = estimate(cfg, mfu=0.5, peak_flops=1e12)
    prefix, caption = est["prefix_tokens"], est["caption_tokens"]
    turn = prefix + 21.3 + 4.2
    per_sft = 0.5 * (prefix + caption) + 0.5 * turn
    pre_cfg = cfg["pretrain"]
    pre = next(r for r in est["rules"] if r["rule"] == "pretrain")
    assert pre["tokens"] == pytest.approx(pre_cfg["steps"] * pre_cfg["batch_size"] * per_sft)
    hp = cfg["stage1"]["defaults"]
    sft = next(r for r in est["rules"] if r["rule"] == "stage1 (sft)")
    assert sft["tokens"] == pytest.approx(sft["jobs"] * hp["steps"] * hp["batch_size"] * per_sft)
    sft_c = next(r for r in est["rules"] if r["rule"] == "stage1 (sft_c)")
    per_sft_c = 0.5 * (prefix + 2 * caption) + 0.5 * (turn + 4.2)
    assert sft_c["tokens"] == pytest.approx(sft_c["jobs"] * hp["steps"] * hp["batch_size"] * per_sft_c)
    captions_only = estimate(load_config(os.path.join(REPO, "config", "config.yaml"), CAPTIONS_ONLY,
                                         check_paths=False), mfu=0.5, peak_flops=1e12)
    assert pre["tokens"] > next(r for r in captions_only["rules"] if r["rule"] == "pretrain")["tokens"]


@pytest.mark.slow
def test_estimate_prices_the_paper_config_without_downloading(tmp_path):
    out = subprocess.run(["cwdpo", "estimate", "--configfile", os.path.join(REPO, "config", "paper.yaml"), "--json",
                          str(tmp_path / "e.json")], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    est = json.load(open(tmp_path / "e.json"))
    assert 72e9 < est["parameters"]["total"] < 75e9 and est["lora"]
    assert est["total"]["gpu_hours"] > 100 and "total" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3b", "paper"])
def test_gpu_configs_validate_and_dry_run_with_placeholder_paths(tmp_path, name):
    wf = copy_workflow(tmp_path / "wf")
    coco = os.path.join(wf, "data", "coco")
    os.makedirs(os.path.join(coco, "images"))
    img = {"filename": "x.jpg", "filepath": "val2014", "imgid": 0, "cocoid": 1, "split": "test",
           "sentences": [{"raw": "a cat"}]}
    json.dump({"images": [img]}, open(os.path.join(coco, "dataset_coco.json"), "w"))
    open(os.path.join(coco, "negatives_gpt4o.jsonl"), "w").write('{"image_id": 1, "negative": "a dog"}\n')
    for folder in ("flickr30k", "nocaps"):  # the paper config's extra evaluation sets
        os.makedirs(os.path.join(wf, "data", folder, "images"))
    json.dump({"images": [img]}, open(os.path.join(wf, "data", "flickr30k", "dataset_flickr30k.json"), "w"))
    json.dump({"images": [dict(img, domain="in-domain", split="val")]},
              open(os.path.join(wf, "data", "nocaps", "nocaps_val.json"), "w"))
    os.makedirs(os.path.join(wf, "data", "mmmu", "validation"))
    os.makedirs(os.path.join(wf, "data", "mmbench"))
    open(os.path.join(wf, "data", "mmbench", "MMBench_DEV_EN_V11.tsv"), "w").write("index\tquestion\n")
    os.makedirs(os.path.join(wf, "data", "pope"))  # the paper config's POPE files (the release's COCO sets)
    os.makedirs(os.path.join(coco, "val2014"))
    for setting in ("random", "popular", "adversarial"):
        open(os.path.join(wf, "data", "pope", f"coco_pope_{setting}.json"), "w").write(
            '{"question_id": 1, "image": "x.jpg", "text": "Is there a cat in the image?", "label": "yes"}\n')
    cfg = os.path.join("config", f"{name}.yaml")
    run(["cwdpo", "validate-config", "--configfile", cfg], cwd=wf)
    out = run([sys.executable, "-m", "snakemake", "-n", "--configfile", cfg], cwd=wf)
    text = out.stdout + out.stderr
    assert "stage2" in text and "sample_onpolicy" in text and "evaluate" in text
    if name == "paper":
        assert "torchrun --standalone --nproc_per_node 8 --no-python cwdpo train" in text


def test_pipeline_costs_sum_benchmarks_and_span_the_run_from_file_times(tmp_path):
    """Two benchmarked jobs (60 s ending at t0+100, 30 s ending at t0+200) and a table written at t0+230:
    90 job-seconds, the larger RSS, wall = (t0+230) - (t0+40) = 190 s."""
    from cwdpo.bench import pipeline_costs
    t0 = 1_700_000_000
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, rss, end in (("a.tsv", 60.0, 500.0, t0 + 100), ("sub/b.tsv", 30.0, 900.0, t0 + 200)):
        p = tmp_path / "benchmarks" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(head + f"{s}\t0:00:{int(s)}\t{rss}\t1\t1\t1\t0\t0\t50\t{s}\n")
        os.utime(p, (end, end))
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    log.write_text("")
    os.utime(log, (t0 + 150, t0 + 150))
    table = tmp_path / "tables" / "main.md"
    table.parent.mkdir()
    table.write_text("")
    os.utime(table, (t0 + 230, t0 + 230))
    c = pipeline_costs(str(tmp_path))
    assert c["jobs_with_benchmarks"] == 2 and c["sum_job_seconds"] == 90.0 and c["max_job_rss_mb"] == 900.0
    assert c["wall_s"] == pytest.approx(190.0)
    assert "na" in pipeline_costs(str(tmp_path / "missing"))


def test_startup_share_is_summed_from_the_jobs_log_lines(tmp_path):
    """`cwdpo bench` reads each job's `[cwdpo] <command>: start-up X s, work Y s` line (written by every
    cwdpo command) and reports the start-up share of all job-seconds, per command too."""
    from cwdpo.bench.pipeline import startup_costs
    logs = tmp_path / "logs" / "stage1"
    logs.mkdir(parents=True)
    (logs / "a.log").write_text("noise\n[cwdpo] train: start-up 5.00 s, work 15.00 s\n")
    (logs / "b.log").write_text("[cwdpo] train: start-up 3.00 s, work 17.00 s\n")
    (tmp_path / "logs" / "score.log").write_text("[cwdpo] score: start-up 1.00 s, work 39.00 s\n")
    costs = startup_costs(str(tmp_path))
    assert costs["startup_s"] == pytest.approx(9.0) and costs["job_seconds_from_logs"] == pytest.approx(80.0)
    assert costs["startup_share"] == pytest.approx(9 / 80)
    assert costs["startup_by_command"]["train"] == {"jobs": 2, "startup_s": 8.0, "work_s": 32.0}
    assert startup_costs(str(tmp_path / "none"))["startup_share"] is None


def test_every_cwdpo_command_logs_its_start_up_and_work(tmp_path):
    """The line `cwdpo bench` reads: start-up from the process start to the end of the command's imports."""
    import re
    out = subprocess.run(["cwdpo", "validate-config", "--configfile", os.path.join(REPO, "config", "config.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    m = re.search(r"^\[cwdpo\] validate-config: start-up ([0-9.]+) s, work ([0-9.]+) s$", out.stderr, re.M)
    assert m and 0 < float(m.group(1)) < 60 and float(m.group(2)) >= 0
