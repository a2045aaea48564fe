"""Per-token log-probs of (image, prompt, response) with masks — one forward over chosen + rejected.

`Encoder` turns images and response texts into a `SeqBatch`: right-padded token ids of
`chat(prompt with image)` followed by the assistant turn exactly as the chat template renders it
(Qwen: `response<|im_end|>\n`, what TRL's DPOTrainer scores), a mask of those completion tokens (the only
ones scored), and the pixel values of each *unique* image once. `completion_logps` runs the vision tower once per
unique image, scatters its features into every row that shows that image (chosen and rejected share
it), builds Qwen2.5-VL's multimodal (t, h, w) rope positions, and evaluates the LM head only at the
response positions. The result is identical to the stock `model(**processor(...))` forward (tested),
at a fraction of the cost when many rows share an image and the prompt is long.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from .models import unwrap


@dataclass
class SeqBatch:
    """Rows of prompt + response tokens; images stored once and referenced by `row_image`.

    input_ids, attention_mask, completion_mask: [N, L] (right padded; completion_mask marks the completion
    tokens: the response and what the chat template closes the turn with, `<|im_end|>\n` for Qwen);
    position_ids: [3, N, L] mRoPE positions; row_image: [N] index of each row's image; pixel_values: [P, D]
    and image_grid_thw: [M, 3] for the M unique images.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor
    row_image: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def to(self, device):
        return SeqBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_dict(d: dict) -> "SeqBatch":
        return SeqBatch(**{f.name: d[f.name] for f in fields(SeqBatch)})

    def select(self, rows) -> "SeqBatch":
        """The batch restricted to `rows` (images are kept; rows keep their image index)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return SeqBatch(self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx],
                        self.position_ids[:, idx], self.row_image[idx], self.pixel_values, self.image_grid_thw)

    @property
    def n_rows(self) -> int:
        return int(self.input_ids.shape[0])


def mrope_positions(ids: list, grids: list, image_token_id: int, merge: int) -> torch.Tensor:
    """Qwen2-VL / Qwen2.5-VL multimodal rope positions [3, len(ids)] of one unpadded sequence.

    Text tokens advance all three axes together; the k-th run of image tokens, with merged grid
    (t, h/merge, w/merge), gets t-, h- and w-indices offset by the position where it starts, and the text
    after it resumes at start + max(h, w)/merge (still images: the temporal index stays at the start).
    """
    out = torch.empty(3, len(ids), dtype=torch.long)
    pos = 0
    i = 0
    k = 0
    n = len(ids)
    while i < n:
        if ids[i] == image_token_id:
            t, h, w = (int(x) for x in grids[k])
            k += 1
            lh, lw = h // merge, w // merge
            count = t * lh * lw
            tt = torch.arange(t).view(-1, 1, 1).expand(t, lh, lw).reshape(-1)
            hh = torch.arange(lh).view(1, -1, 1).expand(t, lh, lw).reshape(-1)
            ww = torch.arange(lw).view(1, 1, -1).expand(t, lh, lw).reshape(-1)
            out[0, i:i + count] = tt + pos
            out[1, i:i + count] = hh + pos
            out[2, i:i + count] = ww + pos
            pos += max(lh, lw)
            i += count
        else:
            out[:, i] = pos
            pos += 1
            i += 1
    return out


def user_turn(prompt: str) -> list:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def chat_prompt(processor, prompt: str) -> str:
    """The chat-templated prompt text: a user turn with one image and `prompt`, then the assistant header."""
    return processor.apply_chat_template(user_turn(prompt), add_generation_prompt=True, tokenize=False)


# a response text no chat template alters, to find what a template renders around the assistant's text
_MARKER = "CWDPOMARKER7f3a"


def assistant_turn(processor, prompt: str) -> tuple[str, str]:
    """(before, after): what the chat template renders around the assistant's text in the turn after the
    prompt — ("", "<|im_end|>\n") for Qwen. As TRL's `apply_chat_template` does, the completion is the
    rendered conversation minus the rendered prompt (with the generation header), so it is exactly the
    text TRL's DPOTrainer tokenizes and scores."""
    prompt_text = chat_prompt(processor, prompt)
    full = processor.apply_chat_template(
        user_turn(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": _MARKER}]}], tokenize=False)
    if not full.startswith(prompt_text) or full[len(prompt_text):].count(_MARKER) != 1:
        raise ValueError("the chat template does not render the prompt (with its generation header) as a prefix "
                         "of the prompt + assistant turn; cwdpo cannot tell which tokens are the completion")
    before, after = full[len(prompt_text):].split(_MARKER)
    return before, after


def text_chat_prompt(processor, scene: str, prompt: str) -> str:
    """The text-input prompt (model.input: text): the user turn holds the scene's attribute record as text
    where the image would be, then `prompt`; no image placeholder."""
    messages = [{"role": "user", "content": [{"type": "text", "text": f"{scene}\n{prompt}"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def make_encoder(processor, vlm, pixel_cache_mb: float = 0) -> "Encoder":
    """The `Encoder` of a job's `cwdpo.specs.Vlm`: the image in the user turn, or — `vlm.input` "text" — each
    image's attribute record written as text (`cwdpo.shapes.scene_text`, from the caption file `vlm.scenes`)."""
    scenes = None
    if vlm.input == "text":
        from .shapes import scene_texts
        scenes = scene_texts(vlm.scenes)
    return Encoder(processor, vlm.prompt, vlm.max_response_tokens, pixel_cache_mb=pixel_cache_mb, scenes=scenes)


PROMPT_ENCODERS_KEPT = 16384  # > the distinct prompts of a tiny-scale training set (4,216 turns' prompts; ≈ 7 KB each)


class Encoder:
    """Builds `SeqBatch`es for one processor and one prompt.

    The chat prompt (user turn: image + `prompt`, then the assistant header) is tokenized once; its single
    image placeholder is expanded to the image's token count (grid t*h*w / merge^2), exactly as the
    processor does. A response becomes the assistant turn the chat template renders (`assistant_turn`:
    for Qwen the text, `<|im_end|>` and the newline), tokenized on its own (no merges across the prompt
    boundary, as TRL does) and cut to `max_response_tokens` tokens — the end-of-turn tokens count, as
    under TRL's `max_length` with `keep_start`: a cut response loses its end of turn (`truncated` tells
    which). `pixel_cache_mb` bounds an in-memory cache of processed images keyed by path.

    Text input (`scenes`, {image path: the scene's attribute record as text}): an image is named by its path
    only; its prompt holds its scene text instead of the image (`text_chat_prompt`), and a batch carries no
    pixels, so the vision tower never runs (the rows keep their image index: rows of one image share a
    prompt, as with images).
    """

    def __init__(self, processor, prompt: str, max_response_tokens: int = 64, pixel_cache_mb: float = 0,
                 scenes: dict | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt = prompt
        self.max_response_tokens = int(max_response_tokens)
        self.prompt_text = chat_prompt(processor, prompt)
        self.turn_before, self.turn_after = assistant_turn(processor, prompt)
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self._prompt_template = self.tokenizer(self.prompt_text, add_special_tokens=False)["input_ids"]
        if self._prompt_template.count(self.image_token_id) != 1:
            raise ValueError("the chat prompt must contain exactly one image placeholder")
        self.scenes = scenes
        self._scene_cache: dict = {}
        self.merge = int(getattr(processor.image_processor, "merge_size", 2))
        self._prompt_cache: dict = {}
        self._pixel_cache: dict = {}
        self._pixel_cache_bytes = 0
        self.pixel_cache_bytes = int(pixel_cache_mb * 2 ** 20)
        self._by_prompt: OrderedDict = OrderedDict()

    def for_prompt(self, prompt: str | None) -> "Encoder":
        """The Encoder of another prompt (an item's own: a question–answer turn), with this one's processor,
        response limit and scene texts; `None` or this prompt: this Encoder. The last `PROMPT_ENCODERS_KEPT` are
        kept."""
        if prompt is None or prompt == self.prompt:
            return self
        if prompt in self._by_prompt:
            self._by_prompt.move_to_end(prompt)
        else:
            self._by_prompt[prompt] = Encoder(self.processor, prompt, self.max_response_tokens, scenes=self.scenes)
            if len(self._by_prompt) > PROMPT_ENCODERS_KEPT:
                self._by_prompt.popitem(last=False)
        return self._by_prompt[prompt]

    # ---- images ----
    def load_image(self, path: str):
        from PIL import Image
        with Image.open(path) as im:
            return im.convert("RGB")

    def encode_images(self, images: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [P, D], image_grid_thw [M, 3]) for PIL images or paths (paths are cached); with text
        input no pixels and no grids (the images' scene texts are in their prompts)."""
        if self.scenes is not None:
            return torch.zeros((0, 0)), torch.zeros((0, 3), dtype=torch.long)
        pv, grids = [], []
        todo = []
        for i, im in enumerate(images):
            key = im if isinstance(im, str) else None
            if key is not None and key in self._pixel_cache:
                p, g = self._pixel_cache[key]
                pv.append(p)
                grids.append(g)
            else:
                pv.append(None)
                grids.append(None)
                todo.append(i)
        if todo:
            pil = [self.load_image(images[i]) if isinstance(images[i], str) else images[i] for i in todo]
            out = self.processor.image_processor(images=pil, return_tensors="pt")
            sizes = out["image_grid_thw"].prod(-1).tolist()
            chunks = torch.split(out["pixel_values"], sizes)
            for i, p, g in zip(todo, chunks, out["image_grid_thw"]):
                pv[i], grids[i] = p, g
                key = images[i] if isinstance(images[i], str) else None
                nbytes = p.numel() * p.element_size()
                if key is not None and self._pixel_cache_bytes + nbytes <= self.pixel_cache_bytes:
                    self._pixel_cache[key] = (p, g)
                    self._pixel_cache_bytes += nbytes
        return torch.cat(pv), torch.stack(grids)

    # ---- text ----
    def prompt_ids(self, grid) -> tuple[list, torch.Tensor]:
        """Prompt token ids for an image of merged grid `grid` and their mRoPE positions [3, len]."""
        key = tuple(int(x) for x in grid)
        if key not in self._prompt_cache:
            n_img = key[0] * key[1] * key[2] // (self.merge ** 2)
            ids = []
            for t in self._prompt_template:
                ids.extend([t] * n_img if t == self.image_token_id else [t])
            self._prompt_cache[key] = (ids, mrope_positions(ids, [key], self.image_token_id, self.merge))
        return self._prompt_cache[key]

    def completion_text(self, text: str) -> str:
        """The assistant turn of a response as the chat template renders it (Qwen: `text<|im_end|>\n`)."""
        return self.turn_before + text + self.turn_after

    def full_completion_ids(self, texts: list) -> list:
        """Token ids of each response's whole rendered assistant turn (before any length limit)."""
        return self.tokenizer([self.completion_text(t) for t in texts], add_special_tokens=False)["input_ids"]

    def scene_prompt_ids(self, image) -> tuple[list, torch.Tensor]:
        """Text input: the prompt token ids of an image (its scene text, then the prompt) and their positions
        (text positions: the three mRoPE axes advance together)."""
        if image not in self._scene_cache:
            if not isinstance(image, str) or image not in self.scenes:
                raise ValueError(f"no attribute record for image {image!r}: the text input (model.input: text) "
                                 "writes each image's attribute record in its place")
            text = text_chat_prompt(self.processor, self.scenes[image], self.prompt)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._scene_cache[image] = (ids, mrope_positions(ids, [], self.image_token_id, self.merge))
        return self._scene_cache[image]

    def prompts(self, images: list, grids) -> list:
        """(prompt ids, positions) of each image: its placeholder expanded to its grid, or its scene text."""
        if self.scenes is not None:
            return [self.scene_prompt_ids(im) for im in images]
        return [self.prompt_ids(g) for g in grids]

    def response_ids(self, texts: list) -> list:
        """Token ids of each response's assistant turn, cut to `max_response_tokens` tokens."""
        return [ids[: self.max_response_tokens] for ids in self.full_completion_ids(texts)]

    def truncated(self, texts: list) -> list:
        """Per response: True when its assistant turn is longer than `max_response_tokens` (it is cut)."""
        return [len(ids) > self.max_response_tokens for ids in self.full_completion_ids(texts)]

    def build(self, images: list, rows: list) -> SeqBatch:
        """A batch from unique `images` (PIL or paths; paths with text input) and `rows` =
        [(image_index, response_text)]."""
        pixel_values, grids = self.encode_images(images)
        return self.build_encoded(pixel_values, grids, rows, prompts=self.prompts(images, grids))

    def build_encoded(self, pixel_values: torch.Tensor, grids: torch.Tensor, rows: list,
                      prompts: list | None = None) -> SeqBatch:
        """`build` from images already through `encode_images` (pixel_values [P, D], grids [M, 3]); `prompts`:
        each image's (prompt ids, positions) when not those of its grid (text input)."""
        responses = self.response_ids([text for _, text in rows])
        return self.build_ids(pixel_values, grids, [(i, ids) for (i, _), ids in zip(rows, responses)], prompts)

    def build_ids(self, pixel_values: torch.Tensor, grids: torch.Tensor, rows: list,
                  prompts: list | None = None) -> SeqBatch:
        """`build_encoded` from completion token ids as they are, `rows` = [(image_index, [token id, ...])]: no
        chat-template turn around them and no length limit (e.g. the tokens a sampler drew, to score them)."""
        prompts = prompts if prompts is not None else [self.prompt_ids(g) for g in grids]
        seqs, comp_starts, positions = [], [], []
        for img_idx, resp in rows:
            resp = list(resp)
            p_ids, p_pos = prompts[img_idx]
            seqs.append(p_ids + resp)
            comp_starts.append(len(p_ids))
            last = int(p_pos.max()) + 1 if p_pos.numel() else 0
            r_pos = torch.arange(last, last + len(resp)).view(1, -1).expand(3, -1)
            positions.append(torch.cat([p_pos, r_pos], dim=1))
        n, length = len(seqs), max(len(s) for s in seqs)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        completion_mask = torch.zeros((n, length), dtype=torch.bool)
        position_ids = torch.zeros((3, n, length), dtype=torch.long)
        for r, (s, c0, pos) in enumerate(zip(seqs, comp_starts, positions)):
            input_ids[r, : len(s)] = torch.tensor(s)
            attention_mask[r, : len(s)] = 1
            completion_mask[r, c0: len(s)] = True
            position_ids[:, r, : len(s)] = pos
        row_image = torch.tensor([i for i, _ in rows], dtype=torch.long)
        return SeqBatch(input_ids, attention_mask, completion_mask, position_ids, row_image, pixel_values, grids)


class Collator:
    """Turns dataset items into one `SeqBatch` of rows sharing each image once.

    kinds: "sft" items {image, response}; "sft_c" items {image, positive, negative} → rows [pos; neg];
    "pair" items {image, chosen, rejected, ref_*} → rows [chosen; rejected]. An item with a "prompt" (a
    question–answer turn) is asked that prompt instead of the encoder's: its rows share a slot with the other
    rows of the same image and prompt only.
    """

    def __init__(self, encoder: Encoder, kind: str):
        self.encoder, self.kind = encoder, kind

    def __call__(self, items: list) -> dict:
        slots, index = [], {}
        for it in items:
            key = (it["image"], it.get("prompt"))
            if key not in index:
                index[key] = len(slots)
                slots.append(key)
        idx = [index[(it["image"], it.get("prompt"))] for it in items]
        if self.kind == "sft":
            rows = [(i, it["response"]) for i, it in zip(idx, items)]
        elif self.kind == "sft_c":
            rows = [(i, it["positive"]) for i, it in zip(idx, items)] + \
                   [(i, it["negative"]) for i, it in zip(idx, items)]
        elif self.kind == "pair":
            rows = [(i, it["chosen"]) for i, it in zip(idx, items)] + \
                   [(i, it["rejected"]) for i, it in zip(idx, items)]
        else:
            raise ValueError(self.kind)
        images = [image for image, _ in slots]
        if all(prompt is None for _, prompt in slots):
            batch = self.encoder.build(images, rows)
        else:
            pixel_values, grids = self.encoder.encode_images(images)
            prompts = [self.encoder.for_prompt(prompt).prompts([image], grids[k:k + 1])[0]
                       for k, (image, prompt) in enumerate(slots)]
            batch = self.encoder.build_encoded(pixel_values, grids, rows, prompts=prompts)
        out = {"batch": batch.as_dict(), "n": torch.tensor(len(items))}
        if self.kind == "pair":
            for key in ("ref_chosen_logps", "ref_rejected_logps"):
                if key in items[0]:
                    out[key] = torch.tensor([float(it[key]) for it in items], dtype=torch.float64)
            if "pair_index" in items[0]:
                out["pair_index"] = torch.tensor([int(it["pair_index"]) for it in items])
        return out


def image_features(core, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> list:
    """Merged vision-tower outputs, one [n_tokens_i, hidden] tensor per image."""
    out = core.model.get_image_features(pixel_values, image_grid_thw)
    emb = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(emb, torch.Tensor):
        merge = core.model.visual.spatial_merge_size
        emb = torch.split(emb, (image_grid_thw.prod(-1) // merge ** 2).tolist())
    return list(emb)


def input_embeddings(core, batch: SeqBatch, image_token_id: int) -> torch.Tensor:
    """Token embeddings with every row's image placeholders replaced by its image's features (a batch without
    images, the text input, is its token embeddings: the vision tower does not run)."""
    embed = core.get_input_embeddings()
    inputs_embeds = embed(batch.input_ids)
    if batch.image_grid_thw.shape[0] == 0:
        if bool((batch.input_ids == image_token_id).any()):
            raise ValueError("image tokens in a batch without images")
        return inputs_embeds
    feats = image_features(core, batch.pixel_values, batch.image_grid_thw)
    per_row = torch.cat([feats[i] for i in batch.row_image.tolist()]).to(inputs_embeds.dtype)
    mask = (batch.input_ids == image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    if int(mask[..., 0].sum()) != per_row.shape[0]:
        raise ValueError(f"image tokens ({int(mask[..., 0].sum())}) and image features ({per_row.shape[0]}) "
                         "do not match")
    return inputs_embeds.masked_scatter(mask, per_row)


@dataclass
class CompletionLogps:
    """Log-probs of the response tokens of every row.

    token_logps [T] and logits [T, V] (when kept) are flattened over the scored positions; `row` [T] maps
    each scored position to its row. sums/means/counts are per row [N]: sum_l log p(y_l | x, y_<l), the
    token mean (the paper's ℓ̄), and the number of response tokens L.
    """

    token_logps: torch.Tensor
    row: torch.Tensor
    sums: torch.Tensor
    means: torch.Tensor
    counts: torch.Tensor
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None


def completion_logps(model, batch: SeqBatch, image_token_id: int, keep_logits: bool = False) -> CompletionLogps:
    """One forward over all rows of `batch` (the language model in two, when `length_groups` splits the rows);
    log-probs at the response positions only.

    The LM head runs only on the hidden states that predict a response token (position t predicts token
    t+1), so a 400-token image prompt costs no vocabulary-sized logits.
    """
    core = unwrap(model)
    inputs_embeds = input_embeddings(core, batch, image_token_id)
    target_mask = batch.completion_mask[:, 1:]
    rows, cols = target_mask.nonzero(as_tuple=True)
    lengths = batch.attention_mask.sum(-1).tolist()
    groups = length_groups(lengths)
    if groups is None:
        hidden = language_model_hidden(core, inputs_embeds, batch.attention_mask, batch.position_ids)
        h = hidden[rows.to(hidden.device), cols.to(hidden.device)]  # hidden state at t predicts token t+1
    else:  # each group padded to its own longest row: the same hidden states, fewer padding positions
        where = torch.empty(batch.n_rows, dtype=torch.long, device=rows.device)  # a row's index in its group
        picked, parts = [], []
        for g in groups:
            g_rows = torch.as_tensor(g, dtype=torch.long, device=rows.device)
            where[g_rows] = torch.arange(len(g), device=rows.device)
            width = max(lengths[r] for r in g)
            hidden = language_model_hidden(core, inputs_embeds[g_rows.to(inputs_embeds.device), :width],
                                           batch.attention_mask[g_rows, :width],
                                           batch.position_ids[:, g_rows, :width])
            sel = torch.isin(rows, g_rows).nonzero(as_tuple=True)[0]  # this group's scored positions
            picked.append(sel)
            parts.append(hidden[where[rows[sel]].to(hidden.device), cols[sel].to(hidden.device)])
        h = torch.cat(parts)[torch.argsort(torch.cat(picked)).to(parts[0].device)]  # back in (row, col) order
    return logps_from_hidden(core, h, batch.input_ids[rows, cols + 1], rows, batch.n_rows, keep_logits)


def language_model_hidden(core, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
    """The language model's last hidden states [N, L, H] of `inputs_embeds` (no cache)."""
    out = core.model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


LENGTH_GROUP_SAVING = 0.15  # split a batch's forward when it skips at least this share of the padded positions


def length_groups(lengths: list, min_saving: float | None = None) -> list | None:
    """Rows of a right-padded batch split in two by length (the shorter rows, the longer ones; each a list of
    row indices) when padding each group to its own longest row computes at least `min_saving` fewer positions
    than padding all N rows to the longest (N·max L); None: one forward is as good. A batch that mixes long
    question–answer prompts with short caption prompts pads every caption to the longest question; the
    hidden states of the real positions do not depend on the padding (causal attention, right padding)."""
    min_saving = LENGTH_GROUP_SAVING if min_saving is None else min_saving
    n = len(lengths)
    if n < 2:
        return None
    order = sorted(range(n), key=lambda i: lengths[i])
    full = n * lengths[order[-1]]
    best, split = full, None
    for k in range(1, n):  # the k shortest rows padded to the k-th length, the rest to the longest
        cost = k * lengths[order[k - 1]] + (n - k) * lengths[order[-1]]
        if cost < best:
            best, split = cost, k
    if split is None or best > (1.0 - min_saving) * full:
        return None
    return [order[:split], order[split:]]


def logps_from_hidden(core, h: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int,
                      keep_logits: bool = False) -> CompletionLogps:
    """LM head on the hidden states [T, H] that predict the response tokens `targets` [T] (of rows `rows`),
    then per-token log-probs and their per-row sums, counts and means."""
    logits = core.lm_head(h)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    # a model spread over several GPUs (device_map="auto") may put the LM head on another one
    targets, rows = targets.to(logits.device), rows.to(logits.device)
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    counts = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, rows, torch.ones_like(token_logps))
    means = sums / counts.clamp(min=1)
    return CompletionLogps(token_logps, rows, sums, means, counts,
                           logits if keep_logits else None, targets if keep_logits else None)


def hf_forward_logps(model, processor, prompt: str, images: list, responses: list) -> torch.Tensor:
    """Reference implementation through the stock processor and `model(**inputs)`: summed log-probs of
    each response's assistant turn, found as TRL finds it (the chat template's rendering of prompt +
    response minus its rendering of the prompt), per (image, response). Used by the tests to pin
    `completion_logps`."""
    tok = processor.tokenizer
    prompt_text = chat_prompt(processor, prompt)
    out = []
    for im, resp in zip(images, responses):
        full = processor.apply_chat_template(
            user_turn(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": resp}]}], tokenize=False)
        assert full.startswith(prompt_text)
        p = processor(text=[prompt_text], images=[im], return_tensors="pt")
        r_ids = tok(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
        ids = torch.cat([p["input_ids"], torch.tensor([r_ids])], dim=1)
        mm = torch.cat([p["mm_token_type_ids"], torch.zeros(1, len(r_ids), dtype=p["mm_token_type_ids"].dtype)], 1) \
            if "mm_token_type_ids" in p else None
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=p["pixel_values"],
                      image_grid_thw=p["image_grid_thw"])
        if mm is not None:
            kwargs["mm_token_type_ids"] = mm
        logits = model(**kwargs).logits[0]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)
        out.append(lp[-len(r_ids):].sum())
    return torch.stack(out)
