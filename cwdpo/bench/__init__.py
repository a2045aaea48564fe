"""`cwdpo bench`: step-time ratios of the methods measured in one process on identical batches, the cached
reference saving, the peer comparison with TRL's DPOTrainer, the shared-prefix forward, generation and
scoring throughput, peak memory, and the pipeline's own costs (dry-run, no-op rerun, Snakemake
`benchmark:` files). Writes results/bench/bench.json and bench.md.

A package of its own: production modules never import it. `steps` measures the methods, TRL and
throughput; `prefix_cache` the shared-prefix forward against its two-pass variant; `pipeline` the DAG.

Times are medians after warm-up; every figure that matters is a ratio of two timings taken in the same
process on the same model and batch, so it transfers across machines better than absolute seconds
(absolute times only mean something on a GPU). Targets are printed with whether they hold; tests check
only the file's shape, never a threshold.
"""
from __future__ import annotations

import os
import resource
import tempfile

import torch
from tqdm import tqdm

from ..data import write_json, write_text
from .pipeline import dag_timings, pipeline_costs
from .steps import (Workbench, generation_throughput, method_step_times, qa_mix_step_times, scoring_throughput,
                    trl_comparison)

# a larger random-init Qwen2.5-VL (≈ 9.7M parameters) with 224×224 images (64 image tokens)
LARGE = dict(vocab_size=512, min_pixels=224 * 224, max_pixels=224 * 224, hidden_size=256, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=1024, num_hidden_layers=4, vision_depth=2,
             vision_hidden_size=128, vision_intermediate_size=512, vision_num_heads=2, rope_theta=10000)
TARGETS = {  # name: (ratio key, limit)
    "CW-DPO/DPO step <= 1.05": ("cw_dpo_over_dpo", 1.05),
    "cached reference <= 0.75 x recompute": ("cached_ref_over_recompute", 0.75),
    "SFT-C/SFT step <= 2.0": ("sft_c_over_sft", 2.0),
    "SFT-C (25% of negatives)/SFT step <= 1.3": ("sft_c_f25_over_sft", 1.3),
    "ours/TRL default DPO step <= 0.5": ("dpo_over_trl", 0.5),
}


def _share(x) -> str:
    return "n/a (no job logged its start-up)" if x is None else f"{100 * x:.1f}%"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bench(out_dir: str, quick: bool = False, threads: int = 0, large: bool = True, workdir: str = ".",
              experiment_dir: str = "results/tiny") -> dict:
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    steps, warmup = (5, 2) if quick else (20, 5)
    tasks = 9 * (2 if large and not quick else 1) + 6
    progress = tqdm(total=tasks, desc="cwdpo bench", mininterval=0.5)
    report: dict = {"quick": quick, "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="cwdpo-bench-") as tmp:
        wb = Workbench(os.path.join(tmp, "tiny"), None, 112, 32)  # the default config's tiny model
        report["tiny"] = method_step_times(wb, 8, steps, warmup, progress)
        if large and not quick:
            wbl = Workbench(os.path.join(tmp, "large"), LARGE, 224, 16)
            report["large"] = method_step_times(wbl, 8, max(5, steps // 2), 2, progress)
        report["qa_mix"] = qa_mix_step_times(wb, 16, steps, warmup, progress)
        report["trl"] = trl_comparison(wb, 8, steps, warmup)
        progress.update(1)
        report["generation_captions_per_s"] = generation_throughput(wb, 32 if quick else 128)
        progress.update(1)
        report["scoring"] = scoring_throughput(wb, 100 if quick else 1000)
        progress.update(1)
        from .prefix_cache import bench_shared_prefix
        report["shared_prefix"] = bench_shared_prefix(image_size=224 if quick else 448, batch_pairs=4,
                                                      steps=2 if quick else 5, warmup=1, methods=("packed",))
        progress.update(1)
    report["dag"] = dag_timings(workdir, experiment_dir)
    report["pipeline"] = pipeline_costs(experiment_dir)
    progress.update(1)
    progress.close()
    t, q = report["tiny"], report["qa_mix"]
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
        "qa_mix_length_groups_over_one_forward": q["length_groups_matmul"] / q["one_forward_matmul"],
        "patch_embed_matmul_over_conv3d": q["one_forward_matmul"] / q["one_forward_conv3d"],
        "qa_mix_both_over_neither": q["length_groups_matmul"] / q["one_forward_conv3d"],
    }
    if "large" in report:
        lg = report["large"]
        report["ratios_large"] = {"cw_dpo_over_dpo": lg["cw_dpo"] / lg["dpo"],
                                  "focal_dpo_over_dpo": lg["focal_dpo"] / lg["dpo"],
                                  "sft_c_over_sft": lg["sft_c"] / lg["sft"], "dpo_over_sft": lg["dpo"] / lg["sft"],
                                  "cached_ref_over_recompute": lg["dpo"] / lg["dpo_recompute_ref"],
                                  "sft_c_f25_over_sft": lg["sft_c_f25"] / lg["sft"]}
    report["targets"] = {name: {"value": report["ratios"][key], "limit": limit,
                                "holds": bool(report["ratios"][key] <= limit)}
                         for name, (key, limit) in TARGETS.items()}
    for name, v, limit in (("snakemake -n <= 3 s", report["dag"].get("dry_run_s"), 3.0),
                           ("no-op rerun <= 5 s", report["dag"].get("noop_rerun_s"), 5.0),
                           ("start-up share of the run's job-seconds <= 0.20", report["pipeline"].get("startup_share"),
                            0.20)):
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
    q = r["qa_mix"]
    lines += ["## SFT step on the default's mix (half question–answer turns, batch of 16: "
              f"{100 * q['real_positions']:.0f}% of the padded positions real)", "",
              tabulate([[f"{fwd}, patch embedding as {patch}", f"{q[f'{fwd}_{patch}'] * 1000:.1f}"]
                        for fwd in ("one_forward", "length_groups") for patch in ("conv3d", "matmul")],
                       headers=["language model, vision", "ms/step"], tablefmt="github"), ""]
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
    lines += [f"Shared-prefix forward at {sp['image_tokens']} image tokens: "
              f"{sp['shared_prefix_over_concat']:.3f} × the "
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
                  f"max job RSS {r['pipeline']['max_job_rss_mb']:.0f} MB; "
                  f"wall ≈ {r['pipeline']['wall_s'] / 60:.1f} min, start-up share "
                  f"{_share(r['pipeline'].get('startup_share'))} of the jobs' seconds, "
                  "first job start to last output, from file times") + ".", "",
              f"Peak RSS of this benchmark: {r['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)
