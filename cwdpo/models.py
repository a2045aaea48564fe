"""Loading a Qwen2.5-VL-architecture VLM + processor, LoRA via peft, and building the tiny model offline.

The tiny model is the real `Qwen2_5_VLForConditionalGeneration` class at small sizes with a byte-level
BPE tokenizer trained offline on the training captions, so every line that trains, samples and scores
the 72B model also runs on a CPU. Models are saved with `save_pretrained` (safetensors) and reload with
`AutoModelForImageTextToText` / `AutoProcessor` under `HF_HUB_OFFLINE=1`.

A model folder holds either full weights (`model.safetensors*`) or a peft LoRA adapter
(`adapter_config.json`) on top of the configured base model; see `load_model`.
"""
from __future__ import annotations

import json
import os

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL's chat template, minus the injected default system prompt (it would triple the tiny
# model's sequence length). A system turn given explicitly is still rendered.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The chat template of the published Qwen2.5-VL-*-Instruct models (their chat_template.json): a default
# system turn, then the user turn with its image. Models that stand in for a hub model (the CPU rehearsal of
# config/qwen3b.yaml, scripts/rehearsal_setup.py) carry it, so the hub path renders what Qwen renders.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SHIM_REGISTERED = False
# the tiny vision tower attends over windows of 112 px, i.e. one window per 112 x 112 image
TINY_WINDOW = 112


def has_torchvision() -> bool:
    """True when torchvision imports (False on CPU machines where only a CUDA wheel exists)."""
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:
        return False


def processor_class():
    """The processor class to build and register: the stock one, or the image-only shim without torchvision.

    transformers 5.x validates a video processor inside `Qwen2_5_VLProcessor.__init__`, and every video
    processor needs torchvision. The shim drops `video_processor` from the signature (which is how
    transformers discovers sub-processors) and is registered for `Qwen2_5_VLConfig` with AutoProcessor.
    """
    global _SHIM_REGISTERED
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    if has_torchvision():
        return Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2_5_VLImageOnlyProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor for images only (no video processor, no torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    if not _SHIM_REGISTERED:
        AutoProcessor.register(Qwen2_5_VLConfig, Qwen2_5_VLImageOnlyProcessor, exist_ok=True)
        _SHIM_REGISTERED = True
        processor_class.shim = Qwen2_5_VLImageOnlyProcessor
    return processor_class.shim


def video_processor_kwargs(pixels: dict) -> dict:
    """`video_processor=` for the stock processor where torchvision imports (its base class refuses a missing
    sub-processor, and vLLM loads a model folder's processor only with its video processor: "Can't load video
    processor"); nothing for the image-only shim. Same patch, merge and pixel settings as the images."""
    if not has_torchvision():
        return {}
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    return {"video_processor": Qwen2VLVideoProcessor(**pixels)}


def image_processor_class():
    from transformers import Qwen2VLImageProcessorPil
    if has_torchvision():
        from transformers import Qwen2VLImageProcessor
        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def load_processor(path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                   trust_remote_code: bool = False):
    """AutoProcessor for a local folder or hub id; asserts it is a full processor (not just a tokenizer).

    Without the shim registered, `AutoProcessor` silently returns only the tokenizer for Qwen2.5-VL when
    torchvision is missing; we fail loudly instead. `min_pixels`/`max_pixels` override the image
    processor's resize bounds (they set the number of image tokens; keep them equal in training,
    sampling and evaluation).
    """
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin
    processor_class()
    kwargs = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = int(min_pixels)
    if max_pixels is not None:
        kwargs["max_pixels"] = int(max_pixels)
    proc = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if not isinstance(proc, ProcessorMixin) or getattr(proc, "image_processor", None) is None:
        raise TypeError(f"{path}: AutoProcessor returned {type(proc).__name__}, not a multimodal processor "
                        "with an image processor (is the processor shim registered?)")
    if min_pixels is not None or max_pixels is not None:
        ip = proc.image_processor
        size = dict(getattr(ip, "size", None) or {})
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
            ip.min_pixels = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
            ip.max_pixels = int(max_pixels)
        ip.size = size
    return proc


def torch_dtype(name: str):
    import torch
    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[name]


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def inference_placement() -> dict:
    """`from_pretrained` arguments that place an inference model: over the visible GPUs when CUDA is present
    (`device_map="auto"`: one GPU holds a 3B model whole, several GPUs share a 72B one, as the job's
    `compute.gpus_per_infer_job` gives them), nothing on a CPU machine. Training leaves placement to the
    Trainer / DeepSpeed."""
    return {"device_map": "auto"} if cuda_available() else {}


def load_model(path: str, *, base: str | None = None, dtype: str = "float32", trainable: bool = False,
               lora: dict | None = None, trust_remote_code: bool = False, attn_implementation: str | None = None,
               device_map=None):
    """Load a VLM for training or inference.

    - `path` with full weights: loaded directly (safetensors only).
    - `path` holding a peft adapter: the `base` model is loaded and the adapter applied on top
      (trainable when `trainable`), so every stage of a LoRA recipe is "base + one adapter" — the form
      vLLM's `LoRARequest` serves.
    - `lora` (a dict of LoraConfig fields) given and `path` full weights: a fresh adapter is added.
    - `device_map`: where the weights go (`inference_placement`); None keeps them on the CPU.
    """
    from transformers import AutoModelForImageTextToText
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if is_adapter_dir(path):
        from peft import PeftModel
        if base is None:
            with open(os.path.join(path, "adapter_config.json")) as f:
                base = json.load(f).get("base_model_name_or_path")
        model = keep_used_weight_conversions(AutoModelForImageTextToText.from_pretrained(base, **kwargs))
        model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    else:
        model = keep_used_weight_conversions(AutoModelForImageTextToText.from_pretrained(path, **kwargs))
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(**lora))
    if device_map is None and not cuda_available():
        patch_embeds_as_matmul(model)
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def patch_embeds_as_matmul(model) -> int:
    """On a CPU, run each vision patch embedding (Qwen2.5-VL's `...PatchEmbed`: a Conv3d whose kernel is its
    stride, over pixels already cut into patches of C·T·P·P values) as the matrix product it is:
    x [n, C·T·P·P] @ Wᵀ with W [E, C, T, P, P] flattened to [E, C·T·P·P]. The same map (the patch's values
    are in the kernel's C, T, P, P order), ≈ 2.7× faster than torch's CPU Conv3d forward and backward at the
    tiny scale, where it was ≈ 6% of a pretraining step. Only each module's forward changes: weights, state
    dict and checkpoints are the Conv3d's. Not under DeepSpeed ZeRO-3, which gathers a weight only for its own
    module's forward. Returns the number of modules changed (0 when done already)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():
        return 0
    import types

    import torch
    changed = 0
    for module in unwrap(model).modules():
        conv = getattr(module, "proj", None)
        if getattr(module, "_patches_as_matmul", False):
            continue
        if not (type(module).__name__.endswith("PatchEmbed") and isinstance(conv, torch.nn.Conv3d)
                and tuple(conv.kernel_size) == tuple(conv.stride) and set(conv.padding) == {0}
                and set(conv.dilation) == {1} and conv.groups == 1):
            continue

        def forward(self, hidden_states):
            w = self.proj.weight
            x = hidden_states.to(dtype=w.dtype).reshape(-1, w[0].numel())
            return torch.nn.functional.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)

        module.forward = types.MethodType(forward, module)
        module._patches_as_matmul = True
        changed += 1
    return changed


def keep_used_weight_conversions(model):
    """Keep only the checkpoint-key conversions that matched a key while loading, as transformers' plain
    loader does. Its ZeRO-3 loader (transformers 5.2x, `_load_state_dict_into_zero3_model`) keeps every
    candidate, and `save_pretrained` reverts them all: a ZeRO-3 run then saved `model.model.embed_tokens...`,
    which no loader maps back (the reloaded model would have missed every language-model weight)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if getattr(c, "was_used", lambda: True)()]
    return model


def load_for_inference(path: str, vlm, processor: bool = True):
    """(model, processor) of a model folder or hub id for inference (frozen, eval mode, on the GPU(s) when
    CUDA is present: `inference_placement`), with the prompt and image settings of `vlm` (a
    `cwdpo.specs.Vlm`); processor None when `processor` is False. Every inference job loads through here
    (evaluation, reference pass, hf sampling); callers move their batches to `model.device`."""
    proc = load_processor(path, vlm.min_pixels, vlm.max_pixels, vlm.trust_remote_code) if processor else None
    model = load_model(path, base=vlm.base, dtype=vlm.dtype, trust_remote_code=vlm.trust_remote_code,
                       **inference_placement())
    return model, proc


def set_threads(n: int) -> None:
    """torch's CPU threads (the rule's `threads`); 0 keeps torch's default."""
    if n and n > 0:
        import torch
        torch.set_num_threads(int(n))


def unwrap(model):
    """The `...ForConditionalGeneration` module under peft / DeepSpeed / DDP wrappers."""
    m = model
    for _ in range(4):
        if hasattr(m, "module") and not hasattr(m, "lm_head"):
            m = m.module
        if hasattr(m, "get_base_model"):
            m = m.get_base_model()
    return m


def model_fingerprint(path: str) -> str:
    """A content hash of a model folder's weights and configs (for cache keys of reference log-probs); for a
    hub id (Stage 2 from the base model), its id and the commit of its snapshot in the Hugging Face cache
    (the commit names the content; hashing ~7-145 GB of weights per job would not)."""
    import hashlib
    h = hashlib.sha256()
    if not os.path.isdir(path):
        from .hub import is_hub_id, snapshot_commit, snapshot_path
        if not is_hub_id(path):
            raise FileNotFoundError(f"{path}: neither a model folder nor a hub id")
        h.update(f"hub:{path}@{snapshot_commit(snapshot_path(path))}".encode())
        return h.hexdigest()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".json")) and not name.startswith("trainer_state"):
            h.update(name.encode())
            with open(os.path.join(path, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def mrope_section(head_dim: int) -> list:
    """mRoPE sections (temporal, height, width) of a head: they sum to head_dim / 2, split 1/4, 3/8, 3/8 as
    Qwen2.5-VL's [16, 24, 24] of 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_base_init(spec, out_dir: str) -> dict:
    """`cwdpo build-model`: the tiny model of `spec` (a `BuildModelSpec`) with its tokenizer trained on the
    captions of `spec.data` and, where the records have them, their question–answer turns (prompts, answers);
    writes the folder and its build_info.json, returns the summary."""
    from .data import load_records, write_json
    records = load_records(spec.data)
    sizes = {**spec.tiny, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    info = build_tiny(out_dir, tokenizer_corpus(records), sizes, spec.prompt, seed=spec.seed)
    write_json(os.path.join(out_dir, "build_info.json"), info)
    return info


def tokenizer_corpus(records: list) -> list:
    """The texts the tiny tokenizer is trained on: every caption of `records` and, where they have them, their
    question–answer turns' prompts and answers."""
    return [c for r in records for c in r.captions] + \
        [text for r in records for t in r.qa for text in (t["prompt"], t["answer"])]


def build_tiny(out_dir: str, corpus: list, spec: dict, prompt: str, seed: int = 0) -> dict:
    """Build a random-init Qwen2.5-VL-architecture model + tokenizer + processor offline; save to `out_dir`.

    The tokenizer is a byte-level BPE (Qwen style) trained on `corpus` (the training captions and the
    prompt) with the Qwen special tokens; the image processor uses 14-px patches merged 2x2 and
    `min_pixels`/`max_pixels` from `spec`. Returns a summary (parameter counts, vocabulary size).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=int(spec["vocab_size"]), special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) + [prompt, "system user assistant"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], model_max_length=4096)
    tokenizer.padding_side = "right"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}

    pixels = dict(min_pixels=int(spec["min_pixels"]), max_pixels=int(spec["max_pixels"]), patch_size=14, merge_size=2,
                  temporal_patch_size=2)
    processor = processor_class()(image_processor=image_processor_class()(**pixels), tokenizer=tokenizer,
                                  chat_template=TINY_CHAT_TEMPLATE, **video_processor_kwargs(pixels))

    hidden, heads = int(spec["hidden_size"]), int(spec["num_attention_heads"])
    mrope = mrope_section(hidden // heads)
    vdepth = int(spec["vision_depth"])
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(spec["intermediate_size"]),
            num_hidden_layers=int(spec["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(spec["num_key_value_heads"]), max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": float(spec["rope_theta"]),
                             "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True),
        vision_config=dict(
            depth=vdepth, hidden_size=int(spec["vision_hidden_size"]),
            intermediate_size=int(spec["vision_intermediate_size"]), num_heads=int(spec["vision_num_heads"]),
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=TINY_WINDOW,
            out_hidden_size=hidden, fullatt_block_indexes=list(range(vdepth))),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = ids["<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()), "vision_parameters": n_vision,
            "vocab_size": len(tokenizer), "mrope_section": mrope}
