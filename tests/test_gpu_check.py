"""scripts/gpu_check.sh, the one command a session lent a GPU runs, at toy sizes on the CPU (`--cpu`): the
smoke test, then the qwen3b rehearsal's jobs from the plan's specs (no Snakemake), one JSON. On a GPU the
same script runs preset 3b and the ~0.7B stand-in and asserts `cuda`; that has not run on a GPU here."""
import json
import os
import subprocess

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HOME": str(tmp_path / "elsewhere"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    p = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--cpu", "--out", str(out),
                        "--workdir", str(tmp_path / "work"), "--threads", "2"], env=env, capture_output=True,
                       text=True)  # no time limit: a busy machine makes it slow, never failed
    doc = json.loads(out.read_text())
    assert p.returncode == 0, json.dumps(doc)[-4000:] + p.stderr[-2000:]
    assert doc["mode"] == "cpu" and not [k for k, v in doc["modules"].items() if v.startswith("missing")]
    smoke = doc["gpu_smoke"]
    assert smoke["rc"] == 0 and smoke["loss_finite"] and smoke["train_tokens_per_s"] > 0
    assert smoke["gen_tokens_per_s"] > 0 and 0 < smoke["mfu"] < 1
    r = doc["rehearsal"]
    assert r["ok"] and r["setup"]["model"] == "cwdpo-rehearsal/Qwen2.5-VL-stand-in"
    assert [j["job"] for j in r["jobs"]] == [
        "fetch_model", "validate_data", "heldout_pairs", "sample_onpolicy/base", "probe_set/base", "stage1/sft_c",
        "sample_onpolicy/sft_c", "probe_set/sft_c", "make_pairs", "ref_logps", "stage2/cw_dpo", "evaluate"]
    assert all(j["rc"] == 0 for j in r["jobs"])
    # every model the jobs loaded reports where it ran (here the CPU; on the GPU the check requires cuda)
    assert set(r["devices"].values()) == {"cpu"} and len(r["devices"]) == 6
    assert r["stage2"]["steps"] == 4 and 0 <= r["evaluation"]["pref_acc"] <= 1
    assert not os.path.exists(env["HF_HOME"])
