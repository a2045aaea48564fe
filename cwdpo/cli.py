"""`cwdpo <command>`: the only surface the Snakefile touches.

Rules pass a JSON `--spec` (built by `cwdpo.plan`) and explicit input/output paths. Heavy imports
(torch, transformers) happen inside the commands that need them, so `cwdpo score` or `cwdpo table` start
in well under a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _spec(text: str) -> dict:
    if text.startswith("@"):
        with open(text[1:]) as f:
            return json.load(f)
    return json.loads(text)


def _quiet_hf():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _threads(n: int):
    if n and n > 0:
        import torch
        torch.set_num_threads(int(n))


# ---- commands ----

def cmd_prepare_data(a):
    from . import shapes
    from .data import load_karpathy, write_json
    spec = _spec(a.spec)
    path = shapes.generate(a.out, shapes.ShapesSpec(
        splits=spec["splits"], seed=int(spec["seed"]), image_size=int(spec["image_size"]),
        heldout=tuple(tuple(x) for x in spec.get("heldout_combos", [])),
        ood={k: v for k, v in spec.get("ood", {}).items() if v}))
    records = load_karpathy(path)
    counts: dict = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    write_json(os.path.join(a.out, "summary.json"), {"images": counts, "captions": sum(len(r.captions) for r in records)})


def cmd_build_model(a):
    _quiet_hf()
    from .data import write_json
    from .models import build_tiny
    spec = _spec(a.spec)
    records = _records(spec["data"])
    corpus = [c for r in records for c in r.captions]
    info = build_tiny(a.out, corpus, {**spec["tiny"], "min_pixels": spec["min_pixels"],
                                      "max_pixels": spec["max_pixels"]}, spec["prompt"], seed=int(spec["seed"]))
    write_json(os.path.join(a.out, "build_info.json"), info)
    print(json.dumps(info))


def cmd_train(a):
    _quiet_hf()
    from .train import run_training
    spec = _spec(a.spec)
    spec.setdefault("train", {})["threads"] = a.threads
    metrics = run_training(spec, a.out)
    print(json.dumps(metrics, sort_keys=True))


def cmd_evaluate(a):
    """Beam-search captions on the test split + teacher-forced measures on the held-out pairs."""
    _quiet_hf()
    spec = _spec(a.spec)
    _threads(a.threads)
    from .data import read_json, write_json
    from .evaluate import generate_captions, pair_measures, test_measures
    from .logprobs import Encoder
    from .models import load_model, load_processor
    from .negatives import read_pairs
    records = _records(spec["data"])
    processor = load_processor(spec["model"], spec.get("min_pixels"), spec.get("max_pixels"),
                               spec.get("trust_remote_code", False))
    model = load_model(spec["model"], base=spec.get("base"), dtype=spec.get("dtype", "float32"),
                       trust_remote_code=spec.get("trust_remote_code", False))
    encoder = Encoder(processor, spec["prompt"], spec.get("max_response_tokens", 64),
                      pixel_cache_mb=float(spec.get("pixel_cache_mb", 0)))  # test images: 3 passes
    paths = [r.path for r in records]

    def caption_doc(recs, desc="generate"):
        """Beam-search captions (the spec's beam size) of `recs` with their references, for `cwdpo score`."""
        caps = generate_captions(model, encoder, [r.path for r in recs], num_beams=int(spec["num_beams"]),
                                 max_new_tokens=int(spec["max_new_tokens"]), batch_size=int(spec["batch_size"]),
                                 desc=desc)
        return {"captions": {r.image_id: c[0] for r, c in zip(recs, caps)},
                "references": {r.image_id: r.captions for r in recs},
                "decoding": {"num_beams": spec["num_beams"], "max_new_tokens": spec["max_new_tokens"]}}

    doc = caption_doc(records)
    if int(spec.get("topk_beams", 0)) > 1:  # the "top-5 beams" of Figure F-stage1: all k beams of a size-k search
        k = int(spec["topk_beams"])
        beams = generate_captions(model, encoder, paths, num_beams=k, num_return=k,
                                  max_new_tokens=int(spec["max_new_tokens"]), batch_size=max(1, int(spec["batch_size"]) // k),
                                  desc=f"top-{k} beams")
        doc["beams"] = {r.image_id: b for r, b in zip(records, beams)}
    write_json(a.captions, doc)
    for es in spec.get("eval_sets", []):  # Flickr30k / NoCaps / shapes OOD: captions with the loaded model
        recs = _records(es["data"])
        set_doc = caption_doc(recs, desc=f"generate {es['name']}")
        if es.get("domains"):
            set_doc["domains"] = {r.image_id: r.domain for r in recs}
        write_json(es["out"], set_doc)
    for m in spec.get("mcq_sets", []):  # multiple-choice VQA accuracy with the loaded model
        from .mcq import evaluate_mcq, load_mcq, shapes_mcq
        if m["format"] == "shapes":
            recs = _records(m["data"])[: m.get("images") or None]
            items, summary = shapes_mcq(recs, seed=int(m.get("seed", 0)), per_image=m.get("per_image")), {}
        else:
            items, summary = load_mcq(m["path"], m["format"], m.get("image_root"),
                                      on_bad_input=spec["data"].get("on_bad_input", "error"))
        result = evaluate_mcq(model, processor, items, scoring=m.get("scoring", "loglik"),
                              circular=bool(m.get("circular", False)), batch_size=int(m.get("batch_size", 64)),
                              max_new_tokens=int(m.get("max_new_tokens", 16)))
        write_json(m["out"], {**result, "load_summary": summary}, indent=None)
    l_floor = spec["l_floor"]
    run_metrics = os.path.join(os.path.dirname(os.path.normpath(spec["model"])), "metrics.json")
    if os.path.isfile(run_metrics) and isinstance(read_json(run_metrics).get("l_floor"), (int, float)):
        l_floor = read_json(run_metrics)["l_floor"]  # a Stage-2 run's own (resolved) floor
    measures = {"heldout": pair_measures(model, encoder, read_pairs(spec["heldout_pairs"], spec["prompt"]),
                                         l_floor=float(l_floor), tau=float(spec["tau"]),
                                         batch_size=int(spec.get("pair_batch_size", 32)))}
    ref_model = None
    if spec.get("reference"):
        ref_model = load_model(spec["reference"], base=spec.get("base"), dtype=spec.get("dtype", "float32"),
                               trust_remote_code=spec.get("trust_remote_code", False))
    measures["test"] = test_measures(model, encoder, records, ref_model=ref_model, n_bins=int(spec.get("n_bins", 15)),
                                     batch_size=int(spec.get("pair_batch_size", 32)))
    measures["test"]["reference"] = spec.get("reference")
    write_json(a.measures, measures, indent=None)


def _records(d: dict, bad_log=None):
    from .data import load_records
    return load_records(d, bad_log=bad_log)


def cmd_validate_data(a):
    """Check every image and caption of the dataset once, before any training job: file present, decodes,
    non-empty captions, required Karpathy fields. `error`: stop naming file and image; `skip`: list them."""
    from .data import BadInputLog, DataError, load_karpathy, write_json
    spec = _spec(a.spec)
    bad = BadInputLog()
    try:
        records = load_karpathy(spec["json"], spec.get("image_root"), None, on_bad_input=spec["on_bad_input"],
                                bad_log=bad, verify_images=True)
    except DataError as e:
        sys.exit(f"cwdpo validate-data: {e}")
    counts: dict = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    write_json(a.out, {"json": spec["json"], "on_bad_input": spec["on_bad_input"], "images": counts,
                       **bad.summary()})
    for item in bad.skipped:
        print(f"[cwdpo validate-data] skipped {item['where']}: {item['reason']}", file=sys.stderr)


def cmd_sample_onpolicy(a):
    """K samples per Stage-2 image from the Stage-1 model, scored by CIDEr-D (corpus df)."""
    _quiet_hf()
    from .data import stage_split, write_json, write_text
    from .sampling import corpus_scorer, make_sampler, score_samples
    spec = _spec(a.spec)
    o = spec["onpolicy"]
    finetune = _records(spec["data"])
    _, stage2 = stage_split(finetune, float(spec["data"]["stage1_fraction"]))
    probe = _records(spec["probe_data"])[: int(spec.get("probe_images", 10 ** 9))] if spec.get("probe_data") else []
    sampler = make_sampler(o["backend"], spec["model"], base=spec.get("base"), prompt=spec["prompt"],
                           min_pixels=spec.get("min_pixels"), max_pixels=spec.get("max_pixels"),
                           dtype=spec.get("dtype", "float32"), max_response_tokens=spec.get("max_response_tokens", 64),
                           trust_remote_code=spec.get("trust_remote_code", False), batch_size=int(o["batch_size"]),
                           threads=a.threads, llm_kwargs=o.get("vllm"))
    texts = sampler.sample([r.path for r in stage2 + probe], k=int(o["k"]), temperature=float(o["temperature"]),
                           top_p=float(o["top_p"]), max_new_tokens=int(o["max_new_tokens"]), seed=int(spec["seed"]))
    scored = score_samples(stage2, texts[:len(stage2)], corpus_scorer(finetune), float(o["threshold"]))
    if probe:  # probe images: scored against the probe references (only read by the probe set)
        for entry in score_samples(probe, texts[len(stage2):], corpus_scorer(probe), float(o["threshold"])):
            scored.append({**entry, "split": "probe"})
    write_text(a.out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in scored))
    stage2_scored = [x for x in scored if x.get("split") != "probe"]
    n = sum(len(x["samples"]) for x in stage2_scored)
    kept = sum(s["kept"] for x in stage2_scored for s in x["samples"])
    refs = sum(s["is_reference"] for x in stage2_scored for s in x["samples"])
    write_json(a.summary, {"images": len(stage2_scored), "probe_images": len(probe), "samples": n, "kept": kept,
                           "equal_to_a_reference": refs, "backend": o["backend"], "k": o["k"],
                           "threshold": o["threshold"],
                           "mean_score": sum(s["score"] for x in stage2_scored for s in x["samples"]) / max(1, n)})


def cmd_probe_set(a):
    """The fixed probe set of the runs that start from a model: probe images + positive, gentle, easy and
    on-policy negatives (the model's lowest-scoring sample)."""
    from .data import write_text
    from .negatives import build_probe_set
    spec = _spec(a.spec)
    records = _records(spec["probe_data"])[: int(spec.get("probe_images", 10 ** 9))]
    samples = {}
    if a.onpolicy:
        with open(a.onpolicy) as f:
            for line in f:
                obj = json.loads(line)
                if obj.get("split") == "probe":
                    samples[str(obj["image_id"])] = obj["samples"]
    rows = build_probe_set(records, samples, spec["negatives"], seed=int(spec["seed"]))
    write_text(a.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def cmd_make_pairs(a):
    """Stage-2 (or held-out) preference pairs: ρ dataset negatives among on-policy ones, TRL format."""
    from .data import BadInputLog, stage_split, write_json
    from .negatives import build_pairs, read_external, write_pairs
    from .metrics import simple_tokenize
    from .sampling import corpus_scorer, read_samples
    spec = _spec(a.spec)
    bad = BadInputLog()
    records = _records(spec["data"], bad_log=bad)
    corpus = records
    if spec.get("stage") == "stage2":
        _, records = stage_split(records, float(spec["data"]["stage1_fraction"]))
    onpolicy = read_samples(a.onpolicy) if a.onpolicy else None
    external = None
    if spec["negatives"].get("external"):
        external = read_external(spec["negatives"]["external"], {r.image_id for r in corpus},
                                 on_bad_input=spec["data"].get("on_bad_input", "error"), bad_log=bad)
    scorer = corpus_scorer(corpus)
    pairs, summary = build_pairs(records, spec["negatives"], float(spec["rho"]), int(spec["seed"]), onpolicy=onpolicy,
                                 external=external, p_easy=spec.get("p_easy"),
                                 scorer=lambda text, refs: scorer.score_one(simple_tokenize(text),
                                                                            [simple_tokenize(r) for r in refs]))
    if not pairs:
        sys.exit(f"cwdpo make-pairs: no pairs (rho={spec['rho']}, on-policy pool {summary['onpolicy_pool']}); "
                 "lower negatives.onpolicy.threshold or raise rho")
    write_pairs(a.out, pairs, spec["prompt"])
    summary["bad_input"] = bad.summary()
    write_json(a.summary, summary)


def cmd_ref_logps(a):
    _quiet_hf()
    spec = _spec(a.spec)
    _threads(a.threads)
    from .reference import reference_logps
    doc = reference_logps(spec["model"], a.pairs, a.out, base=spec.get("base"), dtype=spec.get("dtype", "float32"),
                          prompt=spec["prompt"], min_pixels=spec.get("min_pixels"), max_pixels=spec.get("max_pixels"),
                          max_response_tokens=spec.get("max_response_tokens", 64),
                          batch_size=int(spec.get("batch_size", 32)),
                          trust_remote_code=spec.get("trust_remote_code", False))
    print(f"reference log-probs of {doc['n_pairs']} pairs -> {a.out}")


def cmd_trivial(a):
    from .data import most_frequent_caption, write_json
    spec = _spec(a.spec)
    train = _records(spec["train"])
    test = _records(spec["test"])
    caption = most_frequent_caption(train)
    write_json(a.out, {"captions": {r.image_id: caption for r in test},
                       "references": {r.image_id: r.captions for r in test},
                       "decoding": {"trivial": "most frequent training caption", "caption": caption}})


def cmd_score(a):
    from .data import read_json, write_json
    from .metrics import METRIC_NAMES, MeteorPool, ptb_tokenize, score_beams, score_caption_sets
    if len(a.captions) != len(a.out):
        sys.exit("cwdpo score: give one --out per --captions file")
    metrics = a.metrics.split(",") if a.metrics else list(METRIC_NAMES)
    docs = [read_json(p) for p in a.captions]
    # one PTB tokenizer JVM for every caption, reference and beam of every file (memoised per caption)
    ptb_tokenize({f"{n}:{kind}:{k}": v if isinstance(v, list) else [v]
                  for n, doc in enumerate(docs) for kind in ("references", "captions", "beams")
                  for k, v in (doc.get(kind) or {}).items()})
    sets, where = [], []  # every file, and for NoCaps-style files every domain on its own (its own df)
    for n, doc in enumerate(docs):
        sets.append((doc["references"], doc["captions"]))
        where.append((n, None))
        for d in sorted(set((doc.get("domains") or {}).values())):
            ids = [i for i, dom in doc["domains"].items() if dom == d]
            sets.append(({i: doc["references"][i] for i in ids}, {i: doc["captions"][i] for i in ids}))
            where.append((n, d))
    results = [{} for _ in docs]
    for (n, domain), scored in zip(where, score_caption_sets(sets, metrics, meteor=MeteorPool())):
        if domain is None:
            results[n] = scored
        else:
            results[n].setdefault("domains", {})[domain] = scored
    for cap_path, out_path, doc, result in zip(a.captions, a.out, docs, results):
        if doc.get("beams"):
            result["beams"] = score_beams(doc["references"], doc["beams"],
                                          [m for m in ("CIDEr", "SPICE") if m in metrics])
        for metric, reason in result["na_reasons"].items():
            print(f"[cwdpo score] {cap_path}: {metric} = n/a ({reason})", file=sys.stderr)
        write_json(out_path, result)


def cmd_table(a):
    from .report import write_table
    write_table(_spec(a.spec), a.out)


def cmd_convert_nocaps(a):
    from .data import convert_nocaps
    print(json.dumps(convert_nocaps(a.annotations, a.out, a.split)))


def cmd_figure(a):
    from .figures import write_figure
    write_figure(_spec(a.spec), a.out)


def cmd_bench(a):
    _quiet_hf()
    from .bench import run_bench
    report = run_bench(a.out, quick=a.quick, threads=a.threads, large=not a.no_large, workdir=a.workdir,
                       experiment_dir=a.experiment_dir)
    print(open(os.path.join(a.out, "bench.md")).read())
    print(f"wrote {a.out}/bench.json and bench.md (peak RSS {report['peak_rss_mb']:.0f} MB)")


def cmd_estimate(a):
    """Tokens, FLOPs and GPU-hours of a config's DAG, per rule and in total."""
    from .config import ConfigValidationError, load_config
    from .estimate import H100_BF16_DENSE, estimate, render
    try:
        cfg = load_config(a.configfile, check_paths=False)  # priced before the data is in place
    except ConfigValidationError as e:
        sys.exit(str(e))
    hw = tuple(int(x) for x in a.image_size.lower().split("x")) if a.image_size else None
    est = estimate(cfg, mfu=a.mfu, peak_flops=a.peak_tflops * 1e12 if a.peak_tflops else H100_BF16_DENSE,
                   image_hw=(hw[1], hw[0]) if hw else None)
    print(render(est))
    if a.json:
        from .data import write_json
        write_json(a.json, est)


def cmd_validate_config(a):
    from .config import ConfigValidationError, load_config
    try:
        cfg = load_config(a.configfile)
    except ConfigValidationError as e:
        sys.exit(str(e))
    print(f"{a.configfile}: valid (experiment {cfg['experiment']})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cwdpo", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, threads=False):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        if threads:  # torch commands: the rules pass Snakemake's `threads` here
            sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
        return sp

    sp = add("prepare-data", cmd_prepare_data, "generate the embedded `shapes` dataset (Karpathy format)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("validate-data", cmd_validate_data, "check every image and caption once (missing, corrupt, empty)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("build-model", cmd_build_model, "build the tiny random-init Qwen2.5-VL + tokenizer + processor")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("train", cmd_train, "train one model (pretrain/SFT/SFT-C/DPO/Focal-DPO/CW-DPO)", threads=True)
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("evaluate", cmd_evaluate, "beam-search captions + teacher-forced measures of one model", threads=True)
    sp.add_argument("--spec", required=True)
    sp.add_argument("--captions", required=True)
    sp.add_argument("--measures", required=True)
    sp = add("sample-onpolicy", cmd_sample_onpolicy, "K samples per Stage-2 image from a model (hf or vllm)", threads=True)
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--summary", required=True)
    sp = add("probe-set", cmd_probe_set, "the fixed probe set (positives + gentle/easy/on-policy negatives)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--onpolicy", default=None)
    sp.add_argument("--out", required=True)
    sp = add("make-pairs", cmd_make_pairs, "preference pairs (TRL vision format) from dataset/on-policy negatives")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--onpolicy", default=None)
    sp.add_argument("--out", required=True)
    sp.add_argument("--summary", required=True)
    sp = add("ref-logps", cmd_ref_logps, "cache the reference model's log-probs of a pairs file", threads=True)
    sp.add_argument("--spec", required=True)
    sp.add_argument("--pairs", required=True)
    sp.add_argument("--out", required=True)
    sp = add("trivial", cmd_trivial, "the trivial baseline: the most frequent training caption for every image")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("score", cmd_score, "score caption files with pycocoevalcap (one JVM for all files)")
    sp.add_argument("--captions", nargs="+", required=True)
    sp.add_argument("--out", nargs="+", required=True)
    sp.add_argument("--metrics", default=None, help="comma-separated subset of BLEU-4,METEOR,ROUGE-L,CIDEr,SPICE")
    sp = add("table", cmd_table, "write a comparison table (Markdown, CSV, LaTeX)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True, help="output stem: writes <out>.md, <out>.csv, <out>.tex")
    sp = add("convert-nocaps", cmd_convert_nocaps, "NoCaps annotations (COCO style) -> Karpathy format with domains")
    sp.add_argument("--annotations", required=True, help="e.g. nocaps_val_4500_captions.json")
    sp.add_argument("--out", required=True)
    sp.add_argument("--split", default="val")
    sp = add("figure", cmd_figure, "draw a figure (PNG + PDF) from the runs' probes and measures")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True, help="output stem: writes <out>.png and <out>.pdf")
    sp = add("bench", cmd_bench, "step-time ratios, cached reference, TRL peer, shared prefix, throughput",
             threads=True)
    sp.add_argument("--quick", action="store_true", help="tiny model only, few steps (for CI)")
    sp.add_argument("--out", default="results/bench")
    sp.add_argument("--no-large", action="store_true", help="skip the larger random-init model")
    sp.add_argument("--workdir", default=".", help="the workflow folder for the DAG timings")
    sp.add_argument("--experiment-dir", default="results/tiny", help="a finished run for the pipeline costs")
    sp = add("estimate", cmd_estimate, "tokens, FLOPs and GPU-hours of a config's whole DAG")
    sp.add_argument("--configfile", required=True)
    sp.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation (gpu_smoke measures it)")
    sp.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU (default H100: 989)")
    sp.add_argument("--image-size", default=None, help="WxH of the typical image for Karpathy data (default 640x480)")
    sp.add_argument("--json", default=None, help="also write the estimate as JSON")
    sp = add("validate-config", cmd_validate_config, "validate a config file against the workflow schema")
    sp.add_argument("--configfile", required=True)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
