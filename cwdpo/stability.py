"""The stability of the testbed: the base model pretrained from other seeds, measured on what T-regime
asks of every base model — the one-object colour and shape accuracy of its test captions (and the rest
of the grounding measures) and its accuracy on the MCQ sets. `cwdpo stability` builds, pretrains and
measures one seed in one job."""
from __future__ import annotations

import dataclasses
import os
import shutil

from .data import grounding_truth, load_records, write_json


MCQ_KEPT = ("accuracy", "accuracy_plain", "n", "by_category")  # of an MCQ set's result, what a seed's file keeps


def run(spec, out_dir: str, threads: int = 0) -> dict:
    """Build the tiny model and pretrain it with `spec.seed` (a `StabilitySpec`; its init is built here, in
    out_dir/init), caption the test split as `cwdpo evaluate` does, answer the MCQ sets (key "mcq": {set:
    accuracy, …}), and write out_dir/grounding.json; the model is not kept."""
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
    if spec.mcq_sets:  # T-regime's MCQ precondition, over the pretraining seeds too
        from .mcq import evaluate_set
        result["mcq"] = {m.name: {k: v for k, v in evaluate_set(model, processor, m, spec.test.on_bad_input).items()
                                  if k in MCQ_KEPT} for m in spec.mcq_sets}
    write_json(os.path.join(out_dir, "grounding.json"), result)
    for name in ("init", "model", "checkpoints"):  # only the measurement is kept
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return result
