"""The step-time and throughput measurements of `cwdpo bench`, on a small model built in a temp folder."""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time

import torch
from transformers import TrainingArguments

from .. import shapes
from ..config import default_config_path, load_config, stage1_recipe, stage2_recipe
from ..data import load_karpathy
from ..generation import generate_captions
from ..logprobs import Collator, Encoder, completion_logps
from ..methods import REGISTRY
from ..metrics import CiderD, score_captions, simple_tokenize
from ..models import build_tiny, load_model, load_processor, tokenizer_corpus
from ..negatives import build_pairs, read_pairs, sft_c_items, write_pairs
from ..plan import Plan
from ..reference import reference_logps
from ..specs import Vlm
from ..train import CWDPOTrainer, ListDataset

PROMPT = "Describe the image."


class RecomputeRefTrainer(CWDPOTrainer):
    """The trainer with the reference forward run on every step (TRL's way for vision data) instead of the
    cached reference pass: the baseline of the cached-reference ratio."""

    def __init__(self, *args, ref_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.ref_model = ref_model

    def reference_logps(self, inputs, batch, n):
        with torch.no_grad():
            ref = completion_logps(self.ref_model, batch, self.encoder.image_token_id)
        return ref.sums[:n], ref.sums[n:]


class Workbench:
    """A model folder, a small `shapes` dataset, pairs and SFT-C items, built once in a temp folder; the
    methods' hyperparameters and negative settings are those of the default config."""

    def __init__(self, root: str, spec: dict | None, image_size: int, n_images: int, seed: int = 0):
        """`spec`: sizes of the model (`build_tiny`); None: the default config's tiny model."""
        self.root = root
        self.config = load_config(default_config_path())
        plan = Plan(self.config)
        if spec is None:
            m = self.config["model"]
            spec = {**m["tiny"], "min_pixels": m["min_pixels"], "max_pixels": m["max_pixels"]}
        data = shapes.generate(os.path.join(root, "data"), shapes.ShapesSpec(
            splits={"finetune": n_images}, seed=seed, image_size=image_size, qa=True), progress=False)
        self.records = load_karpathy(data)
        self.model_dir = os.path.join(root, "model")
        build_tiny(self.model_dir, tokenizer_corpus(self.records), spec, PROMPT, seed)
        self.vlm = Vlm(base=None, prompt=PROMPT, min_pixels=spec["min_pixels"], max_pixels=spec["max_pixels"],
                       dtype="float32", max_response_tokens=40, trust_remote_code=False)
        self.processor = load_processor(self.model_dir)
        self.encoder = Encoder(self.processor, PROMPT, self.vlm.max_response_tokens, pixel_cache_mb=512)
        negatives = dataclasses.replace(plan.negatives_spec(external=False), heldout=[], pairs_per_image=1,
                                        p_easy=0.5, sft_c_kind="gentle")
        pairs, _ = build_pairs(self.records, negatives, rho=1.0, seed=seed)
        self.pairs_path = os.path.join(root, "pairs.jsonl")
        write_pairs(self.pairs_path, pairs, PROMPT)
        self.pairs = read_pairs(self.pairs_path)
        self.sft_items = [{"image": r.path, "response": r.captions[0]} for r in self.records]
        self.sft_c_items = sft_c_items(self.records, negatives, seed=seed)[:: len(self.records[0].captions)]

    def recipe(self, name: str) -> dict:
        """A recipe of the default config (Stage 1 or Stage 2), every hyperparameter and its method set."""
        return (stage1_recipe if name in self.config["stage1"]["recipes"] else stage2_recipe)(self.config, name)

    def hparams(self, recipe: str) -> dict:
        """A recipe's hyperparameters (without its method)."""
        hp = self.recipe(recipe)
        hp.pop("method")
        return hp

    def trainer(self, method: str, model, hparams: dict, forward: str = "shared_prefix", ref_model=None):
        kind = REGISTRY[method].batch
        args = TrainingArguments(output_dir=os.path.join(self.root, "trainer"), report_to=[], use_cpu=True,
                                 per_device_train_batch_size=8, remove_unused_columns=False, disable_tqdm=True,
                                 dataloader_num_workers=0, seed=0)
        cls, extra = (RecomputeRefTrainer, {"ref_model": ref_model}) if ref_model is not None else (CWDPOTrainer, {})
        return cls(model=model, args=args, train_dataset=ListDataset([]), data_collator=Collator(self.encoder, kind),
                   method=method, hparams=hparams, encoder=self.encoder, forward=forward, **extra)


def method_step_times(wb: Workbench, batch_size: int, steps: int, warmup: int, progress) -> dict:
    """Median fwd+bwd+AdamW step of every method on identical batches (collation excluded).

    The methods run interleaved, one step each per round, so a change of machine load hits all alike."""
    ref = reference_logps(wb.model_dir, wb.pairs_path, os.path.join(wb.root, "ref.json"), wb.vlm)
    pairs = [{**p, "ref_chosen_logps": ref["ref_chosen_logps"][i], "ref_rejected_logps": ref["ref_rejected_logps"][i],
              "pair_index": i} for i, p in enumerate(wb.pairs)][:batch_size]
    base = load_model(wb.model_dir, trainable=True)
    ref_model = load_model(wb.model_dir)
    steppers = {}

    def add(name, recipe, items, forward="shared_prefix", ref_model=None):
        hp = wb.hparams(recipe)
        method = wb.recipe(recipe)["method"]
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
    add("sft_c_f50", "sft_c_f50", wb.sft_c_items[:batch_size])
    add("sft_c_f25", "sft_c_f25", wb.sft_c_items[:batch_size])
    add("dpo", "dpo", pairs)
    add("focal_dpo", "focal_dpo", pairs)
    add("cw_dpo", "cw_dpo", pairs)  # the recipe: with negative filtering
    add("dpo_concat", "dpo", pairs, forward="concat")
    add("dpo_recompute_ref", "dpo", pairs, ref_model=ref_model)
    medians = interleaved_medians(steppers, steps, warmup)
    progress.update(len(steppers))
    return medians


def interleaved_medians(steppers: dict, steps: int, warmup: int) -> dict:
    """{name: median seconds of one call} of each stepper, run one call each per round (`warmup` rounds
    untimed), so that a change of machine load hits all alike."""
    times = {name: [] for name in steppers}
    for r in range(warmup + steps):
        for name, step in steppers.items():
            t = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def qa_mix_step_times(wb: Workbench, batch_size: int, steps: int, warmup: int, progress) -> dict:
    """Median fwd+bwd+AdamW SFT step on the default pretraining's and Stage 1's mix — half question–answer turns
    (each its own, longer prompt), half captions — with the language model run once over every row or on two
    length groups (`cwdpo.logprobs.length_groups`), and the vision patch embedding as torch's Conv3d or as
    the matrix product `cwdpo.models.patch_embeds_as_matmul` makes it on a CPU; interleaved as
    `method_step_times` (`interleaved_medians`). Also the share of real (unpadded) positions of the batch."""
    from .. import logprobs
    turns = [{"image": r.path, "prompt": t["prompt"], "response": t["answer"]} for r in wb.records for t in r.qa]
    items = [x for pair in zip(turns[::5], wb.sft_items) for x in pair][:batch_size]
    base = load_model(wb.model_dir, trainable=True)  # on a CPU: the patch embedding as a matrix product
    steppers = {}
    for patch in ("matmul", "conv3d"):
        for forward, saving in (("one_forward", 2.0), ("length_groups", logprobs.LENGTH_GROUP_SAVING)):
            model = copy.deepcopy(base)
            if patch == "conv3d":  # back to the class's own (Conv3d) forward
                module = model.model.visual.patch_embed
                module.__dict__.pop("forward", None)
                module.__dict__.pop("_patches_as_matmul", None)
            tr = wb.trainer("sft", model, wb.hparams("sft"))
            inputs = tr.data_collator(items)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

            def step(tr=tr, model=model, inputs=inputs, opt=opt, saving=saving):
                kept = logprobs.LENGTH_GROUP_SAVING
                logprobs.LENGTH_GROUP_SAVING = saving  # 2.0: no split saves 200%, one forward
                try:
                    tr.compute_loss(model, inputs).backward()
                finally:
                    logprobs.LENGTH_GROUP_SAVING = kept
                opt.step()
                opt.zero_grad(set_to_none=True)
            steppers[f"{forward}_{patch}"] = step
    medians = interleaved_medians(steppers, steps, warmup)
    progress.update(1)
    mask = inputs["batch"]["attention_mask"]
    return {**medians, "real_positions": float(mask.sum()) / mask.numel()}


def trl_comparison(wb: Workbench, batch_size: int, steps: int, warmup: int) -> dict:
    """Wall time per step (collation included) of TRL's DPOTrainer (its defaults, and with gradient
    checkpointing off) and of our trainer on the same tiny model and pairs; first-step losses."""
    import datasets
    import trl
    from transformers import AutoModelForImageTextToText, TrainerCallback

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
    ref = reference_logps(wb.model_dir, wb.pairs_path, os.path.join(wb.root, "ref.json"), wb.vlm)
    items = [{**p, "ref_chosen_logps": ref["ref_chosen_logps"][i], "ref_rejected_logps": ref["ref_rejected_logps"][i],
              "pair_index": i} for i, p in enumerate(wb.pairs)]
    clock = Clock()
    args = TrainingArguments(output_dir=os.path.join(wb.root, "ours"), per_device_train_batch_size=batch_size,
                             max_steps=n_steps, learning_rate=1e-5, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
                             disable_tqdm=True)
    tr = CWDPOTrainer(model=load_model(wb.model_dir, trainable=True), args=args, train_dataset=ListDataset(items),
                      data_collator=Collator(wb.encoder, "pair"), method="dpo", hparams=wb.hparams("dpo"),
                      encoder=wb.encoder,
                      callbacks=[clock])
    tr.train()
    gaps = [b - a for a, b in zip(clock.ends[warmup:], clock.ends[warmup + 1:])]
    result["ours_s"] = statistics.median(gaps)
    result["ours_first_loss"] = next(h["loss"] for h in tr.state.log_history if "loss" in h)
    result["trl_version"] = trl.__version__
    return result


def generation_throughput(wb: Workbench, n: int, num_beams: int = 3) -> float:
    model = load_model(wb.model_dir)
    paths = [r.path for r in wb.records[:n]]
    generate_captions(model, wb.encoder, paths[:8], num_beams=num_beams, max_new_tokens=20, batch_size=64,
                      desc="warm-up")
    t = time.perf_counter()
    generate_captions(model, wb.encoder, paths, num_beams=num_beams, max_new_tokens=20, batch_size=64, desc="generate")
    return len(paths) / (time.perf_counter() - t)


def scoring_throughput(wb: Workbench, n: int) -> dict:
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
