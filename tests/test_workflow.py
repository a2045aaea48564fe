"""The Snakefile: parses fast without torch, lints clean, validates its config before any job."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import micro_specs as specs
from conftest import copy_workflow, run

BLOCK_TORCH = '''
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch.") or name == "transformers":
            raise ImportError("torch/transformers imported while parsing the workflow")
        return None
sys.meta_path.insert(0, _Block())
'''


@pytest.fixture()
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


@pytest.mark.slow
def test_dry_run_parses_without_torch_and_fast(tmp_path, workdir):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    out = run([sys.executable, "-m", "snakemake", "-n", "--quiet", "all"], cwd=workdir, env=env)
    elapsed = time.perf_counter() - t
    assert "torch/transformers imported" not in out.stdout + out.stderr
    # generous bound for loaded CI machines; `cwdpo bench` reports the measured figure
    assert elapsed < 20


@pytest.mark.slow
def test_unlock_and_cleanup_work_without_cores(workdir):
    """`snakemake --unlock` after a killed run takes no --cores: the Snakefile must parse without them."""
    locks = Path(workdir) / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("stale\n")
    out = run([sys.executable, "-m", "snakemake", "--unlock"], cwd=workdir)
    assert "Unlocked working directory" in out.stdout + out.stderr
    assert not list(locks.glob("*.lock"))


def test_readme_quick_start_is_two_one_line_commands_in_one_bash_block():
    """README § Quick start: one fenced bash block of exactly two one-line commands — install + run the default
    pipeline, install + run the tests (.ci/run runs the second as CI's test command)."""
    import re
    from conftest import REPO
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["bash"]
    lines = [line for line in blocks[0][1].splitlines() if line.strip()]
    assert len(lines) == 2 and not any(line.rstrip().endswith("\\") for line in lines)
    assert "pip install" in lines[0] and "snakemake" in lines[0]
    assert "pip install" in lines[1] and "pytest" in lines[1]


@pytest.mark.slow
def test_lint_is_clean(workdir):
    out = run([sys.executable, "-m", "snakemake", "--lint"], cwd=workdir)
    assert "Congratulations" in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("override,needle", [
    ("data: {source: shape}", "data.source"),
    ("trainn: {}", "trainn"),
    ("stage1: {fraction: 1.5}", "stage1.fraction"),
])
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, workdir, override, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(override + "\n")
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(cfg)], cwd=workdir,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert needle.split(".")[-1] in text
    assert "Job stats" not in text


def test_torch_free_commands_do_not_import_torch(tmp_path, shapes_dir, tiny_model_dir):
    """probe-set, make-pairs, trivial and score run in jobs of their own: without torch they start in a
    second instead of ~10 s (the probe set once imported the training callback and with it torch)."""
    import json
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    from cwdpo.specs import PairsSpec, ProbeSetSpec, TrivialSpec, to_json
    data_json = os.path.join(shapes_dir, "dataset_shapes.json")
    probe_spec = ProbeSetSpec(probe_data=specs.data(data_json, ["test"]), probe_images=8,
                              negatives=specs.negatives(), seed=0)
    pairs_spec = PairsSpec(prompt=specs.PROMPT, data=specs.data(data_json, ["finetune"]),
                           negatives=specs.negatives(pairs_per_image=2), rho=1.0, p_easy=None, seed=0,
                           tokenizer=tiny_model_dir, max_response_tokens=8)
    trivial_spec = TrivialSpec(train=specs.data(data_json, ["train"]), test=specs.data(data_json, ["test"]),
                               objects=None)
    commands = [
        ["probe-set", "--spec", to_json(probe_spec), "--out", str(tmp_path / "probe.jsonl")],
        ["make-pairs", "--spec", to_json(pairs_spec), "--out", str(tmp_path / "pairs.jsonl"),
         "--summary", str(tmp_path / "pairs_summary.json")],
        ["trivial", "--spec", to_json(trivial_spec), "--out", str(tmp_path / "trivial.json")],
        ["score", "--captions", str(tmp_path / "trivial.json"), "--out", str(tmp_path / "scores.json"),
         "--metrics", "BLEU-4,CIDEr"],
    ]
    for argv in commands:
        out = run([sys.executable, "-c", "import sys; from cwdpo.cli import main; main(sys.argv[1:])", *argv],
                  cwd=str(tmp_path), env=env)
        assert out.returncode == 0, f"{argv[0]}: {out.stderr[-2000:]}"
    assert len((tmp_path / "probe.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "pairs.jsonl").stat().st_size > 0
    # the pairs summary counts the responses the length limit cuts (torch-free, as the Encoder would cut them)
    from cwdpo.logprobs import Encoder
    from cwdpo.models import load_processor
    from cwdpo.negatives import read_pairs
    summary = json.loads((tmp_path / "pairs_summary.json").read_text())["truncated"]
    enc = Encoder(load_processor(tiny_model_dir), specs.PROMPT, max_response_tokens=8)
    items = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert summary["max_response_tokens"] == 8
    assert summary["chosen"] == sum(enc.truncated([p["chosen"] for p in items]))
    assert summary["rejected"] == sum(enc.truncated([p["rejected"] for p in items])) > 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["corpus"]["CIDEr"] >= 0 and 0 <= scores["corpus"]["BLEU-4"] <= 1


def test_ruff_is_clean():
    """The package, the tests and the scripts pass the linter configured in pyproject.toml."""
    from conftest import REPO
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "cwdpo", "tests", "scripts"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def _job_counts(workdir, *configs):
    out = run([sys.executable, "-m", "snakemake", "-n", *(["--configfile", *configs] if configs else [])],
              cwd=workdir).stdout
    table = out.split("Job stats:")[1].split("\n\n")[0]
    return {line.split()[0]: int(line.split()[1]) for line in table.splitlines()[3:] if line.strip()}


@pytest.mark.slow
def test_the_stability_pretrainings_run_beside_the_base_models(workdir):
    """The base model's pretraining takes one core (compute.threads), as the stability pretrainings (T-regime)
    do, and none waits for another in the DAG: on 2 cores a stability seed pretrains beside the base model
    (a second thread made the tiny model's pretraining only ≈ 1.2× faster)."""
    import re
    dot = run([sys.executable, "-m", "snakemake", "--dag"], cwd=workdir).stdout
    labels = dict(re.findall(r'^\s*(\d+)\[label = "([a-z_0-9]+)', dot, flags=re.M))
    edges = set(re.findall(r"^\s*(\d+) -> (\d+)", dot, flags=re.M))
    pretrain = [n for n, rule in labels.items() if rule == "pretrain"]
    stability = [n for n, rule in labels.items() if rule == "stability"]
    assert len(pretrain) == 1 and len(stability) == 2, labels
    assert not any((a, b) in edges for a in pretrain + stability for b in pretrain + stability), edges
    dry = run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "2"],
              cwd=workdir).stdout
    blocks = re.split(r"^(?:local)?rule ", dry, flags=re.M)
    commands = [b for b in blocks if b.startswith(("pretrain:", "stability:"))]
    assert len(commands) == 3 and all(" --threads 1 " in b.split("Shell command:")[1] for b in commands), commands


@pytest.mark.slow
def test_training_jobs_evaluate_their_own_models_at_the_tiny_scale_only(workdir, tmp_path):
    """Fewer, fuller processes at the tiny scale: a Stage-1/Stage-2 job evaluates the model it trained, so the
    `evaluate` rule runs for the base model alone; set apart (the GPU scales) every model has its own job."""
    fused = _job_counts(workdir)
    apart_cfg = tmp_path / "apart.yaml"
    apart_cfg.write_text("compute: {evaluate_in_training_job: false}\n")
    apart = _job_counts(workdir, str(apart_cfg))
    assert fused["evaluate"] == 1 and apart["evaluate"] > 20
    assert fused["total"] == apart["total"] - (apart["evaluate"] - 1)
    assert fused["stage1"] == apart["stage1"] and fused["stage2"] == apart["stage2"]


def test_the_schema_names_what_the_code_defines():
    """Names the schema lists for validation (metrics, methods, table columns, claims) are the code's own
    constants, so a new metric or method cannot be valid in one place and unknown in the other."""
    import yaml
    from conftest import REPO
    from cwdpo.config import CLAIM_IDS, STAGE1_METHODS, STAGE2_METHODS
    from cwdpo.metrics import METRIC_NAMES
    from cwdpo.report import COLUMNS, SPECIAL
    schema = yaml.safe_load(open(os.path.join(REPO, "workflow", "schemas", "config.schema.yaml")))
    props, defs = schema["properties"], schema["$defs"]
    assert tuple(props["evaluate"]["properties"]["metrics"]["items"]["enum"]) == METRIC_NAMES
    assert tuple(props["eval_sets"]["additionalProperties"]["properties"]["metrics"]["items"]["enum"]) == METRIC_NAMES
    assert tuple(defs["stage1_recipe"]["properties"]["method"]["enum"]) == STAGE1_METHODS
    assert tuple(defs["stage2_recipe"]["properties"]["method"]["enum"]) == STAGE2_METHODS
    assert set(defs["table"]["properties"]["columns"]["items"]["enum"]) == set(COLUMNS) | set(SPECIAL)
    assert set(props["claims"]["properties"]["min_effect"]["default"]) == set(CLAIM_IDS)


@pytest.mark.slow
def test_multi_gpu_launcher_runs_the_installed_package_not_the_working_directory(tmp_path):
    """torchrun / accelerate start the `cwdpo` console script (`--no-python`), like single-GPU jobs: a
    `cwdpo/` folder in the working directory (a checkout of another version) is never what they import
    (`python -m cwdpo.cli` would import it, since `-m` puts the working directory first on sys.path)."""
    import shlex
    from cwdpo.config import load_config
    from cwdpo.plan import Plan
    plan = Plan(load_config(specs.MICRO_CONFIG, overrides={"compute": {"gpus_per_train_job": 2}}, check_paths=False))
    assert plan.launcher("train") == "torchrun --standalone --nproc_per_node 2 --no-python cwdpo"
    acc = Plan({**plan.c, "compute": {**plan.c["compute"], "launcher": "accelerate"}})
    assert acc.launcher("train") == "accelerate launch --num_processes 2 --no_python cwdpo"
    shadow = tmp_path / "cwdpo"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("")
    (shadow / "cli.py").write_text("import sys\nprint('SHADOW PACKAGE')\nsys.exit(3)\n")
    argv = shlex.split(plan.launcher("train")) + ["validate-config", "--configfile", specs.MICRO_CONFIG]
    out = run(argv, cwd=str(tmp_path), env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert "SHADOW" not in out.stdout + out.stderr and out.stdout.count("valid (experiment micro)") == 2


def test_log_and_benchmark_paths_are_spelled_only_in_paths_py():
    """Every rule's `log:` and `benchmark:` comes from cwdpo/paths.py's JOB_FILES (Plan.log_file /
    benchmark_file): no rule file spells a logs/ or benchmarks/ path, and every entry is some rule's."""
    import glob
    from conftest import REPO
    from cwdpo.paths import JOB_FILES
    text = "".join(open(f).read() for f in glob.glob(os.path.join(REPO, "workflow", "rules", "*.smk")))
    text += open(os.path.join(REPO, "Snakefile")).read()
    assert "logs/" not in text and "benchmarks/" not in text
    import re
    loops = re.findall(r"for STAGE in \(([^)]*)\):", text)
    looped = {name for names in loops for name in re.findall(r'"(\w+)"', names)}
    assert looped == {"stage1", "stage2"} and "log_file(STAGE)" in text  # the two training rules, one loop
    for job in JOB_FILES:
        assert f'log_file("{job}")' in text or job in looped, f"JOB_FILES[{job!r}] is no rule's log"


def test_a_model_key_is_spelled_once_and_names_its_run_folder():
    """paths.KEY_TEMPLATES is the one spelling of a trained model's key: ModelKey prints and parses it, and a
    training run's folder is results/<experiment>/<key>."""
    import re
    from types import SimpleNamespace
    from cwdpo.paths import KEY_TEMPLATES, Layout, ModelKey
    for text in ("base", "stage1/sft_c/s0", "stage2/sft_c/s12/cw_dpo", "stage2/base/s1/dpo"):
        assert str(ModelKey.parse(text)) == text
    for bad in ("stage1/a/b", "stage3/x/s1", "stage1/x/s1/y", "stage2/x/s1", "base/s0"):
        assert not re.fullmatch(ModelKey.PATTERN, bad)
        with pytest.raises(ValueError, match="unknown model key"):
            ModelKey.parse(bad)
    wc = SimpleNamespace(stage1="sft_c", seed="2", stage2="dpo")
    key = ModelKey.of_wildcards(wc)
    assert str(key) == KEY_TEMPLATES["stage2"].format(**vars(wc)) == "stage2/sft_c/s2/dpo"
    assert Layout("results/e").path("stage2_dir", stage1="sft_c", seed=2, stage2="dpo") == f"results/e/{key}"
    assert str(ModelKey.of_wildcards(SimpleNamespace(stage1="sft", seed="0"))) == "stage1/sft/s0"
