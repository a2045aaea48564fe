"""One `transformers.Trainer` subclass for every method: pretraining/SFT, SFT-C, DPO, Focal-DPO, CW-DPO.

The trainer owns batching (a `cwdpo.logprobs.Encoder` collator) and loss dispatch; the parent class keeps
everything else: optimizer, schedule, gradient accumulation, clipping, DeepSpeed, checkpoints and resume.
Stage 2 reads its reference log-probs from a cache file computed once per (reference model, pairs file)
by `reference_logps` — never recomputed per step (TRL recomputes them per step for vision data).
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import random
import re
import time
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import losses as L
from .config import CALIBRATED
from .data import file_sha256, load_records, read_json, stage_records, write_json, write_rows_csv, write_text
from .logprobs import Collator, Encoder, SeqBatch, completion_logps, make_encoder
from .methods import STAGE1_METHODS, STAGE2_METHODS
from .methods import method as method_entry
from .models import load_model, load_processor, set_threads, unwrap
from .specs import to_dict


class TrainingError(RuntimeError):
    """A training run that did not do what its spec asked; `cwdpo train` says it in one line."""


class TrainingDiverged(TrainingError):
    """A NaN/inf loss or gradient; the message names the step and the method."""


class TrainingIncomplete(TrainingError):
    """The Trainer stopped before the steps asked (the message names steps done and asked)."""


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class CWDPOTrainer(Trainer):
    """`Trainer` with the paper's losses: `method` names a `cwdpo.methods` entry, whose loss `compute_loss` calls;
    `hparams` holds the recipe's resolved settings (β, γ, τ, ℓ_floor, C, λ, filter)."""

    def __init__(self, *args, method: str, hparams: dict, encoder: Encoder, forward: str = "shared_prefix",
                 **kwargs):
        method_entry(method)  # a ValueError naming the known methods
        if forward not in ("shared_prefix", "concat"):
            raise ValueError(f"unknown forward {forward!r}; allowed: shared_prefix, concat")
        self.method, self.hparams, self.encoder, self.forward = method, hparams, encoder, forward
        self._stash: dict = defaultdict(list)
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # our losses are per-batch means

    def forward_logps(self, model, batch: SeqBatch):
        """Response log-probs of every row. Rows sharing an image and prompt (a pair's chosen and rejected,
        SFT-C's positive and negative) share one prefix computation unless `forward="concat"`."""
        if self.forward == "shared_prefix" and self.method != "sft":
            from .prefix import completion_logps_shared_prefix
            return completion_logps_shared_prefix(model, batch, self.encoder.image_token_id)
        return completion_logps(model, batch, self.encoder.image_token_id)

    # ---- losses ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = SeqBatch.from_dict(inputs["batch"])
        n = int(inputs["n"])
        hp = self.hparams
        if self.method == "sft_c" and float(hp["penalty_fraction"]) < 1.0:
            # cheaper Stage 1: forward only a random subset of the negatives (the paper's open question:
            # SFT-C doubles the per-step cost); the subset is a function of (seed, step), so resume-safe
            g = torch.Generator().manual_seed(int(self.args.seed) * 1_000_003 + int(self.state.global_step))
            n_neg = max(1, int(round(float(hp["penalty_fraction"]) * n)))
            chosen = sorted(torch.randperm(n, generator=g)[:n_neg].tolist())
            batch = batch.select(list(range(n)) + [n + i for i in chosen])
        out = self.forward_logps(model, batch)
        loss_fn = method_entry(self.method).loss
        if self.method in STAGE1_METHODS:
            loss, info = loss_fn(-out.means[:n], -out.means[n:], hp)
        else:
            pc, pr = out.sums[:n], out.sums[n:]
            avg_r = out.means[n:]
            rc, rr = (x.to(pc.dtype) for x in self.reference_logps(inputs, batch, n))
            losses, info = loss_fn(pc, pr, rc, rr, avg_r, hp)
            if hp["filter"]["enabled"]:
                keep = L.negative_filter_keep(avg_r, l_floor=float(hp["l_floor"]), tau=float(hp["tau"]),
                                              k=float(hp["filter"]["k"])).to(losses.dtype)
            else:
                keep = torch.ones_like(losses)
            loss = (losses * keep).sum() / keep.sum().clamp(min=1.0)
            info = dict(info)
            info["filtered_frac"] = 1.0 - keep.mean()
            info["logps_chosen"] = pc.detach().mean()
            info["logps_rejected"] = pr.detach().mean()
            info["avg_logp_rejected"] = avg_r.detach().mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1} of "
                                   f"method {self.method}")
        for key, value in info.items():
            v = value.float().mean().item() if isinstance(value, torch.Tensor) else float(value)
            self._stash[key].append(v)
        return (loss, out) if return_outputs else loss

    def reference_logps(self, inputs: dict, batch: SeqBatch, n: int):
        """The frozen reference's summed log-probs of the chosen and rejected rows [n] each: the cached
        reference pass, read from the batch (never recomputed per step)."""
        return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume full-weight checkpoints through `from_pretrained`.

        transformers 5.24's Trainer loads `model.safetensors` of a checkpoint with a plain
        `load_state_dict(strict=False)`, but `save_pretrained` wrote Qwen2.5-VL's legacy key names
        (`model.layers.*`, `visual.*`), so nothing is loaded and a resumed run silently restarts from its
        initial weights. `from_pretrained` applies the key conversion; we copy its weights in, strictly.
        Adapters (peft) and DeepSpeed checkpoints take the parent's path.
        """
        model = self.model if model is None else model
        full = any(os.path.isfile(os.path.join(resume_from_checkpoint, n))
                   for n in ("model.safetensors", "model.safetensors.index.json"))
        if full and not hasattr(model, "peft_config") and not self.is_deepspeed_enabled:
            core = unwrap(model)
            dtype = next(core.parameters()).dtype
            fresh = type(core).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
            core.load_state_dict(fresh.state_dict(), strict=True)
            del fresh
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def log(self, logs: dict, *args, **kwargs):
        if self._stash and "loss" in logs:
            for key, values in self._stash.items():
                logs[key] = sum(values) / len(values)
            self._stash.clear()
        super().log(logs, *args, **kwargs)


class NanGuard(TrainerCallback):
    """Stops training before the optimizer step when any gradient is NaN/inf (one fused norm per step);
    the error names the step and the method, and the last good checkpoint stays on disk."""

    def __init__(self, method: str):
        self.method = method

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
            raise TrainingDiverged(f"non-finite gradient at step {state.global_step + 1} of method {self.method}; "
                                   "the last good checkpoint is kept")


class InjectNan(TrainerCallback):
    """Test hook (config `train.inject_nan_step`): poisons the gradients of one optimizer step."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


# ---------------------------------------------------------------------------------------------------

def checkpoint_step(path: str) -> int:
    return int(re.search(r"checkpoint-(\d+)$", path).group(1))


def checkpoint_problem(path: str) -> str | None:
    """Why a `checkpoint-N` folder cannot be resumed from, or None. Cheap checks of every file, never a
    full read (a 72B optimizer state is hundreds of GB): trainer_state.json and the other JSON files parse,
    every safetensors header parses and covers its file, every torch file (.pt/.pth/.bin, DeepSpeed's
    included) is a complete zip archive (truncation removes its central directory)."""
    import zipfile
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json (the save did not finish)"
    for root, _, names in os.walk(path):
        for name in sorted(names):
            f = os.path.join(root, name)
            rel = os.path.relpath(f, path)
            try:
                if name.endswith(".json"):
                    with open(f, encoding="utf-8") as fh:
                        doc = json.load(fh)
                    if name == "trainer_state.json" and not isinstance(doc.get("global_step"), int):
                        return f"{rel}: no global_step"
                elif name.endswith(".safetensors"):
                    from safetensors import safe_open
                    with safe_open(f, "pt"):
                        pass
                elif name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(f):
                    return f"{rel}: not a complete torch file"
            except Exception as e:  # JSON, UTF-8 and safetensors errors: the file is unreadable
                return f"{rel}: {type(e).__name__}: {' '.join(str(e).split())}"
    return None


def last_checkpoint(ckpt_dir: str, discard_unreadable: bool = False) -> str | None:
    """The newest `checkpoint-N` folder that can be resumed from (`checkpoint_problem`), or None. A newer
    one that cannot be read (a node lost while writing it, a truncated or corrupted file) is passed over,
    so a run falls back to the checkpoint before it; with `discard_unreadable` it is also deleted (it can
    never be resumed, and the Trainer would save into it again) and named on stderr."""
    import shutil
    import sys
    found = []
    for path in glob.glob(os.path.join(ckpt_dir, "checkpoint-*")):
        m = re.search(r"checkpoint-(\d+)$", path)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if discard_unreadable:
            print(f"[cwdpo train] {path} cannot be resumed from ({problem}); deleted, falling back to an "
                  "earlier checkpoint", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)  # every torchrun rank may get here
    return None


# the spec keys that name an input file or folder (at any depth: the data, the probe set, the validation
# images, the init model, ...); `image_root` is left out: its images are named by the caption file, and
# hashing every image of COCO per job would not pay
INPUT_KEYS = ("init", "base", "json", "validated", "rows", "external", "scenes", "pairs", "pairs_summary",
              "ref_logps", "lr_choice", "deepspeed")


def spec_inputs(d, path: str = "") -> list:
    """(key path, value) of every input a spec dict names (INPUT_KEYS), in a fixed order."""
    out = []
    if isinstance(d, dict):
        for key in sorted(d):
            where = f"{path}.{key}" if path else key
            if key in INPUT_KEYS and isinstance(d[key], str):
                out.append((where, d[key]))
            else:
                out += spec_inputs(d[key], where)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += spec_inputs(v, f"{path}[{i}]")
    return out


def input_fingerprint(value: str, hashes: dict):
    """What identifies one input of a run: a file by its content (sha256; the caption file, the validated
    report, pairs, the probe set — small next to a model), a model folder by the (name, size, mtime) of its
    files (cheap even for 100-GB checkpoints), a hub id by its snapshot commit in the Hugging Face cache, and
    anything else (no such path) as it is written."""
    if os.path.isfile(value):
        if value not in hashes:
            hashes[value] = file_sha256(value)
        return hashes[value]
    if os.path.isdir(value):
        return _stat_fingerprint(value)
    from .hub import is_hub_id
    if is_hub_id(value):
        try:
            from .hub import snapshot_commit, snapshot_path
            return f"hub:{value}@{snapshot_commit(snapshot_path(value))}"
        except FileNotFoundError:  # not cached: loading it fails with its own message
            return f"hub:{value}@not-cached"
    return value


def spec_fingerprint(spec) -> str:
    """Hash of everything that determines a run: the spec (settings that do not, like progress bars, left
    out), the content of every input it names (`spec_inputs`: a retrained init model, new pairs or changed
    training data invalidate old checkpoints, for the tiny, local and hub models alike) and the number of
    processes (the batch of one optimizer step)."""
    import hashlib
    d = to_dict(spec)
    relevant = {k: v for k, v in d.items() if k != "train"}
    relevant["train"] = {k: v for k, v in d["train"].items()
                         if k not in ("progress", "save_steps", "save_total_limit", "logging_steps",
                                      "pixel_cache_mb", "inject_nan_step")}
    hashes: dict = {}
    relevant["inputs"] = [[where, input_fingerprint(value, hashes)] for where, value in spec_inputs(d)]
    relevant["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def _stat_fingerprint(path: str) -> list:
    """(name, size, mtime) of the files of a folder."""
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    return [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def prepare_checkpoints(ckpt_dir: str, spec) -> str | None:
    """The checkpoint to resume from: the newest readable one of *this* spec. Checkpoints left by a run with
    another spec (changed hyperparameters, data or init) are deleted instead of silently resumed, and so
    are unreadable ones (`last_checkpoint`)."""
    import shutil
    stamp = os.path.join(ckpt_dir, "spec.sha256")
    fp = spec_fingerprint(spec)
    if os.path.isdir(ckpt_dir):
        old = open(stamp).read().strip() if os.path.isfile(stamp) else None
        if old != fp:
            import sys
            if glob.glob(os.path.join(ckpt_dir, "checkpoint-*")):
                print(f"[cwdpo train] {ckpt_dir}: the checkpoints there are of another spec or other inputs (data, "
                      "init model, pairs); deleted, training from the start", file=sys.stderr)
            shutil.rmtree(ckpt_dir)
    os.makedirs(ckpt_dir, exist_ok=True)
    write_text(stamp, fp + "\n")
    return last_checkpoint(ckpt_dir, discard_unreadable=True)


def resume_point(ckpt_dir: str, spec, fresh: bool = False) -> str | None:
    """`prepare_checkpoints` once per job: under torchrun only rank 0 checks, deletes and stamps the checkpoint
    folder (every rank deleting the same folders on a shared file system raced each other); the other ranks
    wait for its answer (a broadcast, hence a barrier) and resume from the same checkpoint. A failure on rank 0
    reaches every rank. `fresh`: every checkpoint is deleted first (training starts again)."""
    import shutil
    import torch.distributed as dist

    def prepare():
        if fresh:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        return prepare_checkpoints(ckpt_dir, spec)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare()
    answer = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("ok", prepare())]
        except Exception as e:  # the others must not wait for ever, nor go on without it
            answer = [("error", f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(answer, src=0)
    status, value = answer[0]
    if status != "ok":
        raise RuntimeError(f"rank 0 could not prepare {ckpt_dir}: {value}")
    return value


def training_arguments(spec, out_dir: str, workers: int = 0) -> TrainingArguments:
    """The Trainer's arguments of a run; `workers`: data-loader worker processes per training process (config
    compute.dataloader_workers, kept across epochs: an execution setting, not part of the spec)."""
    hp, tr = spec.hparams, spec.train
    steps = int(hp["steps"])
    kwargs = dict(
        output_dir=os.path.join(out_dir, "checkpoints"),
        max_steps=steps,
        per_device_train_batch_size=int(hp["batch_size"]),
        gradient_accumulation_steps=int(hp["grad_accum"]),
        learning_rate=float(hp["lr"]),
        lr_scheduler_type=hp["schedule"],
        warmup_steps=int(hp["warmup_steps"]),
        weight_decay=float(hp["weight_decay"]),
        adam_beta1=0.9,
        adam_beta2=float(hp["adam_beta2"]),
        max_grad_norm=float(hp["max_grad_norm"]),
        seed=int(spec.seed),
        data_seed=int(spec.seed),
        logging_steps=int(tr["logging_steps"]),
        save_strategy="steps",
        save_steps=int(tr["save_steps"]),
        save_total_limit=int(tr["save_total_limit"]),
        report_to=[],
        dataloader_num_workers=int(workers),
        dataloader_persistent_workers=int(workers) > 0,
        dataloader_drop_last=True,
        remove_unused_columns=False,
        disable_tqdm=not tr["progress"],
        use_cpu=not torch.cuda.is_available(),
        bf16=bool(tr["bf16"]),
    )
    if tr["gradient_checkpointing"]:  # renamed activation_checkpointing in transformers 5.2x
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        kwargs["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
    if kwargs["lr_scheduler_type"] == "cosine_with_min_lr":
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": float(hp["min_lr_rate"])}
    if tr["deepspeed"]:
        kwargs["deepspeed"] = tr["deepspeed"]
    return TrainingArguments(**kwargs)


def load_for_training(spec, out_dir: str, workers: int = 0):
    """(TrainingArguments, model) of a run, in that order: the arguments first, because a DeepSpeed ZeRO-3
    config among them registers itself with transformers, and `from_pretrained` then builds the model
    inside `deepspeed.zero.Init` — every rank holds only its shard of the weights from the start (loaded
    the other way round, each of 8 ranks held the whole 72B model in host memory, ~145 GB each)."""
    args = training_arguments(spec, out_dir, workers)
    vlm = spec.vlm
    model = load_model(spec.init, base=vlm.base, dtype=vlm.dtype, trainable=True, lora=spec.lora,
                       trust_remote_code=vlm.trust_remote_code)
    return args, model


def build_dataset(spec) -> tuple[list, str, dict]:
    """(items, collator kind, summary) for the spec's method and data: one item per (image, reference
    caption) for SFT, with a gentle negative for SFT-C, the pairs (with their cached reference
    log-probs) for Stage 2."""
    summary: dict = {}
    if spec.method in STAGE2_METHODS:
        from .negatives import read_pairs
        pairs = read_pairs(spec.pairs, expected_prompt=spec.vlm.prompt)
        if spec.pairs_summary:  # whole lines lost (a cut copy, an edit) leave every other line valid
            counted = read_json(spec.pairs_summary)["pairs"]
            if counted != len(pairs):
                from .data import DataError
                raise DataError(f"{spec.pairs}: {len(pairs)} pairs, but its summary {spec.pairs_summary} counts "
                                f"{counted}: the file changed after make_pairs wrote it; delete it and rerun the "
                                "make_pairs rule")
        ref = read_json(spec.ref_logps)
        if ref.get("key", {}).get("pairs") != file_sha256(spec.pairs):
            raise ValueError(f"{spec.ref_logps}: reference log-probs were computed for another pairs file; "
                             "rerun the ref_logps rule")
        for i, p in enumerate(pairs):
            p["ref_chosen_logps"] = ref["ref_chosen_logps"][i]
            p["ref_rejected_logps"] = ref["ref_rejected_logps"][i]
            p["pair_index"] = i
        summary["pairs"] = len(pairs)
        return pairs, "pair", summary
    records = stage_records(load_records(spec.data), spec.data)
    summary["images"] = len(records)
    kind = method_entry(spec.method).batch
    if kind == "sft":
        items = [{"image": r.path, "response": c} for r in records for c in r.captions]
    else:  # SFT-C: each reference with a gentle negative
        from .negatives import sft_c_items
        items = sft_c_items(records, spec.negatives, seed=spec.data_seed)
    qa = qa_items(records, len(items), spec.qa_share, kind, seed=spec.data_seed or 0)
    summary["examples"] = len(items) + len(qa)
    if qa:
        summary["qa_examples"] = len(qa)
    return items + qa, kind, summary


def qa_items(records: list, n_captions: int, share: float, kind: str, seed: int = 0) -> list:
    """The question–answer turns of `records` (data.shapes.qa) as training items, `share` of all examples:
    round(share / (1 − share) × n_captions) turns, drawn without repeats from a seeded shuffle of every turn
    (cycled when more are needed). SFT items {image, prompt, response}; SFT-C items add the turn's negative (a
    wrong answer) as the gentle negative its penalty pushes down."""
    if not share:
        return []
    turns = [(r.path, t) for r in records for t in r.qa]
    if not turns:
        from .data import DataError
        raise DataError(f"qa_share {share} asks for question–answer turns, but the training records have none: "
                        "set data.shapes.qa: true (the `shapes` generator writes them)")
    n = round(share / (1.0 - share) * n_captions)
    order = list(range(len(turns)))
    random.Random(f"qa:{seed}").shuffle(order)
    picked = [turns[order[i % len(order)]] for i in range(n)]
    if kind == "sft":
        return [{"image": path, "prompt": t["prompt"], "response": t["answer"]} for path, t in picked]
    return [{"image": path, "prompt": t["prompt"], "positive": t["answer"], "negative": t["negative"],
             "kind": f"qa:{t['kind']}"} for path, t in picked]


def make_probe_callback(spec, encoder: Encoder, out_dir: str):
    """The learning-dynamics probe of this run (`spec.probes`), or None when probes are off."""
    p = spec.probes
    if p is None:
        return None
    from .data import read_jsonl
    from .probes import ProbeCallback
    rows = read_jsonl(p.rows)[: p.images]
    val_records = load_records(p.val)[: p.val_images] if p.val_interval else None
    return ProbeCallback(rows, encoder, out_dir, interval=p.interval, batch_size=p.batch_size, n_bins=p.n_bins,
                         val_records=val_records, val_interval=p.val_interval, top5=p.top5,
                         max_new_tokens=p.max_new_tokens)


def check_enough_data(spec, n_items: int, unit: str, world_size: int) -> None:
    """Raise `ConfigError` before training when one optimizer step needs more examples than the data has
    (batch_size × grad_accum × processes): the Trainer drops incomplete batches, so such a run would take
    no step (or only partial ones) and still end "successfully" with the initial weights."""
    from .config import ConfigError
    hp = spec.hparams
    bs, ga = int(hp["batch_size"]), int(hp["grad_accum"])
    need = bs * ga * world_size
    if n_items >= need:
        return
    stage = spec.data.stage or "pretrain"
    raise ConfigError(
        f"{stage} ({spec.method}): one optimizer step takes batch_size {bs} × grad_accum {ga} × {world_size} "
        f"process(es) = {need} {unit}, but the training data has {n_items} {unit}: not one full step of the "
        f"{hp['steps']} asked fits. Lower the batch size or grad_accum (config {stage}), or give it more data")


def resolve_l_floor(l_floor, ref_logps: str | None) -> float:
    """ℓ_floor as a number; "mean" = mean ℓ̄ of the Stage-2 negatives under the Stage-1 (reference) model."""
    if l_floor == "mean":
        vals = read_json(ref_logps)["ref_rejected_avg"]
        return float(sum(vals) / len(vals))
    return float(l_floor)


def run_training(spec, out_dir: str, threads: int = 0, workers: int = 0) -> dict:
    """Train one model as `spec` (a `TrainSpec`) says; write out_dir/{model/, metrics.json, train_log.csv,
    probes.csv, timing.json}. `threads`: torch's CPU threads; `workers`: data-loader worker processes."""
    t0 = time.time()
    set_threads(threads)
    random.seed(int(spec.seed))
    torch.manual_seed(int(spec.seed))
    hp = dict(spec.hparams)
    calibration = None
    if spec.method in STAGE2_METHODS:
        hp["l_floor"] = resolve_l_floor(hp["l_floor"], spec.ref_logps)
        if hp["lr"] == CALIBRATED:  # the calibration rule's outcome (config stage2.calibration): its lr and β
            calibration = read_json(spec.lr_choice)
            hp["lr"] = float(calibration["lr"])
            if calibration.get("beta") is not None:
                hp["beta"] = float(calibration["beta"])
    vlm = spec.vlm
    processor = load_processor(spec.init, vlm.min_pixels, vlm.max_pixels, vlm.trust_remote_code)
    encoder = make_encoder(processor, vlm, pixel_cache_mb=float(spec.train["pixel_cache_mb"]))
    items, kind, summary = build_dataset(spec)
    check_enough_data(spec, len(items), "pairs" if kind == "pair" else "examples",
                      int(os.environ.get("WORLD_SIZE", "1")))
    args, model = load_for_training(dataclasses.replace(spec, hparams=hp), out_dir, workers)
    callbacks = []
    if spec.train["inject_nan_step"]:
        callbacks.append(InjectNan(spec.train["inject_nan_step"]))
    callbacks.append(NanGuard(spec.method))
    probe = make_probe_callback(spec, encoder, out_dir)
    if probe is not None:
        callbacks.append(probe)
    trainer = CWDPOTrainer(model=model, args=args, train_dataset=ListDataset(items),
                           data_collator=Collator(encoder, kind), method=spec.method, hparams=hp, encoder=encoder,
                           forward=spec.train["forward"], callbacks=callbacks)
    resume = resume_point(args.output_dir, spec)
    if resume and checkpoint_step(resume) >= args.max_steps and probe is not None and \
            not probe.restore(checkpoint_step(resume)):
        # the learning dynamics of the finished training are gone (probes.partial.jsonl lost): train again
        import sys
        print(f"[cwdpo train] {resume} is the final checkpoint, but {probe.partial_path} lacks its probe rows; "
              "training again from the start", file=sys.stderr)
        resume = resume_point(args.output_dir, spec, fresh=True)
    if resume and checkpoint_step(resume) >= args.max_steps:
        # training had finished before the job was interrupted (a kill during the fused evaluation, a
        # forced or evaluation-only rerun): take the final checkpoint, its state and log history, and the
        # probe rows (restored above) as they are — the Trainer would run one more step when resumed at
        # max_steps — so the run's files are those of the uninterrupted run
        from transformers import TrainerState
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        train_metrics = {}
    else:
        train_metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if trainer.state.global_step < args.max_steps:  # never save a run that stopped short as a trained model
        raise TrainingIncomplete(f"{spec.method}: the Trainer stopped after {trainer.state.global_step} of the "
                                 f"{args.max_steps} steps asked ({len(items)} training items)")
    model_dir = os.path.join(out_dir, "model")
    trainer.save_model(model_dir)  # every rank takes part (ZeRO-3 gathers the weights); rank 0 writes
    history = [h for h in trainer.state.log_history if "loss" in h]
    last = history[-1] if history else {}
    # passes over the training set (epochs): examples drawn / items (Stage 2: before CW-DPO's filter)
    summary["passes"] = (int(trainer.state.global_step) * int(hp["batch_size"]) * int(hp["grad_accum"])
                         * int(args.world_size) / len(items))
    metrics = {"method": spec.method, "steps": int(trainer.state.global_step), "seed": int(spec.seed),
               "final_loss": last.get("loss"), "l_floor": hp.get("l_floor"), "tau": hp.get("tau"),
               "hparams": hp,  # every setting as resolved for training: a "mean" ℓ_floor, a calibrated lr and β
               "data": summary,
               "resumed_from": os.path.basename(resume) if resume else None,
               "device": str(next(trainer.model.parameters()).device),  # where the weights trained
               # ZeRO-3 partitions parameters into placeholders: count their full sizes (ds_numel)
               "parameters": sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters()),
               "trainable_parameters": sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters()
                                           if p.requires_grad)}
    if calibration is not None:  # (only then: the metrics of a run with a set lr keep their keys)
        metrics["lr_calibrated"] = {k: calibration.get(k)
                                    for k in ("lr", "beta", "row", "signature", "outcome", "table")}
    if not trainer.is_world_process_zero():  # torchrun: one writer of the run's files
        return metrics
    processor.save_pretrained(model_dir)
    if probe is not None:
        probe.write_csv(os.path.join(out_dir, "probes.csv"))
    else:  # always present (a declared output): no probe rows
        write_text(os.path.join(out_dir, "probes.csv"), "step\n")
    write_train_log(os.path.join(out_dir, "train_log.csv"), history)
    for key in ("w_c", "accuracies", "filtered_frac", "penalty", "margins"):
        vals = [h[key] for h in history if key in h]
        if vals:
            metrics[f"mean_{key}"] = sum(vals) / len(vals)
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    write_json(os.path.join(out_dir, "timing.json"), {
        "wall_s": time.time() - t0, "train_runtime_s": train_metrics.get("train_runtime"),
        "steps_per_s": train_metrics.get("train_steps_per_second")})
    return metrics


def write_train_log(path: str, history: list):
    """The Trainer's log history (one row per logging step) as CSV; timing fields are left out."""
    write_rows_csv(path, history, skip={"train_runtime", "train_samples_per_second", "train_steps_per_second",
                                        "total_flos", "epoch"})


def read_train_log(path: str) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))
