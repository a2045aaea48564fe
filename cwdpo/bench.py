"""`cwdpo bench`: step-time ratios of the methods measured in one process on identical batches, the cached
reference saving, the peer comparison with TRL's DPOTrainer, the shared-prefix forward, generation and
scoring throughput, peak memory, and the pipeline's own costs (dry-run, no-op rerun, Snakemake
`benchmark:` files). Writes results/bench/bench.json and bench.md.

Times are medians after warm-up; every figure that matters is a ratio of two timings taken in the same
process on the same model and batch, so it transfers across machines better than absolute seconds
(absolute times only mean something on a GPU). Targets are printed with whether they hold; tests check
only the file's shape, never a threshold.
"""
from __future__ import annotations

import copy
import glob
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from .data import write_json, write_text

TINY = dict(vocab_size=512, min_pixels=112 * 112, max_pixels=112 * 112, hidden_size=64, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=128, num_hidden_layers=2, vision_depth=1, vision_hidden_size=32,
            vision_intermediate_size=64, vision_num_heads=1)
# a larger random-init Qwen2.5-VL (≈ 9.7M parameters) with 224×224 images (64 image tokens)
LARGE = dict(vocab_size=512, min_pixels=224 * 224, max_pixels=224 * 224, hidden_size=256, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=1024, num_hidden_layers=4, vision_depth=2,
             vision_hidden_size=128, vision_intermediate_size=512, vision_num_heads=2)
TARGETS = {  # name: (ratio key, limit)
    "CW-DPO/DPO step <= 1.05": ("cw_dpo_over_dpo", 1.05),
    "cached reference <= 0.75 x recompute": ("cached_ref_over_recompute", 0.75),
    "SFT-C/SFT step <= 2.0": ("sft_c_over_sft", 2.0),
    "SFT-C (25% of negatives)/SFT step <= 1.3": ("sft_c_f25_over_sft", 1.3),
    "ours/TRL default DPO step <= 0.5": ("dpo_over_trl", 0.5),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median_time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Workbench:
    """A model folder, a small `shapes` dataset, pairs and SFT-C items, built once in a temp folder."""

    def __init__(self, root: str, spec: dict, image_size: int, n_images: int, seed: int = 0):
        from . import shapes
        from .data import load_karpathy
        from .models import build_tiny, load_processor
        from .negatives import build_pairs, sft_c_items, write_pairs
        from .logprobs import Encoder
        self.root = root
        data = shapes.generate(os.path.join(root, "data"), shapes.ShapesSpec(
            splits={"finetune": n_images}, seed=seed, image_size=image_size), progress=False)
        self.records = load_karpathy(data)
        self.model_dir = os.path.join(root, "model")
        build_tiny(self.model_dir, [c for r in self.records for c in r.captions], spec, "Describe the image.", seed)
        self.processor = load_processor(self.model_dir)
        self.encoder = Encoder(self.processor, "Describe the image.", 40, pixel_cache_mb=512)
        pairs, _ = build_pairs(self.records, {"pairs_per_image": 1, "p_easy": 0.5}, rho=1.0, seed=seed)
        self.pairs_path = os.path.join(root, "pairs.jsonl")
        write_pairs(self.pairs_path, pairs, "Describe the image.")
        from .negatives import read_pairs
        self.pairs = read_pairs(self.pairs_path)
        self.sft_items = [{"image": r.path, "response": r.captions[0]} for r in self.records]
        self.sft_c_items = sft_c_items(self.records, {"sft_c_kind": "gentle"}, seed=seed)[:: len(self.records[0].captions)]

    def trainer(self, method: str, model, hparams: dict, forward: str = "shared_prefix", ref_model=None):
        from transformers import TrainingArguments
        from .train import CWDPOTrainer, ListDataset
        from .logprobs import Collator
        kind = {"sft": "sft", "sft_c": "sft_c"}.get(method, "pair")
        args = TrainingArguments(output_dir=os.path.join(self.root, "trainer"), report_to=[], use_cpu=True,
                                 per_device_train_batch_size=8, remove_unused_columns=False, disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0)
        return CWDPOTrainer(model=model, args=args, train_dataset=ListDataset([]), data_collator=Collator(self.encoder, kind),
                            method=method, hparams=hparams, encoder=self.encoder, forward=forward, ref_model=ref_model)


HPARAMS = {"beta": 0.1, "gamma": 2.0, "tau": 1.0, "l_floor": -5.0, "margin": 2.0, "lam": 0.5}
CW_HPARAMS = {**HPARAMS, "filter": {"enabled": True, "k": 2.0}}  # as the cw_dpo recipe: with negative filtering


def method_step_times(wb: Workbench, batch_size: int, steps: int, warmup: int, progress) -> dict:
    """Median fwd+bwd+AdamW step of every method on identical batches (collation excluded).

    The methods run interleaved, one step each per round, so a change of machine load hits all alike."""
    from .models import load_model
    from .reference import reference_logps
    ref_path = os.path.join(wb.root, "ref.json")
    ref = reference_logps(wb.model_dir, wb.pairs_path, ref_path, base=None, dtype="float32", prompt="Describe the image.",
                          min_pixels=None, max_pixels=None, max_response_tokens=40)
    pairs = [{**p, "ref_chosen_logps": ref["ref_chosen_logps"][i], "ref_rejected_logps": ref["ref_rejected_logps"][i],
              "pair_index": i} for i, p in enumerate(wb.pairs)][:batch_size]
    base = load_model(wb.model_dir, trainable=True)
    ref_model = load_model(wb.model_dir)
    steppers = {}

    def add(name, method, items, hp=HPARAMS, forward="shared_prefix", ref_model=None):
        model = copy.deepcopy(base)
        tr = wb.trainer(method, model, hp, forward, ref_model)
        inputs = tr.data_collator(items)
        if ref_model is not None:
            inputs = {k: v for k, v in inputs.items() if not k.startswith("ref_")}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            loss = tr.compute_loss(model, inputs)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steppers[name] = step

    add("sft", "sft", wb.sft_items[:batch_size])
    add("sft_c", "sft_c", wb.sft_c_items[:batch_size])
    add("sft_c_f50", "sft_c", wb.sft_c_items[:batch_size], {**HPARAMS, "penalty_fraction": 0.5})
    add("sft_c_f25", "sft_c", wb.sft_c_items[:batch_size], {**HPARAMS, "penalty_fraction": 0.25})
    add("dpo", "dpo", pairs)
    add("focal_dpo", "focal_dpo", pairs)
    add("cw_dpo", "cw_dpo", pairs, CW_HPARAMS)
    add("dpo_concat", "dpo", pairs, forward="concat")
    add("dpo_recompute_ref", "dpo", pairs, ref_model=ref_model)
    times = {name: [] for name in steppers}
    for r in range(warmup + steps):
        for name, step in steppers.items():
            t = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    progress.update(len(steppers))
    return {name: statistics.median(v) for name, v in times.items()}


def trl_comparison(wb: Workbench, batch_size: int, steps: int, warmup: int) -> dict:
    """Wall time per step (collation included) of TRL's DPOTrainer (its defaults, and with gradient
    checkpointing off) and of our trainer on the same tiny model and pairs; first-step losses."""
    import datasets
    import trl
    from transformers import AutoModelForImageTextToText, TrainerCallback, TrainingArguments
    from .logprobs import Collator
    from .reference import reference_logps
    from .train import CWDPOTrainer, ListDataset
    from .models import load_model

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    n_steps = warmup + steps
    result = {}
    ds = datasets.load_dataset("json", data_files=wb.pairs_path, split="train")
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    for label, gc in (("trl_default", True), ("trl_no_checkpointing", False)):
        clock = Clock()
        cfg = trl.DPOConfig(output_dir=os.path.join(wb.root, label), per_device_train_batch_size=batch_size,
                            max_steps=n_steps, learning_rate=1e-5, beta=0.1, report_to=[], use_cpu=True, bf16=False,
                            save_strategy="no", logging_steps=1, remove_unused_columns=False, gradient_checkpointing=gc,
                            dataloader_num_workers=0, seed=0, max_length=None, disable_tqdm=True)
        model = AutoModelForImageTextToText.from_pretrained(wb.model_dir)
        tr = trl.DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=wb.processor, callbacks=[clock])
        tr.train()
        gaps = [b - a for a, b in zip(clock.ends[warmup:], clock.ends[warmup + 1:])]
        result[f"{label}_s"] = statistics.median(gaps)
        result[f"{label}_first_loss"] = next(h["loss"] for h in tr.state.log_history if "loss" in h)
    ref = reference_logps(wb.model_dir, wb.pairs_path, os.path.join(wb.root, "ref.json"), base=None, dtype="float32",
                          prompt="Describe the image.", min_pixels=None, max_pixels=None, max_response_tokens=40)
    items = [{**p, "ref_chosen_logps": ref["ref_chosen_logps"][i], "ref_rejected_logps": ref["ref_rejected_logps"][i],
              "pair_index": i} for i, p in enumerate(wb.pairs)]
    clock = Clock()
    args = TrainingArguments(output_dir=os.path.join(wb.root, "ours"), per_device_train_batch_size=batch_size,
                             max_steps=n_steps, learning_rate=1e-5, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    tr = CWDPOTrainer(model=load_model(wb.model_dir, trainable=True), args=args, train_dataset=ListDataset(items),
                      data_collator=Collator(wb.encoder, "pair"), method="dpo", hparams=HPARAMS, encoder=wb.encoder,
                      callbacks=[clock])
    tr.train()
    gaps = [b - a for a, b in zip(clock.ends[warmup:], clock.ends[warmup + 1:])]
    result["ours_s"] = statistics.median(gaps)
    result["ours_first_loss"] = next(h["loss"] for h in tr.state.log_history if "loss" in h)
    result["trl_version"] = trl.__version__
    return result


def generation_throughput(wb: Workbench, n: int, num_beams: int = 3) -> float:
    from .evaluate import generate_captions
    from .models import load_model
    model = load_model(wb.model_dir)
    paths = [r.path for r in wb.records[:n]]
    generate_captions(model, wb.encoder, paths[:8], num_beams=num_beams, max_new_tokens=20, batch_size=64, desc="warm-up")
    t = time.perf_counter()
    generate_captions(model, wb.encoder, paths, num_beams=num_beams, max_new_tokens=20, batch_size=64, desc="generate")
    return len(paths) / (time.perf_counter() - t)


def scoring_throughput(wb: Workbench, n: int) -> dict:
    from .metrics import CiderD, score_captions, simple_tokenize
    recs = (wb.records * (n // len(wb.records) + 1))[:n]
    gts = {str(i): r.captions for i, r in enumerate(recs)}
    res = {str(i): recs[(i + 1) % len(recs)].captions[0] for i in range(len(recs))}
    t = time.perf_counter()
    score_captions(gts, res, metrics=("BLEU-4", "METEOR", "ROUGE-L", "CIDEr"))
    full = len(recs) / (time.perf_counter() - t)
    t = time.perf_counter()
    refs = [[simple_tokenize(c) for c in gts[k]] for k in gts]
    CiderD(refs).score([simple_tokenize(res[k]) for k in gts], refs)
    cider = len(recs) / (time.perf_counter() - t)
    return {"all_metrics_captions_per_s": full, "cider_only_captions_per_s": cider, "captions": len(recs)}


def dag_timings(workdir: str, experiment_dir: str) -> dict:
    """`snakemake -n` seconds and, after a finished run, the no-op `snakemake --cores all` seconds."""
    out = {}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n"], cwd=workdir, capture_output=True, text=True)
    out["dry_run_s"] = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--version"], cwd=workdir, capture_output=True, text=True)
    out["snakemake_startup_s"] = time.perf_counter() - t
    if proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all"], cwd=workdir, capture_output=True, text=True)
        out["noop_rerun_s"] = time.perf_counter() - t
    else:
        out["noop_rerun_s"] = None
        out["noop_rerun_na"] = f"the default pipeline in {experiment_dir} is not complete (run `snakemake --cores all`)"
    return out


def pipeline_costs(experiment_dir: str) -> dict:
    """Totals of the Snakemake `benchmark:` files of a finished run, and its wall time from file times:
    from the earliest job start (a benchmark file's mtime minus its `s`, or the earliest log) to the
    newest benchmark, log, table or figure file. Snakemake records no run-level timing itself."""
    rows, starts, ends = [], [], []
    for path in glob.glob(os.path.join(experiment_dir, "benchmarks", "**", "*.tsv"), recursive=True):
        with open(path) as f:
            lines = f.read().strip().splitlines()
        if len(lines) >= 2:
            head, vals = lines[0].split("\t"), lines[-1].split("\t")
            row = dict(zip(head, vals))
            rows.append(row)
            end = os.path.getmtime(path)
            starts.append(end - float(row["s"]))
            ends.append(end)
    if not rows:
        return {"na": f"no benchmark files under {experiment_dir}/benchmarks"}
    for sub in ("logs", "tables", "figures"):
        for path in glob.glob(os.path.join(experiment_dir, sub, "**", "*"), recursive=True):
            if os.path.isfile(path):
                t = os.path.getmtime(path)
                ends.append(t)
                if sub == "logs":
                    starts.append(t)
    seconds = sum(float(r["s"]) for r in rows)
    peak = max(float(r["max_rss"]) for r in rows if r.get("max_rss") not in (None, "", "NA"))
    return {"jobs_with_benchmarks": len(rows), "sum_job_seconds": seconds, "max_job_rss_mb": peak,
            "wall_s": max(ends) - min(starts)}


def run_bench(out_dir: str, quick: bool = False, threads: int = 0, large: bool = True, workdir: str = ".",
              experiment_dir: str = "results/tiny") -> dict:
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    steps, warmup = (5, 2) if quick else (20, 5)
    tasks = 9 * (2 if large and not quick else 1) + 5
    progress = tqdm(total=tasks, desc="cwdpo bench", mininterval=0.5)
    report: dict = {"quick": quick, "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="cwdpo-bench-") as tmp:
        wb = Workbench(os.path.join(tmp, "tiny"), TINY, 112, 32)
        report["tiny"] = method_step_times(wb, 8, steps, warmup, progress)
        if large and not quick:
            wbl = Workbench(os.path.join(tmp, "large"), LARGE, 224, 16)
            report["large"] = method_step_times(wbl, 8, max(5, steps // 2), 2, progress)
        report["trl"] = trl_comparison(wb, 8, steps, warmup)
        progress.update(1)
        report["generation_captions_per_s"] = generation_throughput(wb, 32 if quick else 128)
        progress.update(1)
        report["scoring"] = scoring_throughput(wb, 100 if quick else 1000)
        progress.update(1)
        from .prefix import bench_shared_prefix
        report["shared_prefix"] = bench_shared_prefix(image_size=224 if quick else 448, batch_pairs=4,
                                                      steps=2 if quick else 5, warmup=1, methods=("packed",))
        progress.update(1)
    report["dag"] = dag_timings(workdir, experiment_dir)
    report["pipeline"] = pipeline_costs(experiment_dir)
    progress.update(1)
    progress.close()
    t = report["tiny"]
    report["ratios"] = {
        "cw_dpo_over_dpo": t["cw_dpo"] / t["dpo"],
        "focal_dpo_over_dpo": t["focal_dpo"] / t["dpo"],
        "sft_c_over_sft": t["sft_c"] / t["sft"],
        "sft_c_f50_over_sft": t["sft_c_f50"] / t["sft"],
        "sft_c_f25_over_sft": t["sft_c_f25"] / t["sft"],
        "dpo_over_sft": t["dpo"] / t["sft"],
        "cached_ref_over_recompute": t["dpo"] / t["dpo_recompute_ref"],
        "dpo_over_trl": report["trl"]["ours_s"] / report["trl"]["trl_default_s"],
        "dpo_over_trl_no_checkpointing": report["trl"]["ours_s"] / report["trl"]["trl_no_checkpointing_s"],
        "shared_prefix_over_concat": report["shared_prefix"]["shared_prefix_over_concat"],
        "tiny_shared_prefix_over_concat": t["dpo"] / t["dpo_concat"],
    }
    if "large" in report:
        lg = report["large"]
        report["ratios_large"] = {"cw_dpo_over_dpo": lg["cw_dpo"] / lg["dpo"], "focal_dpo_over_dpo": lg["focal_dpo"] / lg["dpo"],
                                  "sft_c_over_sft": lg["sft_c"] / lg["sft"], "dpo_over_sft": lg["dpo"] / lg["sft"],
                                  "cached_ref_over_recompute": lg["dpo"] / lg["dpo_recompute_ref"],
                                  "sft_c_f25_over_sft": lg["sft_c_f25"] / lg["sft"]}
    report["targets"] = {name: {"value": report["ratios"][key], "limit": limit,
                                "holds": bool(report["ratios"][key] <= limit)} for name, (key, limit) in TARGETS.items()}
    for name, key, limit in (("snakemake -n <= 3 s", "dry_run_s", 3.0), ("no-op rerun <= 5 s", "noop_rerun_s", 5.0)):
        v = report["dag"].get(key)
        report["targets"][name] = {"value": v, "limit": limit, "holds": None if v is None else bool(v <= limit)}
    report["peak_rss_mb"] = peak_rss_mb()
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "bench.json"), report)
    write_text(os.path.join(out_dir, "bench.md"), render_markdown(report))
    return report


def render_markdown(r: dict) -> str:
    from tabulate import tabulate
    lines = [f"# cwdpo bench ({'quick' if r['quick'] else 'full'}; {r['device']}, {r['threads']} threads, torch "
             f"{r['torch']}; median of {r['steps']} steps after {r['warmup']} warm-up)", ""]
    for label in ("tiny", "large"):
        if label in r:
            t = r[label]
            rows = [[k, f"{v * 1000:.1f}", f"{v / t['sft']:.2f}"] for k, v in t.items()]
            lines += [f"## Step time, {label} model (fwd + bwd + AdamW, identical batch of 8)", "",
                      tabulate(rows, headers=["method", "ms/step", "× SFT"], tablefmt="github"), ""]
    lines += ["## Ratios", "", tabulate([[k, f"{v:.3f}"] for k, v in r["ratios"].items()], headers=["ratio", "value"],
                                        tablefmt="github"), ""]
    lines += ["## Targets", "", tabulate([[k, "n/a" if v["value"] is None else f"{v['value']:.3f}", v["limit"],
                                           {True: "holds", False: "does not hold", None: "n/a"}[v["holds"]]]
                                          for k, v in r["targets"].items()],
                                         headers=["target", "value", "limit", "verdict"], tablefmt="github"), ""]
    tr = r["trl"]
    lines += [f"## Peer: TRL {tr['trl_version']} DPOTrainer vs ours (wall per step incl. collation, batch 8)", "",
              tabulate([["TRL (defaults: gradient checkpointing on)", f"{tr['trl_default_s'] * 1000:.1f}",
                         f"{tr['trl_default_first_loss']:.6f}"],
                        ["TRL (gradient checkpointing off)", f"{tr['trl_no_checkpointing_s'] * 1000:.1f}",
                         f"{tr['trl_no_checkpointing_first_loss']:.6f}"],
                        ["ours (cached reference, shared prefix)", f"{tr['ours_s'] * 1000:.1f}",
                         f"{tr['ours_first_loss']:.6f}"]],
                       headers=["trainer", "ms/step", "first-step loss (log 2 = 0.693147)"], tablefmt="github"), ""]
    sp = r["shared_prefix"]
    lines += [f"Shared-prefix forward at {sp['image_tokens']} image tokens: {sp['shared_prefix_over_concat']:.3f} × the "
              f"concatenated forward ({sp['concat_s'] * 1000:.0f} → {sp['shared_prefix_s'] * 1000:.0f} ms).", "",
              f"Generation (hf, beam 3): {r['generation_captions_per_s']:.1f} captions/s. Scoring: "
              f"{r['scoring']['all_metrics_captions_per_s']:.1f} captions/s with BLEU/METEOR/ROUGE/CIDEr (JVM start "
              f"included), {r['scoring']['cider_only_captions_per_s']:.0f} captions/s CIDEr-D only.", "",
              f"DAG: `snakemake -n` {r['dag']['dry_run_s']:.2f} s (snakemake's own start-up: "
              f"{r['dag']['snakemake_startup_s']:.2f} s); no-op rerun: "
              + ("n/a — " + r["dag"]["noop_rerun_na"] if r["dag"]["noop_rerun_s"] is None
                 else f"{r['dag']['noop_rerun_s']:.2f} s") + ".", "",
              "Pipeline (Snakemake benchmark files): " + (
                  r["pipeline"]["na"] if "na" in r["pipeline"] else
                  f"{r['pipeline']['jobs_with_benchmarks']} jobs, {r['pipeline']['sum_job_seconds']:.0f} job-seconds, "
                  f"max job RSS {r['pipeline']['max_job_rss_mb']:.0f} MB; wall ≈ {r['pipeline']['wall_s'] / 60:.1f} min, "
                  "first job start to last output, from file times") + ".", "",
              f"Peak RSS of this benchmark: {r['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)
