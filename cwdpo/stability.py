"""The stability of the testbed: the base model pretrained from other seeds, measured on what T-regime
asks of every base model — the one-object colour and shape accuracy of its test captions (and the rest
of the grounding measures). `cwdpo stability` builds, pretrains and measures one seed in one job."""
from __future__ import annotations

import dataclasses
import os
import shutil

from .data import grounding_truth, load_records, write_json


def run(spec, out_dir: str, threads: int = 0) -> dict:
    """Build the tiny model and pretrain it with `spec.seed` (a `StabilitySpec`; its init is built here, in
    out_dir/init), caption the test split as `cwdpo evaluate` does, and write out_dir/grounding.json; the
    model is not kept."""
    from .generation import generate_captions
    from .grounding import grounding_scores
    from .logprobs import make_encoder
    from .models import build_base_init, load_for_inference
    from .train import run_training
    init = os.path.join(out_dir, "init")
    build_base_init(spec.build, init)
    metrics = run_training(dataclasses.replace(spec.train, init=init), out_dir, threads=threads)
    records = load_records(spec.test)
    model, processor = load_for_inference(os.path.join(out_dir, "model"), spec.train.vlm)
    encoder = make_encoder(processor, spec.train.vlm)
    caps = generate_captions(model, encoder, [r.path for r in records], num_beams=spec.num_beams,
                             max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size, desc="stability")
    truth = grounding_truth(records)["attributes"]
    result = {"seed": spec.seed, "final_loss": metrics["final_loss"], "steps": metrics["steps"],
              **grounding_scores({r.image_id: c[0] for r, c in zip(records, caps)}, truth)}
    write_json(os.path.join(out_dir, "grounding.json"), result)
    for name in ("init", "model", "checkpoints"):  # only the measurement is kept
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return result
