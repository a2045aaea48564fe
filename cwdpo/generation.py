"""Generation with transformers `generate`: left-padded prompt batches of one image each, beam search or
seeded sampling, decoded captions. Evaluation, on-policy sampling (hf backend), the validation probes and
the MCQ "generate" mode all decode through here.

Decoding is explicit: `decoding_settings` names every setting, and `generate` runs with a generation
config made of them and transformers' neutral defaults only — a hub model's own `generation_config.json`
(Qwen2.5-VL-Instruct ships top_k 1, top_p 0.001, repetition_penalty 1.05) cannot leak in, so the hf and vLLM
backends decode alike. The settings are recorded beside the captions and samples.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm import tqdm

from .logprobs import Encoder


def prompt_batch(encoders, images: list) -> dict:
    """Left-padded generation inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values, grid) of
    one image per row; `encoders` is one Encoder for every row or a list with each row's own (its prompt).
    Text input (the Encoder's `scenes`): input_ids and attention_mask only, each row's scene text in its
    prompt."""
    rows = encoders if isinstance(encoders, list) else [encoders] * len(images)
    first = rows[0]
    pixel_values, grids = first.encode_images(images)
    if first.scenes is not None:  # text input: each row's scene text is in its prompt, no pixels
        prompts = [enc.scene_prompt_ids(im)[0] for enc, im in zip(rows, images)]
    else:
        prompts = [enc.prompt_ids(g)[0] for enc, g in zip(rows, grids)]
    length = max(len(p) for p in prompts)
    n = len(prompts)
    input_ids = torch.full((n, length), first.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p):] = torch.tensor(p)
        attention_mask[i, length - len(p):] = 1
    if first.scenes is not None:
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    mm = (input_ids == first.image_token_id).to(torch.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
            "pixel_values": pixel_values, "image_grid_thw": grids}


def decode(encoder: Encoder, sequences: torch.Tensor, prompt_len: int) -> list:
    texts = encoder.tokenizer.batch_decode(sequences[:, prompt_len:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts]


def decoding_settings(*, num_beams: int = 3, num_return: int = 1, max_new_tokens: int = 40, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """Every decoding setting of a `generate_captions` call (recorded beside its output): beam search, or
    pure temperature / top-p sampling — no top-k, no repetition or length penalty, no n-gram blocking."""
    settings = dict(max_new_tokens=int(max_new_tokens), num_return_sequences=int(num_return), repetition_penalty=1.0,
                    no_repeat_ngram_size=0, length_penalty=1.0, min_new_tokens=0)
    if do_sample:
        settings.update(do_sample=True, num_beams=1, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        settings.update(do_sample=False, num_beams=max(int(num_beams), int(num_return)), early_stopping=False)
    return settings


@contextlib.contextmanager
def neutral_generation_config(model, encoder: Encoder):
    """`model.generation_config` replaced, while generating, by one that holds only the end/pad tokens:
    `generate` fills settings we leave unset from it, and a hub model's own (top_k, repetition_penalty,
    ...) must not be among them."""
    from transformers import GenerationConfig
    from .models import unwrap
    core = unwrap(model)
    saved = core.generation_config
    core.generation_config = GenerationConfig(eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id,
                                              bos_token_id=saved.bos_token_id)
    try:
        yield
    finally:
        core.generation_config = saved


@torch.no_grad()
def generate_captions(model, encoder: Encoder, image_paths: list, *, num_beams: int = 3, num_return: int = 1,
                      max_new_tokens: int = 40, batch_size: int = 64, do_sample: bool = False,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                      desc: str = "generate") -> list:
    """Captions for `image_paths`: a list (one per image) of `num_return` strings, best first.

    Beam search (`num_beams`, no sampling) by default; with `do_sample` the `num_return` samples use
    temperature/top-p and the generator is seeded per batch from `seed` (reproducible on CPU). Every
    setting is `decoding_settings`; nothing comes from the model's generation_config.
    """
    model.eval()
    out = []
    settings = decoding_settings(num_beams=num_beams, num_return=num_return, max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p)
    with neutral_generation_config(model, encoder):
        for s in tqdm(range(0, len(image_paths), batch_size), desc=desc, mininterval=2.0):
            chunk = image_paths[s:s + batch_size]
            inputs = prompt_batch(encoder, chunk)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            if do_sample and seed is not None:
                torch.manual_seed(int(seed) * 100_003 + s)
            seqs = model.generate(**inputs, **settings, eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id)
            texts = decode(encoder, seqs, inputs["input_ids"].shape[1])
            for i in range(len(chunk)):
                out.append(texts[i * num_return:(i + 1) * num_return])
    return out
