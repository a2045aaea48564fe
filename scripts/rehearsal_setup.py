#!/usr/bin/env python
"""Make a working directory ready for the rehearsal of config/qwen3b.yaml (tests/configs/rehearsal.yaml),
without any download:

- a small COCO in Karpathy's format: `data/coco/dataset_coco.json` with the real file's fields (`split`
  train / restval / val / test, `filepath` train2014 / val2014, COCO-style file names, `imgid`, `cocoid`,
  `sentids`, `sentences[].{raw, tokens, imgid, sentid}`) and real JPEGs (4:3, drawn like the `shapes`
  scenes) under `data/coco/images/{train2014,val2014}/`; the raw captions carry COCO's quirks (capitals,
  trailing periods, double spaces);
- `data/coco/negatives_gpt4o.jsonl`: external negatives in the paper config's format (a stand-in for the
  GPT-4o minimal perturbations: one lexicon swap of a reference);
- a Qwen2.5-VL with a tokenizer trained on those captions and the published Qwen2.5-VL chat template,
  briefly pretrained on the `train` split (`--pretrain-steps`; so that its captions, and with them the
  tables, are not all zero), put into the workflow's own Hugging Face cache (`resources/huggingface/hub`)
  as the hub id `cwdpo-rehearsal/Qwen2.5-VL-stand-in` — so the hub-id code paths, the fetch_model job and
  the offline jobs run for real. `--model tiny` (default, CPU: ~0.2M parameters) or `--model 0.5b`
  (Qwen2.5-0.5B's language-model sizes behind 16 Qwen2.5-VL vision blocks, ~0.7B with the small
  vocabulary: for GPUs, random init).

  python scripts/rehearsal_setup.py --workdir .
  snakemake --cores all --configfile config/qwen3b.yaml --configfile tests/configs/rehearsal.yaml
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile

HUB_ID = "cwdpo-rehearsal/Qwen2.5-VL-stand-in"
SPLITS = {"train": 48, "restval": 16, "val": 8, "test": 12}  # images per Karpathy split
MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vision_hidden_size=32, vision_depth=1, vision_num_heads=1,
                 vision_intermediate_size=64, vocab_size=512, rope_theta=10000.0),
    # Qwen2.5-0.5B-Instruct's published language-model sizes (cwdpo.estimate.KNOWN_LM), half of Qwen2.5-VL's
    # vision tower (16 of its 32 blocks, its widths); the vocabulary is the small trained one
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vision_hidden_size=1280, vision_depth=16, vision_num_heads=16,
                 vision_intermediate_size=3420, vocab_size=2048, rope_theta=1000000.0),
}


def coco_quirks(raw: str, rng: random.Random) -> str:
    """A caption as COCO's annotators wrote them: often capitalised, often a trailing period (sometimes
    after a space), now and then a double space."""
    text = raw[:1].upper() + raw[1:] if rng.random() < 0.7 else raw
    if rng.random() < 0.1:
        words = text.split(" ")
        i = rng.randrange(len(words))
        text = " ".join(words[:i]) + "  " + " ".join(words[i:]) if i else text
    r = rng.random()
    return text + ("." if r < 0.5 else " ." if r < 0.6 else ". " if r < 0.7 else "")


def make_data(workdir: str, seed: int = 0) -> dict:
    """The Karpathy-format file, its JPEGs and the external negatives; returns counts."""
    from cwdpo import shapes as S
    from cwdpo.data import caption_tokens, normalise_caption
    from cwdpo.negatives import gentle_lexicon
    coco = os.path.join(workdir, "data", "coco")
    spec = S.ShapesSpec(splits=SPLITS, seed=seed, image_size=126)
    images, imgid, sentid = [], 0, 0
    for split, count in SPLITS.items():
        folder = "train2014" if split == "train" else "val2014"
        os.makedirs(os.path.join(coco, "images", folder), exist_ok=True)
        for i in range(count):
            rng = random.Random(f"rehearsal:{seed}:{split}:{i}")
            attributes = S.sample_attributes(rng, spec)
            captions = [coco_quirks(c["raw"], rng) for c in S.sample_captions(rng, attributes, spec)]
            from PIL import Image
            scene = S.draw_image(attributes, spec.image_size, rng)
            canvas = Image.new("RGB", (168, 126), scene.getpixel((0, 0)))
            canvas.paste(scene, (21, 0))
            cocoid = 100_000 + 7919 * imgid % 480_000  # COCO-like ids, not the row index
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            canvas.save(os.path.join(coco, "images", folder, filename), format="JPEG", quality=90)
            sentences = []
            for c in captions:
                sentences.append({"tokens": caption_tokens(c), "raw": c, "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                           "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
            imgid += 1
    with open(os.path.join(coco, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    lines = []
    rng = random.Random(f"rehearsal-external:{seed}")
    for img in images:
        if img["split"] in ("train", "restval") and rng.random() < 0.5:
            neg = gentle_lexicon(normalise_caption(img["sentences"][0]["raw"]), rng, ["colour", "number"])
            if neg is not None:
                lines.append(json.dumps({"image_id": img["cocoid"], "negative": neg["text"],
                                         "kind": "stand-in for a GPT-4o perturbation"}))
    with open(os.path.join(coco, "negatives_gpt4o.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"images": len(images), "captions": sentid, "external_negatives": len(lines)}


def pretrain(build: str, workdir: str, steps: int, out: str) -> str:
    """A short SFT of the freshly built model on the `train` split (the pipeline's own trainer and the
    tiny scale's pretraining settings); returns the trained model folder."""
    import dataclasses
    from cwdpo.config import default_config_path, load_config
    from cwdpo.plan import Plan
    from cwdpo.specs import DataSpec
    from cwdpo.train import run_training
    cfg = load_config(default_config_path(), check_paths=False, overrides={
        # COCO-format captions, no question–answer turns: the captions-only pretraining (its lr 3e-3; the
        # default's 1e-3 is for 6000 steps with half the examples turns)
        "pretrain": {"steps": steps, "warmup_steps": min(10, steps - 1), "qa_share": 0.0, "lr": 3.0e-3},
        "train": {"progress": False, "save_steps": 10 ** 6, "logging_steps": 25}})
    spec = Plan(cfg).pretrain_spec()
    coco = os.path.join(workdir, "data", "coco")
    data = DataSpec(json=os.path.join(coco, "dataset_coco.json"), image_root=os.path.join(coco, "images"),
                    splits=["train"], on_bad_input="error", validated=None, stage=None, stage1_fraction=None)
    spec = dataclasses.replace(spec, init=build, data=data,
                               vlm=dataclasses.replace(spec.vlm, min_pixels=3136, max_pixels=401408))
    run_training(spec, out)
    return os.path.join(out, "model")


def make_model(workdir: str, size: str = "tiny", seed: int = 0, pretrain_steps: int = 0) -> str:
    """Build the stand-in model (tokenizer trained on the rehearsal captions, Qwen2.5-VL's chat template),
    pretrain it `pretrain_steps` steps, and publish it into the workflow's Hugging Face cache; returns the
    snapshot path."""
    from cwdpo.data import load_karpathy
    from cwdpo.hub import publish_to_cache
    from cwdpo.models import QWEN2_5_VL_CHAT_TEMPLATE, build_tiny
    coco = os.path.join(workdir, "data", "coco")
    corpus = [c for r in load_karpathy(os.path.join(coco, "dataset_coco.json"), os.path.join(coco, "images"))
              for c in r.captions] + ["You are a helpful assistant."]
    tmp = tempfile.mkdtemp(prefix="rehearsal-model-")
    try:
        build = os.path.join(tmp, "init")
        build_tiny(build, corpus, {**MODELS[size], "min_pixels": 3136, "max_pixels": 401408}, "Describe the image.",
                   seed=seed)
        with open(os.path.join(build, "chat_template.jinja"), "w") as f:
            f.write(QWEN2_5_VL_CHAT_TEMPLATE)
        model = pretrain(build, workdir, pretrain_steps, os.path.join(tmp, "pretrain")) if pretrain_steps else build
        return publish_to_cache(model, HUB_ID, os.path.join(workdir, "resources", "huggingface", "hub"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=".", help="the workflow folder (holds Snakefile)")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="SFT steps on the train split before publishing (default: 300 for tiny, 0 otherwise)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = a.pretrain_steps if a.pretrain_steps is not None else (300 if a.model == "tiny" else 0)
    data = make_data(a.workdir, a.seed)
    snapshot = make_model(a.workdir, a.model, a.seed, steps)
    print(json.dumps({**data, "model": HUB_ID, "size": a.model, "pretrain_steps": steps, "snapshot": snapshot}))


if __name__ == "__main__":
    try:
        import cwdpo  # noqa: F401
    except ImportError:  # a checkout without an install
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
