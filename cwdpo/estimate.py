"""`cwdpo estimate`: tokens, FLOPs and GPU-hours of a config's whole DAG — before the bill.

Per rule and in total: tokens processed (image + prompt + caption tokens, from the dataset and processor
settings), FLOPs and GPU-hours at an assumed MFU. The usual transformer approximations (Kaplan et al.
2020): training ≈ 6·N FLOPs per token for a full finetune, ≈ 4·N with LoRA (no weight gradients of the
frozen matrices), forward-only ≈ 2·N; N = parameters of the model (vision tower included, counted on
PyTorch's meta device from the config — no weights are downloaded). A rough figure on purpose: it ignores
attention's quadratic term (small at ~400-token sequences), padding and probe passes.
No network; torch only for the meta-device parameter count.
"""
from __future__ import annotations

import json
import os

# A question–answer turn of the `shapes` generator (data.shapes.qa), measured on its train-split turns with the
# tiny tokenizer: the question (the MCQ's four lettered options and answer instruction, or an existence
# question) is this many tokens longer than the caption prompt "Describe the image.", the answer
# ("<letter>. <option>", "Yes", "No") this many tokens long before <|im_end|> and the newline.
QA_EXTRA_PROMPT_TOKENS = 21.3
QA_ANSWER_TOKENS = 2.2

# Published Qwen2.5-VL configurations (config.json of the hub repos), so the paper config is priced
# without downloading anything. A local folder or a tiny config is read instead when given.
KNOWN = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                                        num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                                        tie_word_embeddings=True, out_hidden_size=2048),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                        tie_word_embeddings=False, out_hidden_size=3584),
    "Qwen/Qwen2.5-VL-32B-Instruct": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                         num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                         tie_word_embeddings=False, out_hidden_size=5120),
    "Qwen/Qwen2.5-VL-72B-Instruct": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                         num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                         tie_word_embeddings=False, out_hidden_size=8192),
}
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31])
# Published configurations of the Qwen2.5 language models below the smallest Qwen2.5-VL (config.json of the
# hub repos): scripts/gpu_smoke.py's smaller presets put Qwen2.5-VL's vision tower in front of them.
KNOWN_LM = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                       tie_word_embeddings=True),
}
H100_BF16_DENSE = 989e12


def count_parameters(text: dict, vision: dict) -> dict:
    """Parameters of a Qwen2.5-VL model with these text/vision sizes, counted on the meta device."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from .models import mrope_section
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
                         intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
                         num_attention_heads=text["num_attention_heads"],
                         num_key_value_heads=text["num_key_value_heads"],
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": mrope_section(text["hidden_size"]
                                                                         // text["num_attention_heads"])},
                         tie_word_embeddings=text["tie_word_embeddings"], bos_token_id=None, eos_token_id=None,
                         pad_token_id=None),
        vision_config=dict(vision, out_hidden_size=text["hidden_size"]),
        tie_word_embeddings=text["tie_word_embeddings"])
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    total = sum(p.numel() for p in model.parameters())
    vis = sum(p.numel() for p in model.model.visual.parameters())
    return {"total": total, "vision": vis, "text": total - vis}


def model_sizes(config: dict) -> dict:
    """(parameters, where the sizes came from) for the config's model."""
    m = config["model"]
    src = m["source"]
    if src == "tiny":
        from .models import TINY_WINDOW
        t = m["tiny"]
        text = dict(hidden_size=t["hidden_size"], num_hidden_layers=t["num_hidden_layers"],
                    num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                    intermediate_size=t["intermediate_size"], vocab_size=t["vocab_size"], tie_word_embeddings=True)
        vision = dict(depth=t["vision_depth"], hidden_size=t["vision_hidden_size"],
                      intermediate_size=t["vision_intermediate_size"], num_heads=t["vision_num_heads"], patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=TINY_WINDOW,
                      fullatt_block_indexes=list(range(t["vision_depth"])))
        return {**count_parameters(text, vision), "source": "config model.tiny (vocab_size as requested; the trained "
                                                            "tokenizer may be smaller)"}
    local = os.path.join(os.path.expanduser(src), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            c = json.load(f)
        tc = c.get("text_config", c)
        text = dict(hidden_size=tc["hidden_size"], num_hidden_layers=tc["num_hidden_layers"],
                    num_attention_heads=tc["num_attention_heads"], num_key_value_heads=tc["num_key_value_heads"],
                    intermediate_size=tc["intermediate_size"], vocab_size=tc["vocab_size"],
                    tie_word_embeddings=c.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
        vc = c["vision_config"]
        vision = {k: vc[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size",
                                     "spatial_merge_size", "temporal_patch_size", "window_size",
                                     "fullatt_block_indexes") if k in vc}
        return {**count_parameters(text, vision), "source": local}
    if src in KNOWN:
        text = {k: v for k, v in KNOWN[src].items() if k != "out_hidden_size"}
        return {**count_parameters(text, QWEN_VISION), "source": f"published config of {src}"}
    raise ValueError(f"model.source {src!r}: not tiny, not a local folder with config.json, and not one of "
                     f"{', '.join(KNOWN)}")


def image_tokens(height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    """Qwen2-VL image tokens: the processor's smart_resize to multiples of 28, then 2x2 patches merged."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # no torchvision needed
    h, w = smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // 28) * (w // 28)


def dataset_stats(config: dict, image_hw=None) -> dict:
    """Images per role and mean caption words, from the config (shapes) or the Karpathy file when present."""
    d = config["data"]
    if d["source"] == "shapes":
        sp = d["shapes"]["splits"]
        roles = {role: sum(sp.get(s, 0) for s in splits) for role, splits in d["splits"].items()}
        size = d["shapes"]["image_size"]
        return {"images": roles, "caption_words": 11.8, "captions_per_image": 5, "image_hw": (size, size),
                "source": "config data.shapes (11.8 words per caption measured on the generator)"}
    path = d["karpathy"]["json"]
    if os.path.isfile(path):
        with open(path) as f:
            imgs = json.load(f)["images"]
        roles = {role: sum(1 for i in imgs if i.get("split") in splits) for role, splits in d["splits"].items()}
        words = [len(s.get("tokens") or s["raw"].split()) for i in imgs[:5000] for s in i["sentences"]]
        caps = [len(i["sentences"]) for i in imgs[:5000]]
        if sum(roles.values()):
            return {"images": roles, "caption_words": sum(words) / max(1, len(words)),
                    "captions_per_image": sum(caps) / max(1, len(caps)), "image_hw": image_hw or (480, 640),
                    "source": path}
    # Karpathy COCO split sizes (113,287 train+restval, 5,000 val, 5,000 test; 10.5 words per caption)
    coco = {"train": 82783, "restval": 30504, "val": 5000, "test": 5000}
    roles = {role: sum(coco.get(s, 0) for s in splits) for role, splits in d["splits"].items()}
    return {"images": roles, "caption_words": 10.5, "captions_per_image": 5, "image_hw": image_hw or (480, 640),
            "source": "COCO Karpathy split sizes (the file is not present here)"}


def estimate(config: dict, mfu: float = 0.40, peak_flops: float = H100_BF16_DENSE, image_hw=None) -> dict:
    """Tokens, FLOPs and GPU-hours of every rule of the DAG of `config` (a validated config dict), its variants'
    (config `variants`) included: their rules are named "<rule> [<variant>]"."""
    from .plan import Plan
    plan = Plan(config)
    est = _estimate_plan(plan, mfu, peak_flops, image_hw)
    for name, variant in plan.variant_plans().items():
        est["rules"] += [{**r, "rule": f"{r['rule']} [{name}]"}
                         for r in _estimate_plan(variant, mfu, peak_flops, image_hw)["rules"]]
    est["total"] = {k: sum(r[k] for r in est["rules"]) for k in ("jobs", "tokens", "flops", "gpu_hours")}
    return est


def _estimate_plan(plan, mfu: float, peak_flops: float, image_hw=None) -> dict:
    """`estimate` of one experiment tree (the experiment, or one of its variants)."""
    from .config import stage1_recipe, stage2_recipe
    from .paths import ModelKey
    config = plan.c
    params = model_sizes(config)
    n = params["total"]
    m = config["model"]
    lora = m["lora"] is not None
    ds = dataset_stats(config, image_hw)
    hh, ww = ds["image_hw"]
    img_tok = image_tokens(hh, ww, m["min_pixels"], m["max_pixels"])
    prompt_text_tokens = 16 if m["source"] == "tiny" else 30  # chat template + prompt text (+ system prompt)
    prefix = img_tok + prompt_text_tokens
    cap_tokens = ds["caption_words"] * (1.0 if m["source"] == "tiny" else 1.3) + 2  # + <|im_end|>\n
    cap_tokens = min(cap_tokens, m["max_response_tokens"])
    turn_tokens = QA_ANSWER_TOKENS + 2
    turn = prefix + QA_EXTRA_PROMPT_TOKENS + turn_tokens  # one turn: its own prompt, never a shared prefix
    shared = config["train"]["forward"] == "shared_prefix"
    train_mult = 4 if lora else 6
    f1 = config["stage1"]["fraction"]
    n_finetune = ds["images"].get("finetune", 0)
    n_stage2_images = n_finetune - int(round(f1 * n_finetune))
    rows = []

    def add(rule, jobs, tokens_per_job, flops_per_token, note):
        tokens = jobs * tokens_per_job
        flops = tokens * flops_per_token
        rows.append({"rule": rule, "jobs": jobs, "tokens": tokens, "flops": flops,
                     "gpu_hours": flops / (peak_flops * mfu) / 3600.0, "note": note})

    def examples(hp):
        gpus = max(1, plan.gpus("train"))
        return int(hp["steps"]) * int(hp["batch_size"]) * int(hp["grad_accum"]) * gpus

    keys = plan.eval_keys()
    if any(ModelKey.parse(k).kind == "stage2" and plan.calibrated(ModelKey.parse(k).stage2) for k in keys):
        # the calibration sweep those runs wait for (trained and evaluated, whether a table shows it or not)
        for row in config["tables"][config["stage2"]["calibration"]]["rows"]:
            keys += [k for k in plan.row_keys(row) if k not in keys]
    parsed = [ModelKey.parse(k) for k in keys]
    stage1_runs = sorted({(k.stage1, k.seed) for k in parsed if k.kind != "base" and k.stage1 != "base"})
    stage2_runs = sorted({(k.stage1, k.seed, k.stage2) for k in parsed if k.kind == "stage2"})
    starts = sorted({(s1, s) for s1, s, _ in stage2_runs})
    negsets = sorted({(s1, s, plan.stage2_negset(s2)) for s1, s, s2 in stage2_runs})

    def mixed(per_caption, per_turn, share):
        """Tokens per example when a share of the examples are question–answer turns."""
        return (1 - share) * per_caption + share * per_turn

    if plan.tiny and config["pretrain"]["enabled"]:
        hp = config["pretrain"]
        tokens = hp["steps"] * hp["batch_size"] * mixed(prefix + cap_tokens, turn, hp["qa_share"])
        how = "full finetune, 6N/token" + (f"; {hp['qa_share']:.0%} question–answer turns" if hp["qa_share"] else "")
        add("pretrain", 1, tokens, 6 * n, how)
        if plan.stability_seeds():  # the same pretraining from other seeds, then a captioning of the test split
            add("stability", len(plan.stability_seeds()), tokens, 6 * n, "the pretraining again per seed, 6N/token")
    for recipe in sorted({s1 for s1, _ in stage1_runs}):
        r = stage1_recipe(config, recipe)
        jobs = sum(1 for s1, _ in stage1_runs if s1 == recipe)
        frac = float(r["penalty_fraction"]) if r["method"] == "sft_c" else 0.0  # SFT-C: a negative per example
        per = mixed(prefix + (1 + frac) * cap_tokens if shared else (1 + frac) * (prefix + cap_tokens),
                    turn + frac * (turn_tokens if shared else turn), r["qa_share"])
        add(f"stage1 ({recipe})", jobs, examples(r) * per, train_mult * n, f"{'LoRA 4N' if lora else '6N'}/token")
    o = config["negatives"]["onpolicy"]
    n_probe = min(ds["images"].get("probe", 0), config["probes"]["images"]) if config["probes"]["enabled"] else 0
    sampled = [(s1, s) for s1, s in starts if any(plan.needs_onpolicy(ns) for a, b, ns in negsets if (a, b) == (s1, s))]
    if o["enabled"] and sampled:
        per = (n_stage2_images + n_probe) * (prefix + o["k"] * cap_tokens)
        add("sample_onpolicy", len(sampled), per, 2 * n,
            f"prefill + {o['k']} samples of ~{cap_tokens:.0f} tokens, 2N/token")
    beamed = [(s1, s) for s1, s in starts if any(plan.needs_beams(ns) for a, b, ns in negsets if (a, b) == (s1, s))]
    if beamed:
        k = config["negatives"]["beams"]["k"]
        add("beam_negatives", len(beamed), n_stage2_images * (prefix + k * cap_tokens), 2 * n,
            f"prefill + a size-{k} beam search of ~{cap_tokens:.0f} tokens, 2N/token")
    pairs = n_stage2_images * config["negatives"]["pairs_per_image"]
    add("ref_logps", len(negsets), pairs * 2 * (prefix + cap_tokens), 2 * n, "forward only, chosen + rejected rows")
    for s2 in sorted({s2 for _, _, s2 in stage2_runs}):
        r = stage2_recipe(config, s2)
        jobs = sum(1 for _, _, x in stage2_runs if x == s2)
        per = prefix + 2 * cap_tokens if shared else 2 * (prefix + cap_tokens)
        add(f"stage2 ({s2})", jobs, examples(r) * per, train_mult * n, f"{'LoRA 4N' if lora else '6N'}/token")
    e = config["evaluate"]
    n_test = ds["images"].get("test", 0)
    beams = e["num_beams"] + (e["topk_beams"] if e["topk_beams"] > 1 else 0)
    heldout = n_test * 2
    per_eval = n_test * (2 * prefix + beams * cap_tokens) + 2 * n_test * (prefix + cap_tokens) + \
        heldout * 2 * (prefix + cap_tokens)
    add("evaluate", len(keys), per_eval, 2 * n,
        f"beam {e['num_beams']} + top-{e['topk_beams']} beams, teacher-forced test (policy + reference), "
        "held-out pairs")
    total = {k: sum(r[k] for r in rows) for k in ("jobs", "tokens", "flops", "gpu_hours")}
    return {"experiment": config["experiment"], "parameters": params, "lora": lora, "image_tokens": img_tok,
            "prefix_tokens": prefix, "caption_tokens": cap_tokens, "dataset": ds, "mfu": mfu, "peak_flops": peak_flops,
            "rules": rows, "total": total, "shared_prefix": shared}


def render(est: dict) -> str:
    from tabulate import tabulate
    p = est["parameters"]
    head = (f"cwdpo estimate — experiment {est['experiment']}: {p['total'] / 1e9:.3f} B parameters "
            f"({p['vision'] / 1e6:.0f} M vision; {p['source']}), {'LoRA' if est['lora'] else 'full finetune'}; "
            f"{est['image_tokens']} image tokens "
            f"({est['dataset']['image_hw'][0]}×{est['dataset']['image_hw'][1]} images), "
            f"{est['prefix_tokens']} prefix + {est['caption_tokens']:.1f} caption tokens per sequence; "
            f"MFU {est['mfu']:.0%} of {est['peak_flops'] / 1e12:.0f} TFLOP/s; data: {est['dataset']['source']}")
    body = [[r["rule"], r["jobs"], f"{r['tokens']:.3g}", f"{r['flops']:.3g}", f"{r['gpu_hours']:.4g}", r["note"]]
            for r in est["rules"]]
    t = est["total"]
    body.append(["total", t["jobs"], f"{t['tokens']:.3g}", f"{t['flops']:.3g}", f"{t['gpu_hours']:.4g}", ""])
    return head + "\n\n" + tabulate(body, headers=["rule", "jobs", "tokens", "FLOPs", "GPU-hours", "how"],
                                    tablefmt="github") + "\n"
