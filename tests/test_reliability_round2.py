"""Reliability, round 2 (issue 24): stale weights after a data change, probes lost on a resume at the last
step, shell from a config, NaN in a table, images every job can take, pass-through dictionaries, and the
smaller items. The one-line messages of bad configs and data are in the catalogue (test_bad_inputs.py)."""
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import micro_specs as specs
from conftest import REPO, copy_workflow, run
from cwdpo.specs import to_json


# ---------------------------------------------------------------------------------------------------
# a local base model (model.source: <folder>, pretrain.enabled: false), planned from the micro config

def _local_plan(folder, **overlay):
    from cwdpo.config import deep_merge, load_config
    from cwdpo.plan import Plan
    base = {"experiment": "local", "model": {"source": folder}, "pretrain": {"enabled": False}}
    return Plan(load_config(specs.MICRO_CONFIG, deep_merge(base, overlay)))


def _prepare(plan):
    """The data jobs of `plan` in the working directory: the `shapes` file and its validated report."""
    from cwdpo.data import validate_data
    from cwdpo.shapes import write_dataset
    write_dataset(plan.shapes_spec(), os.path.dirname(plan.data_json()))
    validate_data(plan.validate_spec(), plan.path("validated"))


@pytest.mark.train
def test_a_data_change_never_resumes_the_checkpoint_of_other_data(tiny_model_dir, tmp_path, monkeypatch):
    """Issue 24 item 1: with a local base model the init folder does not change when the data does; the
    fingerprint covered only the spec's text and its init/pairs files, so the rerun resumed the old final
    checkpoint and published the old weights as trained on the new data."""
    from safetensors.torch import load_file

    from cwdpo.train import run_training
    monkeypatch.chdir(tmp_path)
    model = str(tmp_path / "base_model")
    shutil.copytree(tiny_model_dir, model)
    # captions only: a Stage-1 spec that mixes in question–answer turns names the data seed (their draw), so
    # the seed's change below would change the spec's text too
    captions_only = {"probes": {"enabled": False}, "stage1": {"defaults": {"qa_share": 0.0}}}
    plan = _local_plan(model, **captions_only)
    _prepare(plan)
    spec = plan.stage1_spec("sft", 0)
    out = plan.run_dir("stage1/sft/s0")
    first = run_training(spec, out)
    weights = load_file(os.path.join(out, "model", "model.safetensors"))
    changed = _local_plan(model, **captions_only, data={"shapes": {"seed": 7}})
    _prepare(changed)  # the same paths, other images and captions
    assert changed.stage1_spec("sft", 0) == spec  # the spec's text is the same: only the files changed
    second = run_training(changed.stage1_spec("sft", 0), out)
    assert first["resumed_from"] is None and second["resumed_from"] is None
    again = load_file(os.path.join(out, "model", "model.safetensors"))
    assert any(not (weights[k] == again[k]).all() for k in weights)
    # the same data again: the checkpoint of these very inputs is resumed
    assert run_training(changed.stage1_spec("sft", 0), out)["resumed_from"] == "checkpoint-8"


def test_the_fingerprint_of_a_hub_model_follows_its_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    from cwdpo import hub
    from cwdpo.train import spec_fingerprint
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    hub.publish_to_cache(tiny_model_dir, "cwdpo-test/base", str(home / "hub"))
    spec = specs.train("sft", "cwdpo-test/base", str(tmp_path / "data.json"))
    spec = dataclasses.replace(spec, vlm=dataclasses.replace(spec.vlm, base="cwdpo-test/base"))
    before = spec_fingerprint(spec)
    assert spec_fingerprint(spec) == before
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with open(other / "config.json", "a") as f:
        f.write("\n")  # another revision of the model
    hub.publish_to_cache(str(other), "cwdpo-test/base", str(home / "hub"))
    assert spec_fingerprint(spec) != before


# ---------------------------------------------------------------------------------------------------
# item 2: a resume at the last step restores everything an uninterrupted run writes

def _fused_setup(tiny_model_dir, root):
    """A local-model experiment under `root` with every input of the Stage-1 SFT job and its fused
    evaluation (the data, the probe set, the held-out pairs); returns (plan, train argv)."""
    from cwdpo.negatives import make_pairs, write_probe_set
    os.makedirs(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        plan = _local_plan(tiny_model_dir, compute={"evaluate_in_training_job": True})  # as at the tiny scale
        _prepare(plan)
        write_probe_set(plan.probe_set_spec("base", 0), None, plan.path("probe_set", stage1="base", seed=0))
        make_pairs(plan.heldout_spec(), None, plan.path("heldout_pairs"), plan.path("heldout_summary"))
    finally:
        os.chdir(cwd)
    key = "stage1/sft/s0"
    assert plan.fused_eval_args(key)
    argv = ["cwdpo", "train", "--spec", to_json(plan.stage1_spec("sft", 0)), "--out", plan.run_dir(key),
            "--threads", "1", *shlex.split(plan.fused_eval_args(key))]
    return plan, argv


def _outputs(plan, key):
    """The declared outputs of the training rule of `key` (Snakemake deletes them before a rerun)."""
    outs = [plan.run_file(key, f) for f in ("model", "metrics", "train_log", "probes")]
    for name, value in plan.eval_outputs(key).items():
        outs += value if isinstance(value, list) else [value]
    return outs


@pytest.mark.slow
def test_a_kill_during_the_fused_evaluation_then_a_rerun_restores_every_file(tiny_model_dir, tmp_path):
    """Issue 24 item 2: the rerun resumes at the final checkpoint; it used to skip training without
    reloading probes.partial.jsonl and wrote probes.csv with its header only."""
    key = "stage1/sft/s0"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    plan, argv = _fused_setup(tiny_model_dir, whole)
    _fused_setup(tiny_model_dir, killed)
    run(argv, cwd=whole, env=env)
    proc = subprocess.Popen(argv, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = os.path.join(killed, plan.run_file(key, "metrics"))
    while not os.path.exists(metrics) and proc.poll() is None:  # training done: the evaluation starts
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # a preemption during the evaluation
    proc.wait()
    assert not os.path.exists(os.path.join(killed, plan.eval_outputs(key)["measures"])), "evaluated before the kill"
    for out in _outputs(plan, key):  # what `snakemake --rerun-incomplete` deletes before it reruns the job
        path = os.path.join(killed, out)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path) if os.path.exists(path) else None
    run(argv, cwd=killed, env=env)
    a = json.load(open(os.path.join(whole, plan.run_file(key, "metrics"))))
    b = json.load(open(os.path.join(killed, plan.run_file(key, "metrics"))))
    assert a["resumed_from"] is None and b["resumed_from"] == "checkpoint-8"
    assert {k: v for k, v in a.items() if k != "resumed_from"} == {k: v for k, v in b.items() if k != "resumed_from"}
    probes = open(os.path.join(killed, plan.run_file(key, "probes"))).read()
    assert len(probes.splitlines()) > 2  # the learning dynamics, not a header
    for out in _outputs(plan, key):
        if out.endswith("metrics.json"):
            continue  # compared above
        if out.endswith("model"):
            out = os.path.join(out, "model.safetensors")  # the weights, byte for byte
        assert open(os.path.join(whole, out), "rb").read() == open(os.path.join(killed, out), "rb").read(), out


@pytest.mark.train
def test_a_final_checkpoint_whose_probe_rows_are_lost_is_trained_again(tiny_model_dir, tmp_path, monkeypatch):
    from cwdpo.train import run_training
    monkeypatch.chdir(tmp_path)
    plan = _local_plan(tiny_model_dir)
    _prepare(plan)
    from cwdpo.negatives import write_probe_set
    write_probe_set(plan.probe_set_spec("base", 0), None, plan.path("probe_set", stage1="base", seed=0))
    spec = dataclasses.replace(plan.stage1_spec("sft", 0), probes=dataclasses.replace(
        plan.stage1_spec("sft", 0).probes, val_interval=0))
    out = plan.run_dir("stage1/sft/s0")
    run_training(spec, out)
    rows = open(os.path.join(out, "probes.csv")).read()
    assert run_training(spec, out)["resumed_from"] == "checkpoint-8"
    assert open(os.path.join(out, "probes.csv")).read() == rows
    os.remove(os.path.join(out, "probes.partial.jsonl"))
    assert run_training(spec, out)["resumed_from"] is None
    assert open(os.path.join(out, "probes.csv")).read() == rows


# ---------------------------------------------------------------------------------------------------
# item 3: no config value reaches a shell unquoted

def _string_leaves(node, path=()):
    if isinstance(node, str):
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _string_leaves(v, path + (k,))


def _set(config, path, value):
    node = config
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _hostile_config(overlay: dict) -> tuple:
    """The micro config (with `overlay`) where every string the validation accepts holds a hostile value
    (its own marker: `$(...)`, backquotes, quotes, `;`); returns (config text, markers)."""
    import copy

    from cwdpo.config import ConfigError, deep_merge, load_config, read_config_file, validate_config
    raw = deep_merge(deep_merge(read_config_file(os.path.join(REPO, "config", "config.yaml")),
                                read_config_file(specs.MICRO_CONFIG)), overlay)
    filled = load_config(specs.MICRO_CONFIG, overlay, check_paths=False)
    accepted, markers = copy.deepcopy(raw), []
    for i, path in enumerate(_string_leaves(filled)):
        if path == ("model", "source"):
            continue  # chooses the kind of model (tiny, a hub id or an existing folder): kept
        mark = f"PWNED{i}"
        hostile = f"x$(touch {mark}a)`touch {mark}b`'\"; touch {mark}c; \\"
        trial = deep_merge(copy.deepcopy(accepted), {})
        try:
            node = trial
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = hostile
            validate_config(copy.deepcopy(trial), check_paths=False)
        except (ConfigError, KeyError, TypeError, AttributeError):
            continue
        accepted = trial
        markers.append((".".join(map(str, path)), mark))
    return json.dumps(accepted), markers


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "hub"])
def test_no_config_string_reaches_a_rule_shell_or_prefix_unquoted(tmp_path, model):
    """Every string of the config the validation lets through is made hostile, then every shell command of
    the DAG (`snakemake -n -p`), behind the prefix the Snakefile sets (`shell.prefix`: the hub model's
    cache), runs under bash with stub commands: no marker file appears, and the stub receives the values
    intact. (`model.cache: 'res/$(touch /tmp/PWNED)x'` ran at the first job of a hub config.)"""
    from cwdpo.config import validate_config
    from cwdpo.plan import Plan
    overlay = {} if model == "tiny" else {"model": {"source": "cwdpo-test/Qwen2.5-VL-hub"},
                                          "pretrain": {"enabled": False}}
    text, markers = _hostile_config(overlay)
    names = [k for k, _ in markers]
    assert "prompt" in names and ("model.cache" in names) and len(markers) >= 5, names
    wf = copy_workflow(tmp_path / "wf")
    cfg = tmp_path / "hostile.json"
    cfg.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--configfile", str(cfg)], cwd=wf,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    commands = re.findall(r"^Shell command: (.*)$", proc.stdout + proc.stderr, re.M)
    assert len(commands) > 10
    plan = Plan(validate_config(json.loads(text), check_paths=False))
    prefix = f"set -euo pipefail; {plan.hf_env()}" if plan.hub else ""
    assert bool(prefix) == (model == "hub")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "calls.jsonl"
    for name in ("cwdpo", "torchrun", "accelerate"):
        (stubs / name).write_text(f"#!{sys.executable}\nimport json, os, sys\nopen({str(calls)!r}, 'a').write("
                                  "json.dumps({'argv': sys.argv[1:], 'HF_HOME': os.environ.get('HF_HOME')}) + '\\n')\n")
        (stubs / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        for log in re.findall(r"> (\S+) 2>&1", command):
            os.makedirs(os.path.dirname(os.path.join(work, shlex.split(log)[0])), exist_ok=True)
        subprocess.run(["bash", "-c", prefix + command], cwd=work, env=env, capture_output=True, text=True)
    made = [p for p in os.listdir(work) if p.startswith("PWNED")] + \
        [p for p in os.listdir(tmp_path) if p.startswith("PWNED")]
    assert not made, made
    got = [json.loads(line) for line in open(calls)]
    assert len(got) >= len(commands) // 2
    prompt = dict(markers)["prompt"]
    assert any(any(prompt in a for a in c["argv"]) for c in got)  # the value arrived whole, as data
    if model == "hub":
        cache = plan.c["model"]["cache"]
        assert {c["HF_HOME"] for c in got} == {os.path.join(str(work), cache)}


def test_the_hub_prefix_quotes_the_cache(tmp_path):
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    for cache in ("res/$(touch PWNED)x", "/abs/`touch PWNED`'q'", "spaces and \"quotes\""):
        plan = Plan(load_config(specs.MICRO_CONFIG, {"model": {"source": "org/name", "cache": cache},
                                                     "pretrain": {"enabled": False}}, check_paths=False))
        out = subprocess.run(["bash", "-c", plan.hf_env() + 'printf "%s\\n%s" "$HF_HOME" "$HF_HUB_CACHE"'],
                             cwd=tmp_path, capture_output=True, text=True).stdout.split("\n")
        home = cache if os.path.isabs(cache) else os.path.join(str(tmp_path), cache)
        assert out == [home, home + "/hub"] and not (tmp_path / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------
# item 4: a NaN in an evaluation file stops the table job

def _table_spec(tmp_path, scores: dict, measures: dict) -> dict:
    ev = tmp_path / "eval" / "stage1" / "sft" / "s0"
    ev.mkdir(parents=True)
    (ev / "scores.json").write_text(json.dumps(scores))
    (ev / "measures.json").write_text(json.dumps(measures))
    return {"name": "t", "kind": "comparison", "title": "t", "scale": 100.0, "extra_columns": {},
            "files": {"scores": str(tmp_path / "eval" / "{key}" / "scores.json"),
                      "measures": str(tmp_path / "eval" / "{key}" / "measures.json")},
            "rows": [{"name": "SFT | one", "keys": ["stage1/sft/s0"], "sft_keys": [None]}],
            "columns": ["CIDEr", "ECE"], "probes": {}}


@pytest.mark.parametrize("where", ["scores", "measures"])
def test_a_non_finite_value_in_an_evaluation_file_stops_the_table_job_naming_file_and_key(tmp_path, where):
    good_s = {"corpus": {"CIDEr": 0.5}, "per_image": {"CIDEr": {"1": 0.5, "2": 0.5}}}
    good_m = {"test": {"ece": 0.1, "per_image": {"positions": [1, 1]}}}
    bad = {"scores": ({"corpus": {"CIDEr": float("nan")}, "per_image": {"CIDEr": {"1": 0.5}}}, good_m),
           "measures": (good_s, {"test": {"ece": 0.1, "reliability": [{"conf": float("inf")}]}})}[where]
    spec = _table_spec(tmp_path, *bad)
    proc = subprocess.run(["cwdpo", "table", "--spec", json.dumps(spec), "--out", str(tmp_path / "t")],
                          capture_output=True, text=True)
    path = str(tmp_path / "eval" / "stage1" / "sft" / "s0" / f"{where}.json")
    key, value = {"scores": ("corpus.CIDEr", "nan"), "measures": ("test.reliability[0].conf", "inf")}[where]
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (f"cwdpo table: {path}: {key} is {value} (a non-finite number in an "
                                            "evaluation file); rerun the job that wrote it")
    assert not os.path.exists(tmp_path / "t.md")


def test_a_pipe_in_a_row_name_stays_in_its_cell(tmp_path):
    from cwdpo.report import comparison_document, compute_table, render
    spec = _table_spec(tmp_path, {"corpus": {"CIDEr": 0.5}, "per_image": {"CIDEr": {"1": 0.5, "2": 0.4}}},
                       {"test": {"ece": 0.1}})
    md = render(comparison_document(*compute_table(spec), "t"))["md"]
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and "SFT \\| one" in md
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in rows} == {4}  # 3 cells on every line


# ---------------------------------------------------------------------------------------------------
# item 5: MCQ images — size, aspect ratio, bit depth, and paths confined to their root

def _png(path, size, mode="RGB"):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, 40000 if mode.startswith("I") else (200, 30, 30)).save(path)
    return path


def _jsonl(tmp_path, images):
    root = tmp_path / "mcq"
    root.mkdir(exist_ok=True)
    rows = [{"id": f"q{i}", "images": img, "question": "Which?", "options": ["a", "b"], "answer": "A"}
            for i, img in enumerate(images)]
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "set.jsonl"), str(root)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "aspect", "16-bit", "composed"])
def test_mcq_images_are_confined_to_their_root_and_checked(tmp_path, case):
    from cwdpo.data import DataError
    from cwdpo.mcq import load_mcq
    _png(str(tmp_path / "mcq" / "ok.png"), (20, 20))
    outside = _png(str(tmp_path / "outside" / "x.png"), (20, 20))
    images = {"dotdot": ["../outside/x.png"], "absolute": [outside],
              "aspect": [os.path.basename(_png(str(tmp_path / "mcq" / "w.png"), (6000, 1)))],
              "16-bit": [os.path.basename(_png(str(tmp_path / "mcq" / "d.png"), (16, 16), "I;16"))],
              "composed": [os.path.basename(_png(str(tmp_path / "mcq" / "t.png"), (1, 150))),
                           os.path.basename(_png(str(tmp_path / "mcq" / "f.png"), (150, 1))), "f.png"]}[case]
    path, root = _jsonl(tmp_path, [["ok.png"], images])
    line = {"dotdot": rf"image path {re.escape(root)}/\.\./outside/x\.png is outside the image root {re.escape(root)}",
            "absolute": rf"image path {re.escape(outside)} is outside the image root {re.escape(root)}",
            "aspect": r"image of 6000×1 pixels has an aspect ratio of 6000 \(the VLM's processor takes below 200\): .*",
            "16-bit": r"image of mode I;16 \(16- or 32-bit samples\) would turn white .*",
            "composed": r"its 3 images composed side by side: image of 45017×150 pixels has an aspect ratio of 300 .*"
            }[case]
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: row 1 \(id q1\): {line}$"):
        load_mcq(path, "jsonl")
    items, summary = load_mcq(path, "jsonl", on_bad_input="skip")
    assert [i.id for i in items] == ["q0"] and summary["by_reason"] == {"bad image": 1}


def test_an_mmbench_image_cell_naming_a_file_outside_the_root_is_refused(tmp_path):
    import base64

    import pandas as pd

    from cwdpo.data import DataError
    from cwdpo.mcq import load_mcq
    outside = _png(str(tmp_path / "elsewhere" / "secret.png"), (20, 20))
    ok = base64.b64encode(open(_png(str(tmp_path / "ok.png"), (20, 20)), "rb").read()).decode()
    (tmp_path / "set").mkdir()
    path = tmp_path / "set" / "mmbench.tsv"
    rows = [{"index": 0, "question": "Q?", "A": "a", "B": "b", "answer": "A", "image": ok},
            {"index": 1, "question": "Q?", "A": "a", "B": "b", "answer": "A", "image": outside}]
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match=rf"mmbench\.tsv: row 1 \(id 1\): image path {re.escape(outside)} is outside "
                                        rf"the image root {re.escape(str(tmp_path / 'set'))}$"):
        load_mcq(str(path), "mmbench", cache_dir=str(tmp_path / "cache"))


def test_image_limits():
    from cwdpo.data import MAX_IMAGE_PIXELS, image_size_problem
    assert image_size_problem(640, 480) is None and image_size_problem(199, 1) is None
    assert image_size_problem(200, 1)[0] == "aspect ratio out of range"
    assert image_size_problem(10_000, 10_000)[0] == "image too large" and 10_000 ** 2 > MAX_IMAGE_PIXELS


# ---------------------------------------------------------------------------------------------------
# item 6: the pass-through dictionaries' lists

def test_the_lora_key_list_is_the_installed_peft_loraconfig():
    """The list of the pinned peft (containers/constraints-gpu.txt) against the installed peft's LoraConfig
    fields (the CPU machines install the same version); the vLLM list is checked in the GPU-stack
    environment, where vLLM is installed."""
    import peft

    from cwdpo.config import passthrough_keys
    lists = passthrough_keys()
    pins = dict(re.findall(r"^([a-z0-9_-]+)==([^\s#]+)", open(os.path.join(REPO, "containers",
                                                                             "constraints-gpu.txt")).read(), re.M))
    lists = {k: v for k, v in lists.items() if not k.startswith("_")}
    for key, entry in lists.items():
        assert pins[entry["package"]] == entry["version"], (key, entry["version"], pins[entry["package"]])
        assert entry["keys"] == sorted(set(entry["keys"])) and entry["keys"]
    assert peft.__version__ == lists["model.lora"]["version"]
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init}
    assert set(lists["model.lora"]["keys"]) == fields
    vllm = lists["negatives.onpolicy.vllm"]
    assert {"tensor_parallel_size", "gpu_memory_utilization", "max_lora_rank", "max_model_len"} <= set(vllm["keys"])
    assert set(vllm["set_by_cwdpo"]) <= set(vllm["keys"])


def test_known_pass_through_keys_pass():
    from cwdpo.config import load_config
    c = load_config(specs.MICRO_CONFIG, {"model": {"lora": {"r": 8, "lora_alpha": 16, "use_rslora": True}},
                                         "negatives": {"onpolicy": {"vllm": {"tensor_parallel_size": 2,
                                                                             "gpu_memory_utilization": 0.8}}}},
                    check_paths=False)
    assert c["model"]["lora"]["use_rslora"] is True


# ---------------------------------------------------------------------------------------------------
# item 7: the smaller ones

@pytest.mark.train
def test_a_pairs_file_missing_lines_is_refused_against_its_summary(tiny_model_dir, shapes_dir, shapes_records,
                                                                   tmp_path):
    from test_reliability import _cw_spec, _pairs_and_ref

    from cwdpo.data import DataError
    from cwdpo.train import run_training
    pairs, ref = _pairs_and_ref(tiny_model_dir, shapes_records, tmp_path)
    summary = tmp_path / "pairs_summary.json"
    summary.write_text(json.dumps({"pairs": 48}))
    spec = dataclasses.replace(_cw_spec(tiny_model_dir, shapes_dir, pairs, ref, steps=2, save_steps=2),
                               pairs_summary=str(summary))
    with pytest.raises(DataError, match=rf"^{re.escape(pairs)}: 32 pairs, but its summary {re.escape(str(summary))} "
                                        r"counts 48: the file changed after make_pairs wrote it; delete it and rerun "
                                        r"the make_pairs rule$"):
        run_training(spec, str(tmp_path / "run"))
    summary.write_text(json.dumps({"pairs": 32}))
    assert run_training(spec, str(tmp_path / "run"))["data"]["pairs"] == 32


def test_a_failed_run_is_asked_for_again(tmp_path, monkeypatch):
    """After a failed training job Snakemake deletes its outputs; with the tables after it present, a plain
    rerun said "Nothing to be done". The run's metrics are then among the `all` rule's inputs."""
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    monkeypatch.chdir(tmp_path)
    plan = Plan(load_config(specs.MICRO_CONFIG, check_paths=False))
    assert plan.unfinished_runs() == []
    for key in ("stage1/sft/s0", "stage2/sft_c/s0/cw_dpo", "stage1/gone/s0", "stage2/sft_c/s0/dpo"):
        folder = os.path.join(plan.out, key.replace("/s0", "/s0"))
        os.makedirs(os.path.join(folder, "checkpoints"))
    open(os.path.join(plan.out, "stage2/sft_c/s0/dpo/metrics.json"), "w").write("{}")  # finished
    os.makedirs(os.path.join(plan.out, "stage1", "sft_c", "s1"))  # an empty folder: nothing was attempted
    assert sorted(plan.unfinished_runs()) == [f"{plan.out}/stage1/sft/s0/metrics.json",
                                              f"{plan.out}/stage2/sft_c/s0/cw_dpo/metrics.json"]


@pytest.mark.slow
@pytest.mark.parametrize("argv,line", [
    (["train", "--spec", "{not json", "--out", "x"],
     "cwdpo train: --spec: not valid JSON (line 1 column 2: Expecting property name enclosed in double quotes)"),
    (["validate-data", "--spec", '{"json": "d.json"}', "--out", "x"],
     "cwdpo validate-data: --spec: ValidateSpec: ValidateSpec spec missing key(s) image_root, on_bad_input"),
    (["evaluate", "--spec", "@/nonexistent/spec.json", "--captions", "c", "--measures", "m"],
     "cwdpo evaluate: --spec /nonexistent/spec.json: cannot read it (No such file or directory)"),
    (["table", "--spec", "[1, 2", "--out", "x"],
     "cwdpo table: --spec: not valid JSON (line 1 column 6: Expecting ',' delimiter)"),
    (["gpus", "--n", "-1", "--", "touch", "RAN"],
     "cwdpo gpus: --n -1: the number of GPUs is 0 or more (config compute.gpus_per_*_job)"),
], ids=["train-not-json", "validate-missing-keys", "evaluate-no-file", "table-not-json", "gpus-negative"])
def test_malformed_command_lines_end_in_one_line_without_a_traceback(tmp_path, argv, line):
    proc = subprocess.run(["cwdpo", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [line], proc.stderr
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize("text,line", [
    (None, "{ann}: annotations file not found"),
    ("{bad", "{ann}:1: not valid JSON (Expecting property name enclosed in double quotes)"),
    ('{"images": [{"file_name": "a.jpg"}]}', "{ann}: images[0]: needs an 'id' and a string 'file_name'"),
    ('{"images": [], "annotations": [{"image_id": 1}]}',
     "{ann}: annotations[0]: needs an 'image_id' and a string 'caption'"),
], ids=["missing", "not-json", "image-without-id", "annotation-without-caption"])
def test_convert_nocaps_names_the_bad_entry_in_one_line(tmp_path, text, line):
    ann = tmp_path / "nocaps.json"
    if text is not None:
        ann.write_text(text)
    proc = subprocess.run(["cwdpo", "convert-nocaps", "--annotations", str(ann), "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["cwdpo convert-nocaps: " + line.replace("{ann}", str(ann))], proc.stderr


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from cwdpo import data
    real_open = open

    class Full:
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def write(self, text):
            self.f.write(text[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: Full(path, mode) if "w" in mode
                        else real_open(path, mode, *a, **k))
    for write in (lambda p: data.write_json(p, {"a": 1}), lambda p: data.write_text(p, "text")):
        with pytest.raises(OSError, match="No space left"):
            write(str(tmp_path / "out.json"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_every_atomic_writer_leaves_no_temporary_file_and_the_old_file_whole(tmp_path, monkeypatch):
    """The dataset, the probes' θ0 cache and the figures are written through `write_atomically` too: a writer
    that fails (here: after writing part of its file) leaves the previous file as it was and no temporary
    file; two processes never share a temporary name (it holds the process id)."""
    import torch

    from cwdpo import data, figures, probes, shapes
    target = tmp_path / "out.bin"
    target.write_text("old")

    def half(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        data.write_atomically(str(target), half)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.bin"]
    # the three writers that used a fixed ".tmp" name go through it
    seen = []
    real = data.write_atomically

    def spy(path, write):
        seen.append(os.path.basename(path))
        return real(path, write)
    for module in (figures, shapes, probes):
        monkeypatch.setattr(module, "write_atomically", spy)
    shapes.generate(str(tmp_path / "shapes"), shapes.ShapesSpec(splits={"train": 2}, seed=0), progress=False)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure()
    figures._save(fig, str(tmp_path / "figs" / "f"), layout=False)
    plt.close(fig)
    # the probes' θ0 cache at the first step (the measuring itself stubbed: only the file matters here)
    from types import SimpleNamespace
    callback = probes.ProbeCallback([], None, str(tmp_path / "run"), interval=1)
    callback._pass_eval = lambda model: ({"positive": torch.zeros(2)}, torch.zeros(2, 3))
    callback.measure = lambda model, step, pass_result=None: {"step": step}
    callback._record = lambda row: None
    callback.on_train_begin(None, SimpleNamespace(max_steps=4, is_world_process_zero=True, global_step=0), None)
    assert torch.load(callback.ref_path, weights_only=True)["logits"].shape == (2, 3)
    assert seen == ["dataset_shapes.json", "f.png", "f.pdf", "probe_ref.pt"]
    assert not [n for root, _, files in os.walk(tmp_path) for n in files if ".tmp" in n]


def test_validated_skip_counts_count_each_kind_of_problem(tmp_path):
    from PIL import Image

    from cwdpo.data import validate_data
    from cwdpo.specs import ValidateSpec
    images = []
    for i in range(5):
        if i < 3:
            Image.new("RGB", (32, 32)).save(tmp_path / f"img{i}.png")
        images.append({"filename": f"img{i}.png", "cocoid": i, "split": "train", "sentences": [{"raw": "a dog"}]})
    (tmp_path / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    validate_data(ValidateSpec(json=str(tmp_path / "d.json"), image_root=str(tmp_path), on_bad_input="skip"),
                  str(tmp_path / "validated.json"))
    report = json.load(open(tmp_path / "validated.json"))
    assert report["skipped"] == 3
    assert report["by_reason"] == {"image file not found": 2, "corrupt or unreadable image": 1}


# ---------------------------------------------------------------------------------------------------
# item 8: no test depends on a wall-clock budget

def _gpu_check():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(REPO, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,deadline,smoke", [(["--cpu"], None, None), ([], 450.0, 180.0),
                                                 (["--budget-s", "900"], 900.0, 180.0)])
def test_the_test_mode_gpu_check_sets_no_time_budget(tmp_path, monkeypatch, argv, deadline, smoke):
    """`gpu_check.py --cpu` (what test_gpu_check runs) gave the rehearsal a 450-s budget: on a busy 2-core
    machine the suite failed by the clock. Only the GPU mode has one."""
    gc = _gpu_check()
    seen = {}

    def rehearsal(cpu, workdir, dl, threads):
        seen["deadline"] = dl if dl is None else dl - seen["t0"]
        return {"ok": True}

    def smoke_(cpu, out_dir, timeout):
        seen["smoke"] = timeout
        return {"rc": 0, "loss_finite": True}
    monkeypatch.setattr(gc, "run_rehearsal", rehearsal)
    monkeypatch.setattr(gc, "run_smoke", smoke_)
    monkeypatch.setattr(gc, "modules", lambda: {})
    real_time = gc.time.time
    seen["t0"] = real_time()
    monkeypatch.setattr(gc.time, "time", lambda: seen["t0"])
    assert gc.main([*argv, "--out", str(tmp_path / "g.json"), "--workdir", str(tmp_path / "w")]) == 0
    assert seen == {"t0": seen["t0"], "deadline": deadline, "smoke": smoke}
    jobs = gc.Jobs(str(tmp_path), str(tmp_path), None, 1)  # no deadline: every job runs, however long
    assert jobs("noop", "--help") and jobs.done[0]["rc"] == 0
