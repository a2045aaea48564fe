"""The qwen3b rehearsal with on-policy sampling through a real vLLM engine (marker `gpu_stack`; run in the
GPU-stack environment by `bash scripts/gpu_stack_env.sh --test`): config/qwen3b.yaml, tests/configs/rehearsal.yaml
and tests/configs/rehearsal_vllm.yaml, end to end to every table. The base model is sampled from the stand-in hub
model, the SFT-C model through its Stage-1 LoRA adapter as a `LoRARequest`; each on-policy summary carries the
vLLM–HF log-prob parity of its first samples (tolerance: tests/test_gpu_stack.py)."""
import csv
import json
import math
import os

import pytest

from test_gpu_stack import PARITY_MAX, PARITY_MEAN
from test_rehearsal import CONFIGS, _res, run_rehearsal

pytestmark = pytest.mark.gpu_stack


@pytest.fixture(scope="module")
def rehearsal_vllm(tmp_path_factory):
    return run_rehearsal(tmp_path_factory.mktemp("rehearsal_vllm"), CONFIGS + ["tests/configs/rehearsal_vllm.yaml"])


def test_vllm_rehearsal_reaches_every_table(rehearsal_vllm):
    work, _, setup, timing = rehearsal_vllm
    rows = {r["method"]: r for r in csv.DictReader(open(_res(work, "tables", "main.csv")))}
    for name in ("base", "SFT-C", "CW-DPO", "DPO (from base)"):
        for col in ("BLEU-4", "CIDEr", "ECE", "pref. acc."):
            assert math.isfinite(float(rows[name][col])), (name, col)
    for table in ("paper", "ablation", "focal", "floor", "mix", "stage1_cost"):
        assert os.path.getsize(_res(work, "tables", f"{table}.md")) > 0
    pairs = json.load(open(_res(work, "negatives", "sft_c", "s0", "pairs_mix_summary.json")))
    assert pairs["by_source"]["onpolicy"] > 0  # vLLM's samples became negatives


@pytest.mark.parametrize("start,lora", [("base", False), ("sft_c", True)])
def test_vllm_onpolicy_summary_says_vllm_and_carries_the_parity(rehearsal_vllm, start, lora):
    work = rehearsal_vllm[0]
    summary = json.load(open(_res(work, "negatives", start, "s0", "onpolicy_summary.json")))
    assert summary["backend"] == "vllm" and summary["decoding"]["backend"] == "vllm" and summary["device"] == "vllm"
    parity = summary["logprob_parity"]
    assert parity["lora"] is lora and parity["dtype"] == "float32"
    assert parity["samples"] == 16 and parity["prompts_equal"] == 16 and parity["tokens"] > 16
    assert parity["mean_abs"] <= PARITY_MEAN and parity["max_abs"] <= PARITY_MAX, parity
    log = open(_res(work, "logs", "negatives", f"{start}_s0_onpolicy.log")).read()
    assert "vllm" in log.lower()
