"""Probes during training: a `TrainerCallback` that measures the learning dynamics every N steps.

The probe set is fixed per run: held-out images (the `probe` split), each with its positive (first
reference caption), a gentle and an easy dataset negative, and an on-policy negative sampled from the
model the stage starts from. Every `interval` steps the callback records (docs/method.md § Measurements):
- Δlog p of each kind: ℓ̄_θt(y|x) − ℓ̄_θ0(y|x) (token-mean log-probs, θ0 = start of the stage);
- on the positives' teacher-forced positions: entropy, top-1 mass, ECE (15 bins) and Brier, and TV / JS
  between π_θt and the reference π_θ0. The reference distributions come from the model itself at
  step 0 (Stage 2 starts *at* its reference, Stage 1 at the base model), cached to disk — no second
  model is kept in memory, and a resumed run reloads them;
- the latest logged training loss, mean w_c and fraction of filtered negatives;
- optionally greedy and top-5-beam CIDEr-D on validation images (for convergence and Figure "stage1").
Rows go to `probes.csv` (one per probe step); `probes.partial.jsonl` survives a kill for resume.
"""
from __future__ import annotations

import json
import math
import os

import torch
from transformers import TrainerCallback

from .data import read_jsonl, write_atomically
from .dynamics import distribution_measures
from .logprobs import completion_logps

KINDS = ("positive", "gentle", "easy", "onpolicy")


class ProbeCallback(TrainerCallback):
    """Measures the probe set every `interval` optimizer steps (and at steps 0 and the last)."""

    def __init__(self, rows: list, encoder, out_dir: str, *, interval: int, batch_size: int = 32, n_bins: int = 15,
                 val_records: list | None = None, val_interval: int = 0, top5: bool = False,
                 max_new_tokens: int = 40):
        self.rows, self.encoder, self.out_dir = rows, encoder, out_dir
        self.interval, self.batch_size, self.n_bins = int(interval), int(batch_size), int(n_bins)
        self.val_records, self.val_interval, self.top5 = val_records or [], int(val_interval), bool(top5)
        self.max_new_tokens = int(max_new_tokens)
        self.ref_path = os.path.join(out_dir, "probe_ref.pt")
        self.partial_path = os.path.join(out_dir, "probes.partial.jsonl")
        self.results: list = []
        self.ref = None
        self.is_main = True  # under torchrun every rank measures (ZeRO-3 needs all of them), rank 0 writes
        self.scorer = None
        if self.val_records:
            from .metrics import corpus_scorer
            self.scorer = corpus_scorer(self.val_records)

    # ---- measuring ----
    @torch.no_grad()
    def _pass(self, model) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Token-mean log-probs of every kind ({kind: [n]}) and the positives' logits/targets."""
        means = {k: [] for k in KINDS}
        logits, targets = [], []
        for s in range(0, len(self.rows), self.batch_size):
            chunk = self.rows[s:s + self.batch_size]
            images = [r["image"] for r in chunk]
            order = []
            for kind in KINDS:
                order += [(kind, i, r[kind]) for i, r in enumerate(chunk) if r[kind]]
            batch = self.encoder.build(images, [(i, text) for _, i, text in order]).to(model.device)
            out = completion_logps(model, batch, self.encoder.image_token_id, keep_logits=True)
            for j, (kind, i, _) in enumerate(order):
                means[kind].append(float(out.means[j]))
            n_pos = sum(1 for k, _, _ in order if k == "positive")
            pos_mask = out.row < n_pos
            logits.append(out.logits[pos_mask].float().cpu())
            targets.append(out.targets[pos_mask].cpu())
        return means, torch.cat(logits), torch.cat(targets)

    def _val(self, model) -> dict:
        from .generation import generate_captions
        from .metrics import simple_tokenize
        paths = [r.path for r in self.val_records]
        refs = [[simple_tokenize(c) for c in r.captions] for r in self.val_records]
        out = {}
        greedy = generate_captions(model, self.encoder, paths, num_beams=1, max_new_tokens=self.max_new_tokens,
                                   batch_size=64, desc="probe val")
        out["val_cider"] = float(self.scorer.score([simple_tokenize(c[0]) for c in greedy], refs).mean())
        if self.top5:
            beams = generate_captions(model, self.encoder, paths, num_beams=5, num_return=5,
                                      max_new_tokens=self.max_new_tokens, batch_size=32, desc="probe top-5")
            per = [self.scorer.score([simple_tokenize(b) for b in bs], [r] * len(bs)).mean()
                   for bs, r in zip(beams, refs)]
            out["val_cider_top5"] = float(sum(per) / len(per))
        return out

    def measure(self, model, step: int, pass_result=None) -> dict:
        was_training = model.training
        model.eval()
        try:
            means, logits, targets = pass_result if pass_result is not None else self._pass(model)
            row = {"step": int(step)}
            for kind in KINDS:
                vals = means[kind]
                row[f"logp_{kind}"] = sum(vals) / len(vals) if vals else math.nan
                ref = self.ref["means"][kind]
                row[f"dlogp_{kind}"] = (sum(a - b for a, b in zip(vals, ref)) / len(vals)) if vals else math.nan
            row.update(distribution_measures(logits, targets, self.ref["logits"], self.n_bins))
            row.pop("positions", None)
            if self.val_records and self.val_interval and (step % self.val_interval == 0 or step == self.max_steps):
                row.update(self._val(model))
        finally:
            if was_training:
                model.train()
        return row

    # ---- callback hooks ----
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.max_steps = int(state.max_steps)
        self.is_main = bool(state.is_world_process_zero)
        os.makedirs(self.out_dir, exist_ok=True)
        if state.global_step > 0 and os.path.isfile(self.ref_path):  # resumed: θ0 is what it was
            self.ref = torch.load(self.ref_path, weights_only=True)
            self.results = [r for r in read_jsonl(self.partial_path) if r["step"] <= state.global_step] \
                if os.path.isfile(self.partial_path) else []
            return
        first = self._pass_eval(model)
        self.ref = {"means": first[0], "logits": first[1]}
        if self.is_main:
            write_atomically(self.ref_path, lambda tmp: torch.save(self.ref, tmp))
        self.results = []
        self._record(self.measure(model, 0, pass_result=first))

    def restore(self, step: int) -> bool:
        """Take the rows of a run that had already reached `step` (its last) from probes.partial.jsonl, as a
        finished run holds them (a resumed run that is already at its last step trains no further, so no
        hook reloads them). False when the file lacks the row of `step`: the rows cannot be restored."""
        rows = read_jsonl(self.partial_path) if os.path.isfile(self.partial_path) else []
        self.results = [r for r in rows if r["step"] <= step]
        return any(r["step"] == step for r in self.results)

    def _pass_eval(self, model):
        was_training = model.training
        model.eval()
        try:
            return self._pass(model)
        finally:
            if was_training:
                model.train()

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The trainer logs right after `on_step_end`: attach that step's training values to its probe row."""
        if logs and "loss" in logs and self.results and self.results[-1]["step"] == state.global_step:
            for key in ("loss", "w_c", "filtered_frac", "penalty"):
                if key in logs:
                    self.results[-1][f"train_{key}"] = float(logs[key])
            self._rewrite_partial()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = int(state.global_step)
        if step % self.interval == 0 or step == state.max_steps:
            if not any(r["step"] == step for r in self.results):
                self._record(self.measure(model, step))

    def _record(self, row: dict):
        self.results.append(row)
        self._rewrite_partial()

    def _rewrite_partial(self):
        if not self.is_main:
            return
        from .data import write_text
        write_text(self.partial_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.results))

    def write_csv(self, path: str):
        from .data import write_rows_csv
        write_rows_csv(path, sorted(self.results, key=lambda r: r["step"]))
