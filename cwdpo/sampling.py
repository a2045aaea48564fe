"""On-policy negatives: K samples per image from the Stage-1 model, scored by CIDEr-D with corpus df.

Two backends behind one interface (`Sampler.sample(image_paths) -> [[K texts], ...]`):
- `hf`: transformers `generate` (do_sample, temperature, top-p, `num_return_sequences=K`), seeded per
  batch — the CPU default, reproducible on CPU.
- `vllm`: `vllm.LLM.generate` with `multi_modal_data`, `SamplingParams(n=K, seed=..., max_tokens=...)`,
  a `LoRARequest` when the model folder is a peft adapter, and the same min/max pixels as training
  (`mm_processor_kwargs`). Images go to vLLM `onpolicy.batch_size` at a time, each chunk's images opened
  only for its call (28k COCO images at once would be ~200 GB of pixel values). Installed by the `gpu`
  extra and in the container only.

Both decode with explicit settings (`decoding` of the sampler, recorded in the summary): temperature and
top-p sampling, no top-k, no penalties — never the model's generation_config. Seeds never overlap: vLLM
gives the j-th of a request's n = K samples the seed `seed + j`, so image i of N gets
`(run seed · N + i) · K` and its samples (run seed · N + i) · K + j are distinct for every run seed, image
and sample.

vLLM–HF log-prob parity (vllm backend): the first `onpolicy.parity_samples` samples of the job come back
with vLLM's log-prob of every sampled token (`logprobs=0`, `logprobs_mode="raw_logprobs"`: before temperature
and top-p, the distribution the trainer scores); once the engine is shut down, the job's HF model (the trainer's
`completion_logps` path, same dtype, same pixel bounds) scores the same prompt + tokens, and the summary gets
`logprob_parity` {mean_abs, max_abs, tokens, ...}. float32 on a CPU: ~1e-7 nats/token. A gap means the samples
come from another distribution than the policy the trainer scores (e.g. an engine in another dtype: vLLM's
`dtype="auto"` turns a float32 model into bfloat16, which is why the engine gets the configured dtype).

Each sample gets its CIDEr-D against the image's references with document frequencies from the whole
reference corpus (`cwdpo.metrics.CiderD`), so a score does not depend on which other images were sampled
in the same call. Which samples become negatives is config `negatives.onpolicy.select` (`score_samples`):
on `shapes` those the image's attribute record contradicts, on real captions those below the median
CIDEr-D of the image's own samples (or an absolute threshold).
"""
from __future__ import annotations

import json
import os

from .metrics import CiderD, corpus_scorer, simple_tokenize


class HFSampler:
    """transformers `generate` sampling (the CPU default)."""

    def __init__(self, model_dir: str, vlm, *, batch_size: int = 64):
        from .logprobs import make_encoder
        from .models import load_for_inference
        self.model, self.processor = load_for_inference(model_dir, vlm)
        self.encoder = make_encoder(self.processor, vlm)
        self.batch_size = batch_size
        self.device = str(self.model.device)

    def decoding(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        from .generation import decoding_settings
        return {"backend": "hf", **decoding_settings(num_return=k, do_sample=True, temperature=temperature,
                                                     top_p=top_p, max_new_tokens=max_new_tokens)}

    def sample(self, image_paths: list, *, k: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int) -> list:
        from .generation import generate_captions
        return generate_captions(self.model, self.encoder, image_paths, num_return=k, do_sample=True,
                                 temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 batch_size=max(1, self.batch_size // k), seed=seed, desc="sample on-policy")


def request_seed(seed: int, index: int, n_images: int, k: int) -> int:
    """The vLLM seed of image `index` of `n_images`: vLLM seeds its j-th sample `seed + j` (j < k), so
    requests k apart, and runs n_images·k apart, never share a sample's stream."""
    return (int(seed) * int(n_images) + int(index)) * int(k)


class VLLMSampler:
    """vLLM offline sampling: one request per image with n=K samples and a fixed per-request seed, sent
    `batch_size` images per `generate` call."""

    def __init__(self, model_dir: str, vlm, *, llm_kwargs: dict | None = None, build_engine: bool = True,
                 batch_size: int = 64, parity_samples: int = 0):
        from .logprobs import chat_prompt
        from .models import is_adapter_dir, load_processor
        self.model_dir, self.prompt, self.batch_size = model_dir, vlm.prompt, int(batch_size)
        self.device = "vllm"  # the engine places the model on the job's GPUs
        # the exact prompt text of training (our model folders carry their processor and chat template)
        self.prompt_text = chat_prompt(load_processor(model_dir, vlm.min_pixels, vlm.max_pixels,
                                                      vlm.trust_remote_code), vlm.prompt)
        self.adapter = model_dir if is_adapter_dir(model_dir) else None
        self.engine_model = (vlm.base or self._adapter_base(model_dir)) if self.adapter else model_dir
        self.mm_kwargs = {"min_pixels": int(vlm.min_pixels), "max_pixels": int(vlm.max_pixels)}
        # the model's own dtype (vLLM's "auto" would run a float32 model in bfloat16); raw log-probs (before
        # temperature and top-p: what the trainer scores); no video inputs (else the engine profiles dummy
        # videos); config `negatives.onpolicy.vllm` adds or overrides keyword arguments
        self.engine_kwargs = {**dict(model=self.engine_model, dtype=vlm.dtype, trust_remote_code=vlm.trust_remote_code,
                                     limit_mm_per_prompt={"image": 1, "video": 0}, mm_processor_kwargs=self.mm_kwargs,
                                     generation_config="vllm", seed=0, logprobs_mode="raw_logprobs",
                                     enable_lora=self.adapter is not None), **(llm_kwargs or {})}
        self.parity_samples = int(parity_samples)
        self.parity_rows: list = []  # (image path, prompt token ids, sampled token ids, vLLM log-probs)
        if self.adapter is not None:
            if vision_lora_weights(self.adapter):
                # else vLLM drops them ("no matching PunicaWrapper ... will be ignored") and samples from
                # another model than the one the trainer scores
                self.engine_kwargs.setdefault("enable_tower_connector_lora", True)
            rank = adapter_rank(self.adapter)
            self.engine_kwargs.setdefault("max_lora_rank", vllm_max_lora_rank(rank))
            limit = self.engine_kwargs["max_lora_rank"]
            if limit < rank:
                raise ValueError(f"negatives.onpolicy.vllm.max_lora_rank {limit} is below the adapter's rank {rank} "
                                 f"({self.adapter}); vLLM would refuse the adapter")
        self.llm = None
        if build_engine:
            vllm_environment()
            from vllm import LLM
            self.llm = LLM(**self.engine_kwargs)

    def close(self):
        """Shut the engine down (its worker processes, the memory it holds) before another model loads."""
        import gc
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    @staticmethod
    def _adapter_base(path: str) -> str:
        with open(os.path.join(path, "adapter_config.json")) as f:
            return json.load(f)["base_model_name_or_path"]

    def requests(self, image_paths: list) -> list:
        """One vLLM request per image: the training prompt text (with its single image placeholder, which
        vLLM expands) and the image as `multi_modal_data` (opened now: call it per chunk)."""
        from PIL import Image
        text = self.prompt_text
        out = []
        for p in image_paths:
            with Image.open(p) as im:
                out.append({"prompt": text, "multi_modal_data": {"image": im.convert("RGB")}})
        return out

    def decoding(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
        """The `SamplingParams` fields of every request but its seed (the engine ignores the model's
        generation_config: `generation_config="vllm"`): sampling as the hf backend does it."""
        return {"backend": "vllm", "n": int(k), "temperature": float(temperature), "top_p": float(top_p), "top_k": 0,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                "max_tokens": int(max_new_tokens)}

    def sampling_params(self, *, k: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                        logprobs: bool = False):
        """A request's `SamplingParams`; `logprobs`: also each sampled token's log-prob (`logprobs=0`)."""
        from vllm import SamplingParams
        fields = self.decoding(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        fields.pop("backend")
        return SamplingParams(**fields, seed=int(seed), **({"logprobs": 0} if logprobs else {}))

    def lora_request(self):
        if self.adapter is None:
            return None
        from vllm.lora.request import LoRARequest
        return LoRARequest("policy", 1, self.adapter)

    def sample(self, image_paths: list, *, k: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int) -> list:
        n = len(image_paths)
        texts = []
        parity_images = -(-self.parity_samples // k)  # the first images, whose samples make the parity sample
        for start in range(0, n, self.batch_size):
            chunk = image_paths[start:start + self.batch_size]
            reqs = self.requests(chunk)  # only this chunk's images are open
            # one SamplingParams per request so each image's samples are pinned by its own seed
            params = [self.sampling_params(k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                           seed=request_seed(seed, start + i, n, k), logprobs=start + i < parity_images)
                      for i in range(len(reqs))]
            outs = self.llm.generate(reqs, params, lora_request=self.lora_request(), use_tqdm=False)
            texts += [[" ".join(c.text.split()) for c in o.outputs] for o in outs]
            for i, o in enumerate(outs[:max(0, parity_images - start)]):
                for c in o.outputs:
                    if len(self.parity_rows) < self.parity_samples:
                        self.parity_rows.append((chunk[i], list(o.prompt_token_ids), list(c.token_ids),
                                                 [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]))
            del reqs
        return texts


# the max_lora_rank values vLLM accepts (vllm.config.lora.MaxLoRARanks, vLLM 0.33)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(path: str) -> int:
    """The largest LoRA rank of a peft adapter folder (`r`, or a larger one of its `rank_pattern`)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        cfg = json.load(f)
    return max([int(cfg["r"])] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])


def vision_lora_weights(path: str) -> list:
    """The LoRA weights of a peft adapter folder that sit in the vision tower (`.visual.`; bare target names such
    as `gate_proj` also match the vision blocks' MLPs): vLLM serves them only with `enable_tower_connector_lora`."""
    from safetensors import safe_open
    weights = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        return []
    with safe_open(weights, "pt") as f:
        return sorted(k for k in f.keys() if ".visual." in k)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank` (vLLM rejects r > it)."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


def vllm_environment() -> None:
    """Process settings of every vLLM engine, set before vLLM is imported (explicit values are kept):
    VLLM_USE_FLASHINFER_SAMPLER=0 — vLLM enables the FlashInfer sampler by default and JIT-compiles it with nvcc
    at engine start whenever top_p < 1; a GPU install without nvcc (the image's -runtime base, many clusters)
    fails there (vllm issue #49497). The PyTorch sampler needs no compiler."""
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def make_sampler(onpolicy: dict, model_dir: str, vlm):
    """The sampler of config `negatives.onpolicy` (backend hf or vllm) for `model_dir`."""
    if onpolicy["backend"] == "hf":
        return HFSampler(model_dir, vlm, batch_size=onpolicy["batch_size"])
    if onpolicy["backend"] == "vllm":
        return VLLMSampler(model_dir, vlm, llm_kwargs=onpolicy["vllm"], batch_size=onpolicy["batch_size"],
                           parity_samples=onpolicy["parity_samples"])
    raise ValueError(f"unknown sampling backend {onpolicy['backend']!r}; allowed: hf, vllm")


def logprob_parity(model_dir: str, vlm, rows: list) -> dict:
    """vLLM–HF log-prob parity of sampled tokens: each row (image path, vLLM's prompt token ids, the sampled
    token ids, vLLM's log-prob of each) scored again by the HF model of `model_dir` through the trainer's own
    forward (`completion_logps`, the job's dtype and pixel bounds). Returns {mean_abs, max_abs, tokens, samples,
    prompts_equal (vLLM's expanded prompt is the trainer's), dtype}; nats per token."""
    import torch
    from .logprobs import completion_logps, make_encoder
    from .models import load_for_inference
    model, processor = load_for_inference(model_dir, vlm)
    enc = make_encoder(processor, vlm)
    diffs, prompts_equal = [], 0
    for path, prompt_ids, ids, vllm_lps in rows:
        if not ids:
            continue
        pixel_values, grids = enc.encode_images([path])
        prompts_equal += enc.prompt_ids(grids[0])[0] == list(prompt_ids)
        batch = enc.build_ids(pixel_values, grids, [(0, ids)]).to(model.device)
        with torch.no_grad():
            hf = completion_logps(model, batch, enc.image_token_id).token_logps.double().cpu()
        diffs.append((hf - torch.tensor(vllm_lps, dtype=torch.float64)).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    return {"mean_abs": float(d.mean()) if len(d) else None, "max_abs": float(d.max()) if len(d) else None,
            "tokens": int(len(d)), "samples": len(diffs), "prompts_equal": int(prompts_equal), "dtype": vlm.dtype}


def measure_parity(sampler, spec) -> dict | None:
    """`logprob_parity` of a vLLM sampler's parity sample, after its engine is shut down; None for the hf
    backend (it samples from the HF model itself) or when `parity_samples` is 0."""
    if not isinstance(sampler, VLLMSampler) or not sampler.parity_rows:
        return None
    sampler.close()
    return {**logprob_parity(spec.model, spec.vlm, sampler.parity_rows), "lora": sampler.adapter is not None}


SELECT_RULES = ("grounding", "relative", "absolute")


def select_rule(select: str, records: list) -> str:
    """The on-policy selection rule of config `negatives.onpolicy.select` for these images: `auto` is
    `grounding` when every image has an attribute record (`shapes`), else `relative`."""
    if select == "auto":
        return "grounding" if records and all(r.attributes is not None for r in records) else "relative"
    if select == "grounding":
        bare = [r.image_id for r in records if r.attributes is None]
        if bare:
            from .data import DataError
            raise DataError(f"negatives.onpolicy.select: grounding needs an attribute record per image (`shapes` "
                            f"data); image {bare[0]} has none — use select: relative or auto")
    return select


def score_samples(records: list, samples: list, scorer: CiderD, select: str = "absolute", threshold: float = 1.0,
                  quantile: float = 0.5) -> list:
    """Per image: every sample with its CIDEr-D, whether it equals a reference, and whether it is kept as a
    negative (docs/method.md § Negatives). A kept sample is not empty, not a reference and not a repeat of a
    sample kept before it, and it is wrong by the rule `select`:

    - `grounding` (`shapes`): the parse of the sample against the image's attribute record finds something the
      image contradicts (`grounding.contradiction`: a hallucinated or missing object, a wrong count or
      relation) — recorded as the sample's `kind`;
    - `relative` (any captions): it is among the ⌊quantile · K⌋ of the image's K samples with the lowest CIDEr-D
      (ties by sample order; the worse half by default), so a competent model still yields its worse samples;
    - `absolute`: its CIDEr-D is below `threshold` (1.0 = 100).
    """
    import numpy as np
    from .grounding import contradiction, ground
    if select not in SELECT_RULES:
        raise ValueError(f"unknown on-policy selection {select!r}; allowed: {', '.join(SELECT_RULES)}")
    out = []
    for rec, texts in zip(records, samples):
        refs = [simple_tokenize(c) for c in rec.captions]
        ref_set = set(refs)  # case, punctuation and spacing ignored: "A dog runs." is the reference "a dog runs"
        scores = [float(scorer.score_one(simple_tokenize(t), refs)) for t in texts]
        worse = set(np.argsort(scores, kind="stable")[:int(quantile * len(scores))].tolist())
        entries, kept_texts = [], set()
        for j, (t, score) in enumerate(zip(texts, scores)):
            norm = simple_tokenize(t)
            is_ref = norm in ref_set
            entry = {"text": t, "score": score, "is_reference": is_ref}
            if select == "grounding":
                entry["kind"] = contradiction(ground(t, rec.attributes))
                wrong = entry["kind"] is not None
            elif select == "relative":
                wrong = j in worse
            else:
                wrong = score < threshold
            entry["kept"] = bool(t.strip()) and not is_ref and wrong and norm not in kept_texts
            if entry["kept"]:
                kept_texts.add(norm)
            entries.append(entry)
        out.append({"image_id": rec.image_id, "samples": entries})
    return out


def run(spec, out: str, summary_out: str, threads: int = 0) -> dict:
    """`cwdpo sample-onpolicy` (a `SampleSpec`): K samples per Stage-2 image (and per probe image) from the
    spec's model, each scored by CIDEr-D with the document frequencies of the whole split; writes the
    samples JSONL and a summary."""
    from .data import load_records, stage_records, write_json, write_text
    from .models import set_threads
    set_threads(threads)
    o = spec.onpolicy
    finetune = load_records(spec.data)
    stage2 = stage_records(finetune, spec.data)
    probe = load_records(spec.probe_data)[: spec.probe_images] if spec.probe_data else []
    sampler = make_sampler(o, spec.model, spec.vlm)
    texts = sampler.sample([r.path for r in stage2 + probe], k=int(o["k"]), temperature=float(o["temperature"]),
                           top_p=float(o["top_p"]), max_new_tokens=int(o["max_new_tokens"]), seed=spec.seed)
    parity = measure_parity(sampler, spec)
    rule = {"select": select_rule(o["select"], stage2), "threshold": float(o["threshold"]),
            "quantile": float(o["quantile"])}
    scored = score_samples(stage2, texts[:len(stage2)], corpus_scorer(finetune), **rule)
    if probe:  # probe images: scored against the probe references (only read by the probe set)
        for entry in score_samples(probe, texts[len(stage2):], corpus_scorer(probe),
                                   **{**rule, "select": select_rule(o["select"], probe)}):
            scored.append({**entry, "split": "probe"})
    write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in scored))
    stage2_scored = [x for x in scored if x.get("split") != "probe"]
    n = sum(len(x["samples"]) for x in stage2_scored)
    kept = [s for x in stage2_scored for s in x["samples"] if s["kept"]]
    kinds: dict = {}
    for s in kept:
        if s.get("kind"):
            kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    summary = {"images": len(stage2_scored), "probe_images": len(probe), "samples": n,
               "kept": len(kept), "kept_by_kind": dict(sorted(kinds.items())),
               "images_with_a_kept_sample": sum(any(s["kept"] for s in x["samples"]) for x in stage2_scored),
               "equal_to_a_reference": sum(s["is_reference"] for x in stage2_scored for s in x["samples"]),
               "select": rule["select"], **({"threshold": o["threshold"]} if rule["select"] == "absolute" else {}),
               **({"quantile": o["quantile"]} if rule["select"] == "relative" else {}),
               "backend": o["backend"], "k": o["k"], "seed": spec.seed,
               "device": sampler.device,
               "decoding": sampler.decoding(k=int(o["k"]), temperature=float(o["temperature"]), top_p=float(o["top_p"]),
                                            max_new_tokens=int(o["max_new_tokens"])),
               "mean_score": sum(s["score"] for x in stage2_scored for s in x["samples"]) / max(1, n)}
    if parity is not None:
        summary["logprob_parity"] = parity
    write_json(summary_out, summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# the model's own wrong beams (negatives set `beams`)

def ground_beams(records: list, beams: list, scorer: CiderD) -> list:
    """Per image: each beam (best first) with its grounding, CIDEr-D and whether it is kept as a negative (it
    is wrong, not empty, not a reference and not a repeat of a higher beam) — the samples format of
    `read_samples`."""
    from .grounding import contradiction, ground
    out = []
    for rec, texts in zip(records, beams):
        refs = [simple_tokenize(c) for c in rec.captions]
        ref_set = {" ".join(c.lower().split()) for c in rec.captions}
        seen, entries = set(), []
        for rank, t in enumerate(texts):
            g = ground(t, rec.attributes)
            norm = " ".join(t.lower().split())
            kind = contradiction(g)
            entries.append({"text": t, "rank": rank, "score": float(scorer.score_one(simple_tokenize(t), refs)),
                            "hallucinated": g["hallucinated"], "missing": g["objects"] - g["recalled"],
                            "kind": kind, "is_reference": norm in ref_set,
                            "kept": bool(t.strip()) and kind is not None and norm not in ref_set and norm not in seen})
            seen.add(norm)
        out.append({"image_id": rec.image_id, "samples": entries})
    return out


def run_beams(spec, out: str, summary_out: str, threads: int = 0) -> dict:
    """`cwdpo beam-negatives` (a `BeamSpec`): the k beams of a size-k beam search of the spec's model on every
    Stage-2 image, grounded in the image's attribute record; the wrong ones are the negatives. Writes the
    beams JSONL and a summary of the counts (also printed to the job's log)."""
    import sys
    from .data import DataError, load_records, stage_records, write_json, write_text
    from .generation import generate_captions
    from .logprobs import make_encoder
    from .models import load_for_inference, set_threads
    set_threads(threads)
    finetune = load_records(spec.data)
    stage2 = stage_records(finetune, spec.data)
    bare = [r.image_id for r in stage2 if r.attributes is None]
    if bare:
        raise DataError(f"{spec.data.json}: image {bare[0]} has no attribute record; beam negatives are grounded in "
                        "the `shapes` attribute records")
    model, processor = load_for_inference(spec.model, spec.vlm)
    beams = generate_captions(model, make_encoder(processor, spec.vlm), [r.path for r in stage2], num_beams=spec.k,
                              num_return=spec.k, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size,
                              desc="beams")
    rows = ground_beams(stage2, beams, corpus_scorer(finetune))
    write_text(out, "".join(json.dumps(x, sort_keys=True) + "\n" for x in rows))
    entries = [e for x in rows for e in x["samples"]]
    summary = {"images": len(rows), "k": spec.k, "beams": len(entries),
               "wrong": sum(e["kind"] is not None for e in entries),
               "hallucinated": sum(e["hallucinated"] > 0 for e in entries),
               "missing": sum(e["missing"] > 0 for e in entries),
               "kept": sum(e["kept"] for e in entries),
               "equal_to_a_reference": sum(e["is_reference"] for e in entries),
               "images_with_a_kept_beam": sum(any(e["kept"] for e in x["samples"]) for x in rows)}
    write_json(summary_out, summary)
    print(f"[cwdpo beam-negatives] {summary['beams']} beams of {summary['images']} images: {summary['wrong']} wrong "
          f"({summary['hallucinated']} with a hallucinated object, {summary['missing']} missing one), "
          f"{summary['kept']} kept as negatives", file=sys.stderr)
    return summary
