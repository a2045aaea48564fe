"""The Snakefile: parses fast without torch, lints clean, validates its config before any job."""
import os
import sys
import time
from pathlib import Path

import pytest

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


def test_dry_run_parses_without_torch_and_fast(tmp_path, workdir):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.perf_counter()
    out = run([sys.executable, "-m", "snakemake", "-n", "--quiet", "all"], cwd=workdir, env=env)
    elapsed = time.perf_counter() - t
    assert "torch/transformers imported" not in out.stdout + out.stderr
    # generous bound for loaded CI machines; `cwdpo bench` reports the measured figure
    assert elapsed < 20


def test_unlock_and_cleanup_work_without_cores(workdir):
    """`snakemake --unlock` after a killed run takes no --cores: the Snakefile must parse without them."""
    locks = Path(workdir) / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("stale\n")
    out = run([sys.executable, "-m", "snakemake", "--unlock"], cwd=workdir)
    assert "Unlocked working directory" in out.stdout + out.stderr
    assert not list(locks.glob("*.lock"))


def test_lint_is_clean(workdir):
    out = run([sys.executable, "-m", "snakemake", "--lint"], cwd=workdir)
    assert "Congratulations" in out.stdout + out.stderr


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
