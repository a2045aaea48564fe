"""Multiple-choice items, their images and prompts (the conventions every scoring mode shares).

- Letters: the option shown at position j is lettered `LETTERS[j]` ("A".."I"; 2..9 options).
- Prompt (`mcq_prompt`): hint (if any) + question + one line "<letter>. <option>" per option in the shown
  order + "Answer with the option's letter from the given choices directly.", joined by newlines; it is
  the user-turn text after the (single) image of `cwdpo.logprobs.chat_prompt`.
- Several images: our `Encoder` has one image slot, so an item's images are composed side by side, left to
  right in their order, scaled to a common height with an 8-px white gap (`compose_images`). MMMU
  placeholders `<image k>` are rewritten to "image k" and the prompt gets the line "The images are shown
  side by side, from left to right: image 1 to image N."; with a single image `<image 1>` becomes
  "the image".
- Option orders: rotation r shows source option (j + r) mod N at letter j (`rotation_order`); rotation 0
  is the source order. Circular evaluation (MMBench's CircularEval) presents an N-option item under all N
  rotations (`presentations`), so the correct option takes every letter once.

Images decoded from bytes (MMBench base64, parquet bytes) are PIL images opened lazily on an in-memory
buffer: the file was fully decoded once at load time to check it, and `open_rgb` decodes a fresh RGB copy
each time it is used, so an evaluation holds only the compressed bytes of its images in memory.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field

LETTERS = "ABCDEFGHI"
MIN_OPTIONS, MAX_OPTIONS = 2, 9
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
IMAGE_GAP = 8


class InvalidItem(ValueError):
    """A malformed item: `reason` is the short key counted in a loader's summary, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- items

@dataclass
class MCQItem:
    """One multiple-choice question.

    images: image paths or PIL images (at least one; several are composed side by side for the model);
    options: 2..9 option texts in the source order; answer: index into `options` of the correct one;
    meta: source details (file, row, dataset-specific fields) that scoring does not use.
    """

    id: str
    images: list
    question: str
    options: list
    answer: int
    hint: str | None = None
    category: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise InvalidItem("missing question", "empty question")
        if not isinstance(self.options, list) or not MIN_OPTIONS <= len(self.options) <= MAX_OPTIONS:
            n = len(self.options) if isinstance(self.options, list) else "no"
            raise InvalidItem("bad options", f"{n} options (need {MIN_OPTIONS}..{MAX_OPTIONS})")
        if any(not isinstance(o, str) or not o.strip() for o in self.options):
            raise InvalidItem("bad options", "an option is empty or not a string")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or \
                not 0 <= self.answer < len(self.options):
            raise InvalidItem("bad answer", f"answer {self.answer!r} is not an option index "
                                            f"(0..{len(self.options) - 1})")
        if not isinstance(self.images, list) or not self.images:
            raise InvalidItem("no image", "no image")



def rotation_order(n: int, rotation: int) -> list:
    """Source option indices in shown order under `rotation`: letter j shows option (j + rotation) mod n."""
    return [(j + rotation) % n for j in range(n)]


# ---------------------------------------------------------------------------------------------- images

def _lazy_image(data: bytes):
    """A PIL image opened lazily on `data` after checking that the bytes fully decode into an image every
    job can take (`cwdpo.data.image_problem`: size, aspect ratio, bit depth; InvalidItem "bad image")."""
    from PIL import Image

    from ..data import image_problem
    with Image.open(io.BytesIO(data)) as probe:
        problem = image_problem(probe)  # from the header, before a bomb is decoded
        if problem:
            raise InvalidItem("bad image", problem[1])
        probe.load()
    return Image.open(io.BytesIO(data))


def image_size(image) -> tuple:
    """(width, height) of a path or a PIL image, from its header."""
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.size
    return image.size


def composed_size(sizes: list, gap: int = IMAGE_GAP) -> tuple:
    """(width, height) of `compose_images` of images of these (width, height) sizes."""
    if len(sizes) == 1:
        return sizes[0]
    height = max(h for _, h in sizes)
    return sum(w if h == height else max(1, round(w * height / h)) for w, h in sizes) + gap * (len(sizes) - 1), height


def open_rgb(image):
    """A decoded RGB PIL image from a path or a PIL image.

    Lazily opened in-memory images (from the loaders) are decoded into a fresh copy each time, leaving the
    stored object undecoded (only its compressed bytes stay in memory).
    """
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    fp = getattr(image, "fp", None)
    if isinstance(fp, io.BytesIO):
        with Image.open(io.BytesIO(fp.getvalue())) as im:
            return im.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def compose_images(images: list, gap: int = IMAGE_GAP, background=(255, 255, 255)):
    """Images side by side, left to right in list order, each scaled to the tallest one's height
    (aspect ratio kept), separated by `gap` pixels of `background`. One image is returned as RGB."""
    from PIL import Image
    ims = [open_rgb(x) for x in images]
    if len(ims) == 1:
        return ims[0]
    height = max(im.height for im in ims)
    scaled = [im if im.height == height else
              im.resize((max(1, round(im.width * height / im.height)), height), Image.BICUBIC) for im in ims]
    canvas = Image.new("RGB", composed_size([im.size for im in ims], gap), background)
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def item_image(item: MCQItem):
    """What the Encoder receives for `item`: a single path as is (Encoder loads it), else a PIL RGB image
    (several images composed side by side, `compose_images`)."""
    if len(item.images) == 1 and isinstance(item.images[0], str):
        return item.images[0]
    return compose_images(item.images)


# ---------------------------------------------------------------------------------------------- prompts

_PLACEHOLDER = re.compile(r"<image\s*(\d+)>")


def render_text(text: str, n_images: int) -> str:
    """Rewrite MMMU `<image k>` placeholders: 'the image' for a single-image item, else 'image k'."""
    if n_images == 1:
        return _PLACEHOLDER.sub("the image", text)
    return _PLACEHOLDER.sub(lambda m: f"image {m.group(1)}", text)


def mcq_prompt(item: MCQItem, order: list | None = None) -> str:
    """The user-turn text of `item` with its options shown in `order` (source indices; default the source
    order): hint, [multi-image note], question, "A. ..." lines, the answer instruction — one per line."""
    order = list(range(len(item.options))) if order is None else list(order)
    n_img = len(item.images)
    lines = []
    if item.hint:
        lines.append(render_text(item.hint.strip(), n_img))
    if n_img > 1:
        lines.append(f"The images are shown side by side, from left to right: image 1 to image {n_img}.")
    lines.append(render_text(item.question.strip(), n_img))
    for j, src in enumerate(order):
        lines.append(f"{LETTERS[j]}. {render_text(item.options[src].strip(), n_img)}")
    lines.append(ANSWER_INSTRUCTION)
    return "\n".join(lines)


def option_responses(item: MCQItem, order: list) -> list:
    """The scored responses "<letter>. <option text>" in shown order (placeholders rewritten as in the prompt)."""
    n_img = len(item.images)
    return [f"{LETTERS[j]}. {render_text(item.options[src].strip(), n_img)}" for j, src in enumerate(order)]


@dataclass
class Presentation:
    """One item shown under one option order: `order[j]` is the source option shown at letter j."""

    item_index: int
    rotation: int
    order: list
    prompt: str
    responses: list

    def answer_position(self, item: MCQItem) -> int:
        return self.order.index(item.answer)


def presentations(items: list, circular: bool = False) -> list:
    """Rotation 0 (the source order) of every item; with `circular`, all N rotations of an N-option item
    (item-major: item 0 rotations 0..N-1, then item 1, ...)."""
    out = []
    for i, it in enumerate(items):
        for r in range(len(it.options) if circular else 1):
            order = rotation_order(len(it.options), r)
            out.append(Presentation(i, r, order, mcq_prompt(it, order), option_responses(it, order)))
    return out
