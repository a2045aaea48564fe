"""`cwdpo <command>`: the only surface the Snakefile touches.

Each command parses its arguments and calls one function of the module that owns the work; it is declared
once, by `@command` above its function (`COMMANDS`, from which `build_parser` builds the parser). Rules pass
a JSON `--spec` (a `cwdpo.specs` dataclass, built by `cwdpo.plan`) and explicit input/output paths. Heavy
imports (torch, transformers) happen inside the modules that need them, so `cwdpo score` or `cwdpo table`
start in well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

_CLOCK = {}  # process start and the moment the command's work began (see `main`)


def _quiet_hf():
    """Process settings of every command that loads a Hugging Face model: offline unless told otherwise,
    no tokenizer fork warnings, no progress bars or advice from transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _started():
    """Mark the end of the command's start-up, right after its imports: everything before is start-up, after
    it work. A torch command also imports transformers' Qwen2.5-VL classes here (its modules load them lazily)."""
    if _CLOCK.get("hf"):
        import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401
    _CLOCK.setdefault("work", time.time())


def _report_times(command: str):
    """`[cwdpo] <command>: start-up X s, work Y s` on stderr (job logs; `cwdpo bench` sums them)."""
    try:
        import psutil
        start = psutil.Process().create_time()
    except Exception:  # no psutil: from the interpreter's own start
        start = _CLOCK["main"]
    work = _CLOCK.get("work", time.time())
    print(f"[cwdpo] {command}: start-up {work - start:.2f} s, work {time.time() - work:.2f} s", file=sys.stderr)


class SpecError(ValueError):
    """A --spec value that is not the JSON of its spec (said in one line, without a traceback)."""


def _spec_json(text: str):
    """The parsed JSON of a --spec value (`@path`: of that file)."""
    where = "--spec"
    try:
        if text.startswith("@"):
            where = text[1:]
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        return json.loads(text)
    except OSError as e:
        raise SpecError(f"--spec {where}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise SpecError(f"--spec {where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None


def _spec(name: str, text: str):
    """The `cwdpo.specs` dataclass `name` from a --spec value."""
    from . import specs
    doc = _spec_json(text)
    try:
        return specs.from_dict(getattr(specs, name), doc)
    except (ValueError, TypeError) as e:
        raise SpecError(f"--spec: {e}") from None


# ---- commands: each one declared by `command` above its function (`COMMANDS`, the parser's only source) ----

@dataclass(frozen=True)
class Command:
    """A `cwdpo` command: its function and help, whether it takes --spec, --out and --threads, whether it loads
    a Hugging Face model (`hf`: offline, quiet), whether the rules run it (`job`: its errors also print the
    traceback, kept in the job's log; the commands people type say one line only), and its own arguments."""
    fn: object
    help: str
    spec: bool = True
    out: bool = True
    threads: bool = False
    hf: bool = False
    job: bool = True
    args: tuple = ()


COMMANDS: dict = {}  # name -> Command, in the order of `cwdpo --help`


def arg(*flags, **kwargs) -> tuple:
    """One argument of a command: `add_argument`'s flags and keywords."""
    return flags, kwargs


def command(name: str, help_: str, **options):
    """Declare the function below as command `name` (options: `Command`'s fields)."""
    def register(fn):
        COMMANDS[name] = Command(fn, help_, **options)
        return fn
    return register


@command("prepare-data", "generate the embedded `shapes` dataset (Karpathy format)")
def cmd_prepare_data(a):
    from .shapes import ShapesSpec, write_dataset
    from .specs import from_json
    _started()
    write_dataset(from_json(ShapesSpec, a.spec), a.out)


@command("validate-data", "check every image and caption once (missing, corrupt, empty)")
def cmd_validate_data(a):
    from .data import validate_data
    _started()
    for item in validate_data(_spec("ValidateSpec", a.spec), a.out):
        print(f"[cwdpo validate-data] skipped {item['where']}: {item['reason']}", file=sys.stderr)


@command("build-model", "build the tiny random-init Qwen2.5-VL + tokenizer + processor", hf=True)
def cmd_build_model(a):
    from .models import build_base_init
    _started()
    print(json.dumps(build_base_init(_spec("BuildModelSpec", a.spec), a.out)))


@command("train", "train one model (pretrain/SFT/SFT-C/DPO/Focal-DPO/CW-DPO)", threads=True, hf=True, args=(
    arg("--dataloader-workers", type=int, default=0,
        help="data-loader worker processes per training process (rules: compute.dataloader_workers)"),
    arg("--evaluate", default=None, help="an evaluation spec: evaluate the trained model in this job"),
    arg("--captions", default=None, help="with --evaluate: the captions file"),
    arg("--measures", default=None, help="with --evaluate: the measures file")))
def cmd_train(a):
    from .train import run_training
    _started()
    print(json.dumps(run_training(_spec("TrainSpec", a.spec), a.out, threads=a.threads, workers=a.dataloader_workers),
                     sort_keys=True))
    if a.evaluate:  # the tiny scale: the trained model is evaluated in the same job (saved, then reloaded)
        from .evaluate import run
        run(_spec("EvalSpec", a.evaluate), a.captions, a.measures, threads=a.threads)


@command("stability", "pretrain the tiny model from another seed and measure its captions", threads=True,
         hf=True)
def cmd_stability(a):
    from .stability import run
    _started()
    run(_spec("StabilitySpec", a.spec), a.out, threads=a.threads)


@command("evaluate", "beam-search captions + teacher-forced measures of one model", out=False, threads=True, hf=True,
         args=(arg("--captions", required=True), arg("--measures", required=True)))
def cmd_evaluate(a):
    from .evaluate import run
    _started()
    run(_spec("EvalSpec", a.spec), a.captions, a.measures, threads=a.threads)


@command("sample-onpolicy", "K samples per Stage-2 image from a model (hf or vllm)", threads=True, hf=True,
         args=(arg("--summary", required=True),))
def cmd_sample_onpolicy(a):
    from .sampling import run
    _started()
    run(_spec("SampleSpec", a.spec), a.out, a.summary, threads=a.threads)


@command("beam-negatives", "the model's k beams per Stage-2 image, the wrong ones kept", threads=True, hf=True,
         args=(arg("--summary", required=True),))
def cmd_beam_negatives(a):
    from .sampling import run_beams
    _started()
    run_beams(_spec("BeamSpec", a.spec), a.out, a.summary, threads=a.threads)


@command("calibration-choice", "the calibration rule's outcome of a sweep table (its lr)")
def cmd_calibration_choice(a):
    from .report import write_calibration_choice
    _started()
    doc = write_calibration_choice(_spec_json(a.spec), a.out)
    print(f"calibration {doc['table']}: {doc['outcome']} -> {a.out}")


@command("probe-set", "the fixed probe set (positives + gentle/easy/on-policy negatives)",
         args=(arg("--onpolicy", default=None),))
def cmd_probe_set(a):
    from .negatives import write_probe_set
    _started()
    write_probe_set(_spec("ProbeSetSpec", a.spec), a.onpolicy, a.out)


@command("make-pairs", "preference pairs (TRL vision format) from dataset/on-policy negatives", args=(
    arg("--onpolicy", default=None),
    arg("--beams", default=None, help="the model's grounded beams (cwdpo beam-negatives)"),
    arg("--summary", required=True)))
def cmd_make_pairs(a):
    from .negatives import make_pairs
    _started()
    make_pairs(_spec("PairsSpec", a.spec), a.onpolicy, a.out, a.summary, beams=a.beams)


@command("ref-logps", "cache the reference model's log-probs of a pairs file", threads=True, hf=True,
         args=(arg("--pairs", required=True),))
def cmd_ref_logps(a):
    from .reference import run
    _started()
    doc = run(_spec("RefSpec", a.spec), a.pairs, a.out, threads=a.threads)
    print(f"reference log-probs of {doc['n_pairs']} pairs -> {a.out}")


@command("fetch-model", "put a hub model into the workflow's Hugging Face cache (network)", spec=False, args=(
    arg("--model", required=True, help="hub id, e.g. Qwen/Qwen2.5-VL-3B-Instruct"),
    arg("--cache", required=True, help="HF_HOME of the workflow (config model.cache)")))
def cmd_fetch_model(a):
    from .data import write_json
    from .hub import fetch
    doc = fetch(a.model, os.path.join(a.cache, "hub"))
    write_json(a.out, doc)
    print(f"{a.model}: snapshot {doc['commit']} in {a.cache} ({'downloaded' if doc['downloaded'] else 'cached'})")


@command("gpus", "run a command on GPUs of its own (CUDA_VISIBLE_DEVICES from free GPU slots)", spec=False,
         out=False, job=False, args=(
             arg("--n", type=int, required=True, help="GPUs the command needs (0: run it as it is)"),
             arg("command", nargs=argparse.REMAINDER, help="-- the command and its arguments")))
def cmd_gpus(a):
    from .config import ConfigError
    from .gpus import run
    if a.n < 0:
        raise ConfigError(f"--n {a.n}: the number of GPUs is 0 or more (config compute.gpus_per_*_job)")
    run(a.n, a.command[1:] if a.command[:1] == ["--"] else a.command)


@command("trivial", "the trivial baseline: the most frequent training caption for every image")
def cmd_trivial(a):
    from .data import write_trivial
    _started()
    write_trivial(_spec("TrivialSpec", a.spec), a.out)


@command("coco-objects", "the COCO categories of a data source's images (for CHAIR)")
def cmd_coco_objects(a):
    from .grounding import write_coco_objects
    _started()
    write_coco_objects(_spec("CocoObjectsSpec", a.spec), a.out)


@command("score", "score caption files with pycocoevalcap (one JVM for all files)", spec=False, out=False, args=(
    arg("--captions", nargs="+", required=True), arg("--out", nargs="+", required=True),
    arg("--metrics", default=None, help="comma-separated subset of BLEU-4,METEOR,ROUGE-L,CIDEr,SPICE"),
    arg("--chair", default="reference", help="CHAIR's count on COCO-style data: reference or distinct "
                                             "(config evaluate.chair)")))
def cmd_score(a):
    from .config import ConfigError
    from .grounding import CHAIR_VARIANTS
    from .metrics import METRIC_NAMES, score_files
    if a.chair not in CHAIR_VARIANTS:
        raise ConfigError(f"--chair {a.chair}: one of {', '.join(CHAIR_VARIANTS)} (config evaluate.chair)")
    _started()
    score_files(a.captions, a.out, a.metrics.split(",") if a.metrics else list(METRIC_NAMES), chair=a.chair)


@command("table", "write a comparison table (Markdown, CSV, LaTeX)", out=False,
         args=(arg("--out", required=True, help="output stem: writes <out>.md, <out>.csv, <out>.tex"),))
def cmd_table(a):
    from .report import write_table
    _started()
    write_table(_spec_json(a.spec), a.out)


@command("figure", "draw a figure (PNG + PDF) from the runs' probes and measures", out=False,
         args=(arg("--out", required=True, help="output stem: writes <out>.png and <out>.pdf"),))
def cmd_figure(a):
    from .figures import write_figure
    _started()
    write_figure(_spec_json(a.spec), a.out)


@command("convert-nocaps", "NoCaps annotations (COCO style) -> Karpathy format with domains", spec=False, job=False,
         args=(arg("--annotations", required=True, help="e.g. nocaps_val_4500_captions.json"),
               arg("--split", default="val")))
def cmd_convert_nocaps(a):
    from .data import convert_nocaps
    _started()
    print(json.dumps(convert_nocaps(a.annotations, a.out, a.split)))


@command("bench", "step-time ratios, cached reference, TRL peer, shared prefix, throughput", spec=False, out=False,
         threads=True, hf=True, job=False, args=(
             arg("--quick", action="store_true", help="tiny model only, few steps (for CI)"),
             arg("--out", default="results/bench"),
             arg("--no-large", action="store_true", help="skip the larger random-init model"),
             arg("--workdir", default=".", help="the workflow folder for the DAG timings"),
             arg("--experiment-dir", default="results/tiny", help="a finished run for the pipeline costs")))
def cmd_bench(a):
    from .bench import run_bench
    _started()
    report = run_bench(a.out, quick=a.quick, threads=a.threads, large=not a.no_large, workdir=a.workdir,
                       experiment_dir=a.experiment_dir)
    print(open(os.path.join(a.out, "bench.md")).read())
    print(f"wrote {a.out}/bench.json and bench.md (peak RSS {report['peak_rss_mb']:.0f} MB)")


@command("estimate", "tokens, FLOPs and GPU-hours of a config's whole DAG", spec=False, out=False, job=False, args=(
    arg("--configfile", required=True),
    arg("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (gpu_smoke measures it)"),
    arg("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU (default H100: 989)"),
    arg("--image-size", default=None, help="WxH of the typical image for Karpathy data (default 640x480)"),
    arg("--json", default=None, help="also write the estimate as JSON")))
def cmd_estimate(a):
    """Tokens, FLOPs and GPU-hours of a config's DAG, per rule and in total."""
    from .config import load_config
    from .estimate import H100_BF16_DENSE, estimate, render
    _started()
    cfg = load_config(a.configfile, check_paths=False)  # priced before the data is in place
    hw = tuple(int(x) for x in a.image_size.lower().split("x")) if a.image_size else None
    est = estimate(cfg, mfu=a.mfu, peak_flops=a.peak_tflops * 1e12 if a.peak_tflops else H100_BF16_DENSE,
                   image_hw=(hw[1], hw[0]) if hw else None)
    print(render(est))
    if a.json:
        from .data import write_json
        write_json(a.json, est)


@command("validate-config", "validate a config file against the workflow schema", spec=False, out=False,
         job=False, args=(arg("--configfile", required=True),))
def cmd_validate_config(a):
    from .config import load_config
    _started()
    cfg = load_config(a.configfile)
    print(f"{a.configfile}: valid (experiment {cfg['experiment']})")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in `COMMANDS`: --spec (a job's JSON spec), --out and --threads where the
    command declares them, then its own arguments."""
    p = argparse.ArgumentParser(prog="cwdpo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, c in COMMANDS.items():
        sp = sub.add_parser(name, help=c.help)
        sp.set_defaults(fn=c.fn, hf=c.hf, job=c.job, name=name)  # (`gpus` has a positional `command`)
        if c.spec:
            sp.add_argument("--spec", required=True, help="the job's JSON spec (or @file)")
        if c.out:
            sp.add_argument("--out", required=True)
        if c.threads:  # torch commands: the rules pass Snakemake's `threads` here
            sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        for flags, kwargs in c.args:
            sp.add_argument(*flags, **kwargs)
    return p


def one_line(message: str) -> str:
    """A message as one line: 'invalid config:\n  a\n  b' → 'invalid config: a; b'."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def _expected_errors() -> tuple:
    """The errors that mean bad input or a failed run rather than a bug: `ConfigError`, `DataError`, and
    `TrainingError` (a diverged or incomplete run) when the training module was imported at all."""
    from .config import ConfigError
    from .data import DataError
    train = sys.modules.get("cwdpo.train")  # imported by the training commands only (it pulls in torch)
    return (ConfigError, DataError, SpecError) + ((train.TrainingError,) if train is not None else ())


def main(argv=None):
    """Run one command. Bad input or a failed run (`_expected_errors`) ends the process with exit status 1
    and one line `cwdpo <command>: <message>`, the last line on stderr; a command the rules run prints the
    traceback before it (the job's log keeps it for debugging; the rules repeat the line where Snakemake's
    failure summary shows it)."""
    _CLOCK["main"] = time.time()
    args = build_parser().parse_args(argv)
    from .stamp import mismatch
    problem = mismatch()  # the workflow planned this job with another cwdpo (an image not rebuilt)
    if problem:
        print(f"cwdpo {args.command}: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)
    if args.hf:
        _quiet_hf()
        _CLOCK["hf"] = True
    try:
        args.fn(args)
    except Exception as e:
        if not isinstance(e, _expected_errors()):
            raise
        sys.stdout.flush()
        if args.job and not isinstance(e, SpecError):  # a malformed --spec: nothing to debug in a traceback
            import traceback
            traceback.print_exc(file=sys.stderr)
        print(f"cwdpo {args.name}: {one_line(str(e))}", file=sys.stderr, flush=True)
        sys.exit(1)
    _report_times(args.name)


if __name__ == "__main__":
    main()
