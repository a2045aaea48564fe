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
    path = shapes.generate(a.out, shapes.ShapesSpec(splits=spec["splits"], seed=int(spec["seed"]),
                                                    image_size=int(spec["image_size"])))
    records = load_karpathy(path)
    counts: dict = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    write_json(os.path.join(a.out, "summary.json"), {"images": counts, "captions": sum(len(r.captions) for r in records)})


def cmd_build_model(a):
    _quiet_hf()
    from .data import load_karpathy, write_json
    from .models import build_tiny
    spec = _spec(a.spec)
    records = load_karpathy(spec["data"]["json"], spec["data"].get("image_root"), spec["data"]["splits"])
    corpus = [c for r in records for c in r.captions]
    info = build_tiny(a.out, corpus, {**spec["tiny"], "min_pixels": spec["min_pixels"],
                                      "max_pixels": spec["max_pixels"]}, spec["prompt"], seed=int(spec["seed"]))
    write_json(os.path.join(a.out, "build_info.json"), info)
    print(json.dumps(info))


def cmd_train(a):
    _quiet_hf()
    from .train import run_training
    metrics = run_training(_spec(a.spec), a.out)
    print(json.dumps(metrics, sort_keys=True))


def cmd_generate(a):
    _quiet_hf()
    spec = _spec(a.spec)
    _threads(spec.get("threads", 0))
    from .data import load_karpathy, write_json
    from .evaluate import generate_captions
    from .logprobs import Encoder
    from .models import load_model, load_processor
    d = spec["data"]
    records = load_karpathy(d["json"], d.get("image_root"), d["splits"], on_bad_input=d.get("on_bad_input", "error"))
    processor = load_processor(spec["model"], spec.get("min_pixels"), spec.get("max_pixels"),
                               spec.get("trust_remote_code", False))
    model = load_model(spec["model"], base=spec.get("base"), dtype=spec.get("dtype", "float32"),
                       trust_remote_code=spec.get("trust_remote_code", False))
    encoder = Encoder(processor, spec["prompt"], spec.get("max_response_tokens", 64))
    caps = generate_captions(model, encoder, [r.path for r in records], num_beams=int(spec["num_beams"]),
                             max_new_tokens=int(spec["max_new_tokens"]), batch_size=int(spec["batch_size"]))
    write_json(a.out, {"captions": {r.image_id: c[0] for r, c in zip(records, caps)},
                       "references": {r.image_id: r.captions for r in records},
                       "decoding": {"num_beams": spec["num_beams"], "max_new_tokens": spec["max_new_tokens"]}})


def cmd_trivial(a):
    from .data import load_karpathy, most_frequent_caption, write_json
    spec = _spec(a.spec)
    train = load_karpathy(spec["train"]["json"], spec["train"].get("image_root"), spec["train"]["splits"],
                          check_files=False)
    test = load_karpathy(spec["test"]["json"], spec["test"].get("image_root"), spec["test"]["splits"],
                         check_files=False)
    caption = most_frequent_caption(train)
    write_json(a.out, {"captions": {r.image_id: caption for r in test},
                       "references": {r.image_id: r.captions for r in test},
                       "decoding": {"trivial": "most frequent training caption", "caption": caption}})


def cmd_score(a):
    from .data import read_json, write_json
    from .metrics import MeteorPool, score_captions
    if len(a.captions) != len(a.out):
        sys.exit("cwdpo score: give one --out per --captions file")
    metrics = a.metrics.split(",") if a.metrics else None
    meteor = MeteorPool()
    for cap_path, out_path in zip(a.captions, a.out):
        doc = read_json(cap_path)
        kwargs = {"metrics": metrics} if metrics else {}
        result = score_captions(doc["references"], doc["captions"], meteor=meteor, **kwargs)
        for metric, reason in result["na_reasons"].items():
            print(f"[cwdpo score] {cap_path}: {metric} = n/a ({reason})", file=sys.stderr)
        write_json(out_path, result)


def cmd_table(a):
    from .report import write_table
    write_table(_spec(a.spec), a.out)


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

    def add(name, fn, help_):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("prepare-data", cmd_prepare_data, "generate the embedded `shapes` dataset (Karpathy format)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("build-model", cmd_build_model, "build the tiny random-init Qwen2.5-VL + tokenizer + processor")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("train", cmd_train, "train one model (pretrain/SFT/SFT-C/DPO/Focal-DPO/CW-DPO)")
    sp.add_argument("--spec", required=True)
    sp.add_argument("--out", required=True)
    sp = add("generate", cmd_generate, "beam-search captions for an evaluation split")
    sp.add_argument("--spec", required=True)
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
    sp = add("validate-config", cmd_validate_config, "validate a config file against the workflow schema")
    sp.add_argument("--configfile", required=True)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
