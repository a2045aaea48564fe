#!/usr/bin/env python
"""GPU smoke test and throughput probe for the cwdpo stack: a randomly initialised Qwen2.5-VL model.

Builds `Qwen2_5_VLForConditionalGeneration` straight from a `Qwen2_5_VLConfig` (no download; sizes from a
preset — the published configs of Qwen2.5-VL-3B/7B-Instruct, or a published Qwen2.5 language model behind
Qwen2.5-VL's vision tower, from cwdpo/estimate.py — each overridable by a flag), trains it a few AdamW
steps on synthetic image+text batches, then generates with HF `generate`, and prints ONE JSON line with
the measurements:

  params, params_text, params_vision        parameter counts (vision = the ViT tower and its merger)
  train_tokens_per_s                        language-model tokens (image + text) per second, timed steps
  mfu                                       6 * params * train_tokens_per_s / peak FLOP/s
  mfu_split                                 (6 * params_text * LM tokens + 6 * params_vision * ViT patches)
                                            per second / peak: counts the vision tower at its own length
  gen_tokens_per_s                          new tokens per second of greedy `generate` (batch x new tokens)
  losses, peak_mem_gb, step_s, ...          per step losses (must be finite), CUDA peak memory

Synthetic batch: each sample is one image of --image-size pixels (448 -> 32x32 patches of 14 px -> 256
image tokens after the 2x2 merge; pixel_values of shape (1024 * batch, 3*2*14*14)), between
<|vision_start|> and <|vision_end|>, plus --text-tokens random text tokens (the loss covers the text).

Precision: `amp` (default on GPU: fp32 master weights, bf16 autocast), `bf16` (weights and AdamW in
bf16), `fp32`. `--deepspeed workflow/deepspeed/zero2.json` (or zero3.json) wraps model and AdamW in a
DeepSpeed engine, single process, with the "auto" values filled the way the HF Trainer does.

Examples:
  python scripts/gpu_smoke.py                                  # preset 3b (Qwen2.5-VL-3B's published config)
  python scripts/gpu_smoke.py --preset 1b --batch-size 8 --steps 20
  python scripts/gpu_smoke.py --deepspeed workflow/deepspeed/zero3.json
  python scripts/gpu_smoke.py --preset tiny --device cpu       # seconds, no GPU (the CI test)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

try:  # the published configs (no download); the script also runs from a checkout without an install
    from cwdpo.estimate import KNOWN, KNOWN_LM, QWEN_VISION
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from cwdpo.estimate import KNOWN, KNOWN_LM, QWEN_VISION


def published(lm: dict, vision_depth: int | None = None, **run) -> dict:
    """A preset from a published config: the language model's sizes, Qwen2.5-VL's vision tower (optionally
    fewer blocks), and the run's batch settings."""
    depth = vision_depth or QWEN_VISION["depth"]
    return dict(hidden=lm["hidden_size"], layers=lm["num_hidden_layers"], heads=lm["num_attention_heads"],
                kv_heads=lm["num_key_value_heads"], intermediate=lm["intermediate_size"], vocab=lm["vocab_size"],
                tie=int(lm["tie_word_embeddings"]), vision_depth=depth, vision_hidden=QWEN_VISION["hidden_size"],
                vision_heads=QWEN_VISION["num_heads"], vision_intermediate=QWEN_VISION["intermediate_size"], **run)


RUN = dict(image_size=448, text_tokens=40, batch_size=8, gen_tokens=32)
# sizes of the language model and the vision tower; every key is also a command-line flag
PRESETS = {
    # a few MB: for CPU tests of the script itself
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, tie=1,
                 vision_depth=2, vision_hidden=32, vision_heads=2, vision_intermediate=64,
                 image_size=112, text_tokens=16, batch_size=2, gen_tokens=8),
    # ~0.83B: Qwen2.5-0.5B-Instruct's language model behind 16 blocks of Qwen2.5-VL's vision tower
    "0.5b": published(KNOWN_LM["Qwen/Qwen2.5-0.5B-Instruct"], vision_depth=16, **RUN),
    # ~2.2B: Qwen2.5-1.5B-Instruct's language model behind Qwen2.5-VL's whole vision tower
    "1b": published(KNOWN_LM["Qwen/Qwen2.5-1.5B-Instruct"], **RUN),
    # ~3.75B: Qwen2.5-VL-3B-Instruct as published (36 layers, 2048 wide, tied embeddings, 32-block tower)
    "3b": published(KNOWN["Qwen/Qwen2.5-VL-3B-Instruct"], **RUN),
    # ~8.3B: Qwen2.5-VL-7B-Instruct as published (bf16 AdamW needs ~130 GB: an 80 GB GPU needs --deepspeed)
    "7b": published(KNOWN["Qwen/Qwen2.5-VL-7B-Instruct"], **{**RUN, "batch_size": 4}),
}
PATCH, MERGE, TEMPORAL = 14, 2, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="3b")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: the current CUDA device when available)")
    p.add_argument("--precision", choices=["amp", "bf16", "fp32"], default=None,
                   help="default: amp on GPU, fp32 on CPU")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernels)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="peak dense bf16 TFLOP/s of the device (H100 SXM and H200: 989)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (workflow/deepspeed/zero2.json, ...)")
    p.add_argument("--no-generate", action="store_true", help="skip the generate measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    for key, value in PRESETS["3b"].items():  # size flags: default None = take the preset's value
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image_size % (PATCH * MERGE):
        p.error(f"--image-size must be a multiple of {PATCH * MERGE}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must be divisible by --heads, and --heads by --kv-heads")
    return args


def build_model(args, torch):
    """A random-weight Qwen2.5-VL of the requested size, with token ids that fit its vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    head_dim = args.hidden // args.heads
    half = head_dim // 2  # mRoPE sections (temporal, height, width) must sum to head_dim / 2
    t_sec = max(1, half // 4)
    h_sec = (half - t_sec) // 2
    mrope = [t_sec, h_sec, half - t_sec - h_sec]
    if args.vocab >= 151936:  # Qwen2.5-VL's own special token ids
        ids = dict(pad=151643, eos=151645, vision_start=151652, vision_end=151653, image=151655, video=151656)
    else:  # the last ids of a small vocabulary
        v = args.vocab
        ids = dict(pad=v - 6, eos=v - 5, vision_start=v - 4, vision_end=v - 3, image=v - 2, video=v - 1)
    fullatt = sorted({min(args.vision_depth - 1, i) for i in range(args.vision_depth // 4 - 1, args.vision_depth, 8)}
                     or {args.vision_depth - 1})
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=ids["pad"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                         tie_word_embeddings=bool(args.tie)),
        vision_config=dict(depth=args.vision_depth, hidden_size=args.vision_hidden,
                           intermediate_size=args.vision_intermediate, num_heads=args.vision_heads,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           window_size=112, out_hidden_size=args.hidden, fullatt_block_indexes=fullatt),
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=bool(args.tie))
    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["eos"]
    model.generation_config.pad_token_id = ids["pad"]
    return model, ids


def synthetic_batch(args, ids, torch, device, dtype, with_text=True):
    """input_ids, attention_mask, labels, pixel_values, image_grid_thw of --batch-size samples (one image
    each); `with_text=False` gives the generation prompt (text before the image only)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    grid = args.image_size // PATCH                       # patches per side
    n_patches = grid * grid                              # ViT sequence length per image
    n_image_tokens = n_patches // (MERGE * MERGE)        # LM tokens per image
    prefix = 8
    text_hi = min(args.vocab - 8, 150000)
    rows = []
    for _ in range(args.batch_size):
        pre = torch.randint(0, text_hi, (prefix,), generator=g)
        post = torch.randint(0, text_hi, (max(args.text_tokens - prefix, 1) if with_text else 0,), generator=g)
        rows.append(torch.cat([pre, torch.tensor([ids["vision_start"]] + [ids["image"]] * n_image_tokens
                                                 + [ids["vision_end"]]), post]))
    input_ids = torch.stack(rows).to(device)
    labels = input_ids.clone()
    labels[:, :prefix + n_image_tokens + 2] = -100        # loss on the text after the image
    pixel_values = torch.randn(args.batch_size * n_patches, 3 * TEMPORAL * PATCH * PATCH, generator=g)
    grid_thw = torch.tensor([[1, grid, grid]] * args.batch_size)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels,
                pixel_values=pixel_values.to(device=device, dtype=dtype), image_grid_thw=grid_thw.to(device))


def count_params(model, part):
    """Parameters of `part` ('all', 'vision'); ZeRO-3 partitioned parameters count by their full size."""
    total = 0
    for name, p in model.named_parameters():
        if part == "vision" and ".visual." not in f".{name}":
            continue
        total += int(getattr(p, "ds_numel", 0) or p.numel())
    return total


def deepspeed_config(path, args, precision):
    """The JSON config with the HF Trainer's "auto" values filled in (one process, no accumulation)."""
    with open(path) as f:
        cfg = json.load(f)
    h = args.hidden
    fill = {"train_micro_batch_size_per_gpu": args.batch_size, "train_batch_size": args.batch_size,
            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    for key, on in (("bf16", precision in ("amp", "bf16")), ("fp16", False)):
        if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = on
    zero = cfg.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
    left = [k for k, v in cfg.items() if v == "auto"]
    if left:
        raise SystemExit(f"{path}: 'auto' values this script cannot fill: {left}")
    return cfg


def setup_device(name, torch):
    """The device to run on, with an index: `torch.cuda.set_device` refuses `cuda` without one ("Expected a
    torch.device with a specified index"), which is what the defaults gave."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    device = setup_device(args.device, torch)
    cuda = device.type == "cuda"
    precision = args.precision or ("amp" if cuda else "fp32")
    if device.type == "cpu" and os.environ.get("OMP_NUM_THREADS") is None:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    with torch.device(device) if cuda else contextlib.nullcontext():  # random init on the GPU: seconds, not minutes
        model, ids = build_model(args, torch)
    build_s = time.perf_counter() - t0
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    n_all, n_vis = count_params(model, "all"), count_params(model, "vision")
    data_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    batch = synthetic_batch(args, ids, torch, device, data_dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if cuda else {}))
    engine = None
    if args.deepspeed:
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29517")):
            os.environ.setdefault(key, value)
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                 config=deepspeed_config(args.deepspeed, args, precision))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "amp")

    def step():
        if engine is not None:
            with autocast:
                loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            return loss
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    losses = []
    for _ in range(args.warmup):
        losses.append(float(step().detach().float()))
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        losses.append(float(step().detach().float()))
    sync()
    train_s = time.perf_counter() - t
    lm_tokens = batch["input_ids"].numel() * args.steps
    vit_patches = batch["pixel_values"].shape[0] * args.steps
    tokens_per_s = lm_tokens / train_s
    peak = args.peak_tflops * 1e12
    flops_split = 6 * (n_all - n_vis) * lm_tokens + 6 * n_vis * vit_patches
    result = {
        "preset": args.preset, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": precision, "deepspeed": args.deepspeed,
        "zero_stage": (engine.zero_optimization_stage() if engine is not None else None),
        "params": n_all, "params_text": n_all - n_vis, "params_vision": n_vis,
        "batch_size": args.batch_size, "seq_len": int(batch["input_ids"].shape[1]),
        "image_tokens": (args.image_size // PATCH) ** 2 // (MERGE * MERGE),
        "vit_patches_per_image": (args.image_size // PATCH) ** 2,
        "steps": args.steps, "warmup": args.warmup, "build_s": round(build_s, 3),
        "step_s": train_s / max(args.steps, 1), "train_tokens_per_s": tokens_per_s,
        "mfu": 6 * n_all * tokens_per_s / peak, "mfu_split": flops_split / train_s / peak,
        "peak_tflops": args.peak_tflops, "losses": losses,
        "loss_finite": all(math.isfinite(v) for v in losses),
        "peak_mem_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if cuda else None,
        "torch": torch.__version__,
    }
    if not args.no_generate:
        gen_model = engine.module if engine is not None else model
        gen_model.eval()
        prompt = synthetic_batch(args, ids, torch, device, data_dtype, with_text=False)
        prompt.pop("labels")
        with torch.no_grad(), autocast:
            gen_model.generate(**prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            sync()
            t = time.perf_counter()
            out = gen_model.generate(**prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                     do_sample=False)
            sync()
        gen_s = time.perf_counter() - t
        new = (out.shape[1] - prompt["input_ids"].shape[1]) * out.shape[0]
        result.update(gen_new_tokens=int(new), gen_s=gen_s, gen_tokens_per_s=new / gen_s)
    import transformers
    result["transformers"] = transformers.__version__
    line = json.dumps(result)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    if not result["loss_finite"]:
        print("non-finite loss", file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
