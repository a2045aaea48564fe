"""Multiple-choice VQA evaluation (MMBench / MMMU style) of a Qwen2.5-VL-architecture model.

Items (`MCQItem`) come from local files in the public datasets' layouts (`load_mcq`: MMBench TSV/parquet,
MMMU parquet, our own JSONL) or are generated from the `shapes` attribute records (`shapes_mcq`).

Conventions (shared by every scoring mode):

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
  rotations, so the correct option takes every letter once; the item counts as correct only when every
  rotation is answered correctly. Plain accuracy uses rotation 0 only.
- scoring="loglik": each option is scored by the model's mean token log-probability ℓ̄ of the response
  "<letter>. <option text>" (+ the closing <|im_end|>, as everywhere in cwdpo) after the prompt; the
  prediction is the argmax (ties: the earliest letter).
- scoring="generate": greedy decoding; `parse_letter` maps the output to a letter (unparseable = wrong).

Images decoded from bytes (MMBench base64, parquet bytes) are PIL images opened lazily on an in-memory
buffer: the file was fully decoded once at load time to check it, and `open_rgb` decodes a fresh RGB copy
each time it is used, so an evaluation holds only the compressed bytes of its images in memory.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import glob
import io
import math
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field

from .data import DataError

LETTERS = "ABCDEFGHI"
MIN_OPTIONS, MAX_OPTIONS = 2, 9
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
IMAGE_GAP = 8
MMBENCH_CIRCULAR_OFFSET = 1_000_000  # MMBench TSVs carry circular copies of row i as index i + k * 1e6
MMMU_MAX_IMAGES = 7
FORMATS = ("mmbench", "mmmu", "jsonl")


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
            raise ValueError("empty question")
        if not isinstance(self.options, list) or not MIN_OPTIONS <= len(self.options) <= MAX_OPTIONS:
            n = len(self.options) if isinstance(self.options, list) else "no"
            raise ValueError(f"{n} options (need {MIN_OPTIONS}..{MAX_OPTIONS})")
        if any(not isinstance(o, str) or not o.strip() for o in self.options):
            raise ValueError("an option is empty or not a string")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or \
                not 0 <= self.answer < len(self.options):
            raise ValueError(f"answer {self.answer!r} is not an option index (0..{len(self.options) - 1})")
        if not isinstance(self.images, list) or not self.images:
            raise ValueError("no image")


def letter_index(letter) -> int | None:
    """0-based index of an option letter ('A' -> 0, ' b ' -> 1); None when not a single letter A..I."""
    if not isinstance(letter, str):
        return None
    s = letter.strip().upper()
    return LETTERS.index(s) if len(s) == 1 and s in LETTERS else None


def rotation_order(n: int, rotation: int) -> list:
    """Source option indices in shown order under `rotation`: letter j shows option (j + rotation) mod n."""
    return [(j + rotation) % n for j in range(n)]


# ---------------------------------------------------------------------------------------------- images

def _lazy_image(data: bytes):
    """A PIL image opened lazily on `data` after checking that the bytes fully decode."""
    from PIL import Image
    with Image.open(io.BytesIO(data)) as probe:
        probe.load()
    return Image.open(io.BytesIO(data))


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
    width = sum(im.width for im in scaled) + gap * (len(scaled) - 1)
    canvas = Image.new("RGB", (width, height), background)
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


# ---------------------------------------------------------------------------------------------- parsing

def _norm(text: str) -> str:
    s = " ".join(text.casefold().split())
    return s.strip(" \t\n.,;:!?\"'`()[]")


_LEAD_LETTER = re.compile(r"^[(\[]?([A-Z])(?:[)\].:,]|$)")
_KEYWORD_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is|would be|should be)\s*|:\s*)*"
                             r"[(\[]?([A-Z])(?![A-Za-z0-9])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def parse_letter(text: str, options: list) -> int | None:
    """The shown position (0-based letter index) a generated answer picks among `options` (in shown
    order), or None when it cannot be parsed. Rules, first that applies:

    1. the output starts with a letter alone or followed by ). ] . : , — "B", "B.", "(B)", "B) dog",
       "[B]"; a whole output of one lower-case letter ("b") also counts;
    2. a letter after "answer"/"option"/"choice" (+ "is"/":") — "The answer is B", "Answer: (C)";
    3. the output equals one option's text (case, spacing and surrounding punctuation ignored);
    4. exactly one distinct valid upper-case letter stands alone in the output (not "A"/"I" used as a
       word, i.e. followed by a lower-case word);
    5. exactly one option's text occurs in the output as whole words.
    Letters outside the options' range are ignored.
    """
    n = len(options)
    valid = LETTERS[:n]
    s = (text or "").strip()
    if not s:
        return None
    m = _LEAD_LETTER.match(s)
    if m and m.group(1) in valid:
        return valid.index(m.group(1))
    m = re.fullmatch(r"[(\[]?([a-z])[)\].:]?", s)
    if m and m.group(1).upper() in valid:
        return valid.index(m.group(1).upper())
    for m in _KEYWORD_LETTER.finditer(s):
        if m.group(1) in valid:
            return valid.index(m.group(1))
    ns = _norm(s)
    for prefix in ("the answer is ", "answer: ", "answer "):
        if ns.startswith(prefix):
            ns = ns[len(prefix):].strip()
    exact = [j for j, o in enumerate(options) if _norm(o) and _norm(o) == ns]
    if len(exact) == 1:
        return exact[0]
    lone = set()
    for m in _LONE_LETTER.finditer(s):
        letter = m.group(1)
        if letter in "AI" and re.match(r"\s+[a-z]", s[m.end():]):
            continue
        if letter in valid:
            lone.add(letter)
    if len(lone) == 1:
        return valid.index(lone.pop())
    contained = [j for j, o in enumerate(options)
                 if _norm(o) and re.search(r"(?<!\w)" + re.escape(_norm(o)) + r"(?!\w)", ns)]
    if len(contained) == 1:
        return contained[0]
    return None


# ---------------------------------------------------------------------------------------------- loaders

def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v) -> str | None:
    """A cell as stripped text; None for None/NaN/empty."""
    if _is_missing(v):
        return None
    s = str(v).strip()
    return s or None


class _Bad(Exception):
    """A malformed row: `reason` is the short key counted in the summary, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _expand(path) -> list:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                           if f.endswith((".tsv", ".csv", ".parquet", ".jsonl", ".json")))
        elif any(ch in p for ch in "*?["):
            found = sorted(glob.glob(p, recursive=True))
        else:
            found = [p]
        out += found
    if not out:
        raise DataError(f"{path}: no data files")
    for f in out:
        if not os.path.isfile(f):
            raise DataError(f"{f}: file not found")
    return out


def _read_table(file: str, cache_dir: str | None):
    """The rows of one local file as a `datasets.Dataset` (TSV/CSV: every column read as text, only
    empty cells missing; parquet; JSON lines). Image-typed columns are left undecoded (dicts of bytes)."""
    import datasets
    ext = os.path.splitext(file)[1].lower()
    kwargs = dict(data_files=file, split="train", cache_dir=cache_dir)
    try:
        if ext in (".tsv", ".csv"):
            delimiter = "\t" if ext == ".tsv" else ","
            with open(file, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f, delimiter=delimiter), None)
            if not header:
                raise DataError(f"{file}: empty file (no header)")
            features = datasets.Features({c: datasets.Value("string") for c in header})
            ds = datasets.load_dataset("csv", delimiter=delimiter, keep_default_na=False, na_values=[""],
                                       features=features, **kwargs)
        elif ext == ".parquet":
            ds = datasets.load_dataset("parquet", **kwargs)
        elif ext in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", **kwargs)
        else:
            raise DataError(f"{file}: unknown extension {ext!r} (expected .tsv, .csv, .parquet or .jsonl)")
    except DataError:
        raise
    except Exception as e:  # arrow / pandas parse errors
        raise DataError(f"{file}: cannot read ({type(e).__name__}: {e})") from None
    for name, feat in ds.features.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
    return ds


def _rows_jsonl(file: str, cache_dir: str | None, bad):
    """(row index, dict) of a JSON-lines file through `datasets`; when it cannot read the file (a broken
    line; with older `datasets`, types that differ between rows) the lines are parsed one by one with `json`
    so that a bad line can be named and skipped."""
    try:
        ds = _read_table(file, cache_dir)
        for i in range(len(ds)):
            yield i, ds[i]
        return
    except DataError:
        pass
    import json
    from .data import iter_jsonl
    for i, (_, _, row) in enumerate(iter_jsonl(file)):  # i: the row among non-empty lines
        if isinstance(row, json.JSONDecodeError):
            bad(i, None, _Bad("invalid JSON", f"not valid JSON ({row.msg})"))
            continue
        if not isinstance(row, dict):
            bad(i, None, _Bad("invalid JSON", "line is not a JSON object"))
            continue
        yield i, row


def decode_image(value, base_dir: str | None = None):
    """An image cell as a path or a lazily-opened PIL image: PIL images as they are; bytes; a dict with
    'bytes' (or only 'path'); a base64 string; a path string (relative to `base_dir`)."""
    from PIL import Image
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return decode_image(value["bytes"], base_dir)
        if value.get("path"):
            return decode_image(str(value["path"]), base_dir)
        raise _Bad("bad image", "image cell has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return _lazy_image(bytes(value))
        except Exception as e:
            raise _Bad("bad image", f"image bytes do not decode ({type(e).__name__}: {e})") from None
    if isinstance(value, str):
        s = value.strip()
        path = s if os.path.isabs(s) or base_dir is None else os.path.join(base_dir, s)
        if len(s) < 1024 and os.path.isfile(path):
            return path
        try:
            data = base64.b64decode("".join(s.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _Bad("bad image", f"image is neither base64 nor an existing file: {s[:80]!r}") from None
        return decode_image(data)
    raise _Bad("bad image", f"unsupported image cell of type {type(value).__name__}")


def _answer_index(answer, n: int, letters: str | None = None) -> int:
    """A letter (or, with letters=None and an int, a 0-based index) as an index into n options."""
    if isinstance(answer, int) and not isinstance(answer, bool) and letters is None:
        idx = answer
    else:
        s = _text(answer)
        if s is None:
            raise _Bad("no answer", "no answer given")
        letters = letters or LETTERS[:n]
        s = s.upper()
        if len(s) != 1 or s not in letters:
            raise _Bad("bad answer", f"answer {answer!r} is not one of the option letters {', '.join(letters)}")
        idx = letters.index(s)
    if not 0 <= idx < n:
        raise _Bad("bad answer", f"answer {answer!r} is outside the {n} options")
    return idx


def _id_text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def _mmbench_item(row: dict, ident: str, file: str, resolve_image) -> MCQItem:
    question = _text(row.get("question"))
    if question is None:
        raise _Bad("missing question", "no question")
    letters, options = "", []
    for letter in LETTERS:
        v = _text(row.get(letter))
        if v is not None:
            letters += letter
            options.append(v)
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise _Bad("bad options", f"{len(options)} non-empty options (need {MIN_OPTIONS}..{MAX_OPTIONS})")
    answer = _answer_index(row.get("answer"), len(options), letters)
    if _is_missing(row.get("image")):
        raise _Bad("no image", "no image")
    image = resolve_image(row["image"])
    meta = {"source": file, "index": ident}
    for key in ("l2-category", "L2-category", "split", "source"):
        if _text(row.get(key)) is not None:
            meta[key.lower() if key != "source" else "dataset_source"] = _text(row.get(key))
    if letters != LETTERS[:len(letters)]:
        meta["source_letters"] = letters
    return MCQItem(id=ident, images=[image], question=question, options=options, answer=answer,
                   hint=_text(row.get("hint")), category=_text(row.get("category")), meta=meta)


_MMMU_ID = re.compile(r"^(?:dev|validation|test)_(.+)_\d+$")


def _mmmu_options(raw) -> list:
    if _is_missing(raw):
        return []
    if isinstance(raw, (list, tuple)):
        opts = list(raw)
    else:
        try:
            opts = ast.literal_eval(str(raw))
        except (ValueError, SyntaxError):
            raise _Bad("bad options", f"options are not a Python list literal: {str(raw)[:80]!r}") from None
        if not isinstance(opts, (list, tuple)):
            raise _Bad("bad options", f"options are not a list: {str(raw)[:80]!r}")
    if any(isinstance(o, (list, dict, tuple)) for o in opts):
        raise _Bad("bad options", "options must be scalars")
    return [str(o).strip() for o in opts]


def _mmmu_item(row: dict, ident: str, file: str, base_dir: str) -> MCQItem | str:
    """An item, or the reason string "open question" for a row to skip."""
    options = _mmmu_options(row.get("options"))
    qtype = _text(row.get("question_type"))
    if qtype == "open" or (qtype is None and not options):
        return "open question"
    question = _text(row.get("question"))
    if question is None:
        raise _Bad("missing question", "no question")
    if any(not o for o in options):
        raise _Bad("bad options", "an option is empty")
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise _Bad("bad options", f"{len(options)} options (need {MIN_OPTIONS}..{MAX_OPTIONS})")
    answer = _answer_index(row.get("answer"), len(options), LETTERS[:len(options)])
    images, renumber = [], {}
    for k in range(1, MMMU_MAX_IMAGES + 1):
        v = row.get(f"image_{k}")
        if _is_missing(v):
            continue
        images.append(decode_image(v, base_dir))
        renumber[k] = len(images)
    if not images:
        raise _Bad("no image", "no image_1..image_7")

    def fix(text: str) -> str:  # placeholders follow the kept images' positions
        return _PLACEHOLDER.sub(lambda m: f"<image {renumber.get(int(m.group(1)), int(m.group(1)))}>", text)

    m = _MMMU_ID.match(ident)
    category = m.group(1) if m else _text(row.get("subfield"))
    meta = {"source": file}
    for key in ("subfield", "topic_difficulty", "img_type", "question_type"):
        if _text(row.get(key)) is not None:
            meta[key] = _text(row.get(key))
    return MCQItem(id=ident, images=images, question=fix(question), options=[fix(o) for o in options],
                   answer=answer, hint=None, category=category, meta=meta)


def _jsonl_item(row: dict, ident: str, file: str, base_dir: str) -> MCQItem:
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _Bad("missing question", "no question")
    options = row.get("options")
    if not isinstance(options, list) or not all(isinstance(o, str) and o.strip() for o in options):
        raise _Bad("bad options", "options must be a list of non-empty strings")
    if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
        raise _Bad("bad options", f"{len(options)} options (need {MIN_OPTIONS}..{MAX_OPTIONS})")
    answer = _answer_index(row.get("answer"), len(options))
    paths = row.get("images", row.get("image"))
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not paths:
        raise _Bad("no image", "no images")
    images = []
    for p in paths:
        if not isinstance(p, str) or not p:
            raise _Bad("bad image", f"image entry {p!r} is not a path")
        full = p if os.path.isabs(p) else os.path.join(base_dir, p)
        if not os.path.isfile(full):
            raise _Bad("bad image", f"image file not found: {full}")
        images.append(full)
    hint, category = row.get("hint"), row.get("category")
    return MCQItem(id=ident, images=images, question=question.strip(), options=[o.strip() for o in options],
                   answer=answer, hint=_text(hint), category=_text(category), meta={"source": file})


def load_mcq(path, fmt: str, image_root: str | None = None, on_bad_input: str = "error",
             cache_dir: str | None = None) -> tuple[list, dict]:
    """Read MCQ items from local files (a path, a folder, a glob or a list of them) read with `datasets`.

    fmt "mmbench": MMBench v1.1 TSV (base64 `image`) or parquet (`image` bytes / datasets Image); columns
      index, question, hint, A..I (empty cells are absent options; the remaining ones keep their letter
      order), answer (a letter), category. Circular copies (index >= 1e6 whose index mod 1e6 is present) are
      skipped — circular evaluation rotates the options itself — and an `image` cell of <= 64 characters
      that names another row's index borrows that row's image (VLMEvalKit's de-duplicated TSVs).
    fmt "mmmu": MMMU parquet (id, question, options = a Python list literal, answer letter, image_1..image_7,
      question_type, subfield, topic_difficulty). Open questions (question_type "open", or no options) are
      skipped and counted. Missing image_k are dropped and `<image k>` placeholders renumbered to the kept
      images; category is the subject parsed from the id ("validation_Art_Theory_3" -> "Art_Theory").
    fmt "jsonl": our fields {id, images: [paths], question, options: [..], answer: letter or 0-based int,
      hint, category}; relative paths are under `image_root` (default: the file's folder).

    A malformed row (also: an id seen before) raises `DataError` naming the file and the row (0-based data
    row; TSV header excluded), or with on_bad_input="skip" is skipped and counted. Returns (items, summary) with summary
    {format, files, rows, loaded, skipped, by_reason, skipped_rows: [{file, row, id, reason, detail}]}.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if on_bad_input not in ("error", "skip"):
        raise ValueError(f"on_bad_input must be 'error' or 'skip', not {on_bad_input!r}")
    files = _expand(path)
    items, skipped, seen = [], [], set()

    def skip(file, i, ident, reason, detail=None):
        skipped.append({"file": file, "row": i, "id": ident, "reason": reason, "detail": detail or reason})

    def add(item):
        if item.id in seen:
            raise _Bad("duplicate id", f"id {item.id!r} occurs earlier")
        seen.add(item.id)
        items.append(item)

    for file in files:
        base_dir = image_root if image_root is not None else os.path.dirname(os.path.abspath(file))

        def bad(i, ident, err, file=file):
            if on_bad_input == "skip":
                skip(file, i, ident, err.reason, str(err))
                return
            raise DataError(f"{file}: row {i}" + (f" (id {ident})" if ident is not None else "") + f": {err}")

        if fmt == "jsonl":
            for i, row in _rows_jsonl(file, cache_dir, bad):
                ident = _text(row.get("id"))
                try:
                    if ident is None:
                        raise _Bad("missing id", "no id")
                    add(_jsonl_item(row, ident, file, base_dir))
                except (_Bad, ValueError) as e:
                    bad(i, ident, e if isinstance(e, _Bad) else _Bad("invalid item", str(e)))
            continue
        ds = _read_table(file, cache_dir)
        if fmt == "mmbench":
            missing = [c for c in ("question", "answer", "A", "B") if c not in ds.column_names]
            if missing:
                raise DataError(f"{file}: not the MMBench layout (missing column(s) {', '.join(missing)})")
            ids = [_id_text(x) for x in ds["index"]] if "index" in ds.column_names else \
                [str(i) for i in range(len(ds))]
            row_of = {ident: i for i, ident in enumerate(ids)}

            def resolve(cell, ds=ds, row_of=row_of, base_dir=base_dir):
                if isinstance(cell, str) and len(cell.strip()) <= 64 and cell.strip() in row_of:
                    target = ds[row_of[cell.strip()]]["image"]
                    if isinstance(target, str) and len(target.strip()) <= 64:
                        raise _Bad("bad image", f"image reference {cell!r} points to another reference")
                    cell = target
                return decode_image(cell, base_dir)

            for i, ident in enumerate(ids):
                if ident.isdigit() and int(ident) >= MMBENCH_CIRCULAR_OFFSET and \
                        str(int(ident) % MMBENCH_CIRCULAR_OFFSET) in row_of:
                    skip(file, i, ident, "circular copy")
                    continue
                try:
                    add(_mmbench_item(ds[i], ident, file, resolve))
                except (_Bad, ValueError) as e:
                    bad(i, ident, e if isinstance(e, _Bad) else _Bad("invalid item", str(e)))
        else:  # mmmu
            missing = [c for c in ("id", "question", "options", "answer", "image_1") if c not in ds.column_names]
            if missing:
                raise DataError(f"{file}: not the MMMU layout (missing column(s) {', '.join(missing)})")
            for i in range(len(ds)):
                row = ds[i]
                ident = _text(row.get("id")) or str(i)
                try:
                    out = _mmmu_item(row, ident, file, base_dir)
                    if isinstance(out, str):
                        skip(file, i, ident, out)
                    else:
                        add(out)
                except (_Bad, ValueError) as e:
                    bad(i, ident, e if isinstance(e, _Bad) else _Bad("invalid item", str(e)))
    by_reason: dict = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    summary = {"format": fmt, "files": files, "rows": len(items) + len(skipped), "loaded": len(items),
               "skipped": len(skipped), "by_reason": by_reason, "skipped_rows": skipped}
    return items, summary


# ---------------------------------------------------------------------------------------------- shapes

COUNT_WORDS = ("one", "two", "three", "four")
SHAPES_MCQ_KINDS = ("colour", "shape", "count", "relation")


def _refer(obj: dict, objs: list) -> str | None:
    """'the circle' when the shape is unique in the scene, else 'the red circle' when that is, else None."""
    if sum(o["shape"] == obj["shape"] for o in objs) == 1:
        return f"the {obj['shape']}"
    if sum(o["shape"] == obj["shape"] and o["colour"] == obj["colour"] for o in objs) == 1:
        return f"the {obj['colour']} {obj['shape']}"
    return None


def shapes_questions(attributes: dict) -> list:
    """Every answerable question of one `shapes` scene: (kind, key, question, answer, vocabulary).

    colour: "What colour is the {shape}?" for each shape occurring once; shape: "What shape is the {colour}
    object?" for each colour occurring once; count: "How many shapes are in the image?" (one..four);
    relation: horizontal pairs "Which shape is to the left of X?" / "...to the right of X?", vertical pairs
    "Which shape is above X?" / "...below X?", left-to-right triples the same two questions about the middle
    object (the only ones with a single answer); X names the reference object unambiguously ('the circle'
    or 'the red circle'), the answer is the other object's shape. Positions come from the grid cells.
    """
    from .shapes import COLOURS, SHAPES
    objs = attributes["objects"]
    out = []
    for shape in SHAPES:
        hits = [o for o in objs if o["shape"] == shape]
        if len(hits) == 1:
            out.append(("colour", shape, f"What colour is the {shape}?", hits[0]["colour"], COLOURS))
    for colour in COLOURS:
        hits = [o for o in objs if o["colour"] == colour]
        if len(hits) == 1:
            out.append(("shape", colour, f"What shape is the {colour} object?", hits[0]["shape"], SHAPES))
    if 1 <= len(objs) <= len(COUNT_WORDS):
        out.append(("count", "count", "How many shapes are in the image?", COUNT_WORDS[len(objs) - 1], COUNT_WORDS))
    relation = attributes.get("relation")
    pairs = []  # (asked-about object, relation phrase, answer object)
    if relation == "h" and len(objs) == 2:
        a, b = sorted(objs, key=lambda o: o["cell"][1])
        pairs = [(b, "to the left of", a), (a, "to the right of", b)]
    elif relation == "v" and len(objs) == 2:
        a, b = sorted(objs, key=lambda o: o["cell"][0])
        pairs = [(b, "above", a), (a, "below", b)]
    elif relation == "row3" and len(objs) == 3:
        a, b, c = sorted(objs, key=lambda o: o["cell"][1])
        pairs = [(b, "to the left of", a), (b, "to the right of", c)]
    for ref, phrase, ans in pairs:
        name = _refer(ref, objs)
        if name is not None:
            key = f"{phrase.replace('to the ', '').replace(' ', '-')}:{name[4:].replace(' ', '-')}"
            out.append(("relation", key, f"Which shape is {phrase} {name}?", ans["shape"], SHAPES))
    return out


def shapes_mcq(records: list, seed: int = 0, per_image: int | None = None,
               kinds: tuple = SHAPES_MCQ_KINDS) -> list:
    """A deterministic MCQ set over `shapes` images, answerable from each record's attribute record.

    For every record (in order), the questions of `shapes_questions` whose kind is in `kinds`; with
    `per_image`, a seeded sample of at most that many of them (kept in generation order). Each question
    has 4 options: the answer and 3 distinct distractors drawn from the same vocabulary (colours, shapes,
    or one..four), shuffled. All randomness comes from an RNG seeded by (seed, image id), so an image's
    items do not depend on the other records. Item ids are "shapes:{image_id}:{kind}:{key}"; category is
    the kind.
    """
    items = []
    for rec in records:
        if not rec.attributes:
            raise ValueError(f"record {rec.image_id} has no attribute record (not a `shapes` image?)")
        rng = random.Random(f"shapes-mcq:{seed}:{rec.image_id}")
        questions = [q for q in shapes_questions(rec.attributes) if q[0] in kinds]
        if per_image is not None and len(questions) > per_image:
            keep = sorted(rng.sample(range(len(questions)), int(per_image)))
            questions = [questions[i] for i in keep]
        for kind, key, question, answer, vocab in questions:
            distractors = rng.sample([v for v in vocab if v != answer], 3)
            options = [answer] + distractors
            rng.shuffle(options)
            items.append(MCQItem(id=f"shapes:{rec.image_id}:{kind}:{key}", images=[rec.path], question=question,
                                 options=options, answer=options.index(answer), category=kind,
                                 meta={"image_id": rec.image_id, "kind": kind}))
    return items


# ---------------------------------------------------------------------------------------------- scoring

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


def _encoder_factory(encoder_factory_or_processor, max_response_tokens: int, cache_size: int = 512):
    """A prompt -> Encoder function (LRU-cached): from a processor, an Encoder (its processor and response
    limit are reused), or a callable returned as is (cached)."""
    from .logprobs import Encoder
    x = encoder_factory_or_processor
    if isinstance(x, Encoder):
        proc, limit = x.processor, x.max_response_tokens

        def make(prompt):
            return Encoder(proc, prompt, max_response_tokens=limit)
    elif hasattr(x, "image_processor") and hasattr(x, "tokenizer"):
        def make(prompt):
            return Encoder(x, prompt, max_response_tokens=max_response_tokens)
    elif callable(x):
        make = x
    else:
        raise TypeError("encoder_factory_or_processor must be a processor, an Encoder or a prompt -> Encoder callable")
    cache: OrderedDict = OrderedDict()

    def get(prompt):
        if prompt in cache:
            cache.move_to_end(prompt)
            return cache[prompt]
        enc = make(prompt)
        cache[prompt] = enc
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return enc
    return get


def concat_batches(batches: list, keys: list, pad_id: int):
    """One `SeqBatch` from several (right-padded to the longest); batches with equal `keys` show the same
    images, which are stored once (the first batch's pixels)."""
    import torch
    from .logprobs import SeqBatch
    length = max(b.input_ids.shape[1] for b in batches)
    ids, att, comp, pos, rimg, pix, grids = [], [], [], [], [], [], []
    offset_of: dict = {}
    n_img = 0
    for b, key in zip(batches, keys):
        n, pad = b.input_ids.shape
        pad = length - pad
        ids.append(torch.cat([b.input_ids, torch.full((n, pad), pad_id, dtype=b.input_ids.dtype)], 1))
        att.append(torch.cat([b.attention_mask, torch.zeros((n, pad), dtype=b.attention_mask.dtype)], 1))
        comp.append(torch.cat([b.completion_mask, torch.zeros((n, pad), dtype=torch.bool)], 1))
        pos.append(torch.cat([b.position_ids, torch.zeros((3, n, pad), dtype=b.position_ids.dtype)], 2))
        if key not in offset_of:
            offset_of[key] = n_img
            pix.append(b.pixel_values)
            grids.append(b.image_grid_thw)
            n_img += b.image_grid_thw.shape[0]
        rimg.append(b.row_image + offset_of[key])
    return SeqBatch(torch.cat(ids), torch.cat(att), torch.cat(comp), torch.cat(pos, 1), torch.cat(rimg),
                    torch.cat(pix), torch.cat(grids))


def _chunks(units: list, sizes: list, batch_size: int):
    """Consecutive runs of units with at most `batch_size` rows in all (at least one unit per run)."""
    run, rows = [], 0
    for u, s in zip(units, sizes):
        if run and rows + s > batch_size:
            yield run
            run, rows = [], 0
        run.append(u)
        rows += s
    if run:
        yield run


def loglik_scores(model, encoder_for, items: list, pres: list, batch_size: int = 16,
                  progress: bool = False) -> list:
    """Mean token log-probs ℓ̄ of every presentation's option responses (a list per presentation, in shown
    order). Units (one presentation = its N option rows) are packed `batch_size` rows per forward; the
    rotations of one item in a forward share one image. Adds `truncated` (responses cut by the Encoder's
    `max_response_tokens`) to each result dict."""
    import torch
    from tqdm import tqdm
    from .logprobs import completion_logps
    model.eval()
    out = []
    runs = list(_chunks(pres, [len(p.responses) for p in pres], max(1, int(batch_size))))
    encoded = (None, None)  # (item index, its encoded image): an item's rotations come one after another
    for run in tqdm(runs, desc="mcq loglik", disable=not progress, mininterval=2.0):
        batches, keys, truncated = [], [], []
        enc = None
        for p in run:
            enc = encoder_for(p.prompt)
            if encoded[0] != p.item_index:
                encoded = (p.item_index, enc.encode_images([item_image(items[p.item_index])]))
            batches.append(enc.build_encoded(*encoded[1], [(0, r) for r in p.responses]))
            keys.append(p.item_index)
            lengths = [len(x) for x in enc.tokenizer(p.responses, add_special_tokens=False)["input_ids"]]
            truncated.append(sum(n > enc.max_response_tokens for n in lengths))
        batch = concat_batches(batches, keys, enc.pad_id).to(model.device)
        with torch.no_grad():
            means = completion_logps(model, batch, enc.image_token_id).means.double().cpu().tolist()
        k = 0
        for p, t in zip(run, truncated):
            n = len(p.responses)
            out.append({"scores": means[k:k + n], "truncated": t})
            k += n
    return out


def generation_inputs(encoders: list, images: list) -> dict:
    """Left-padded generation inputs of rows with their own prompts (one Encoder and one image per row),
    built as `cwdpo.evaluate.prompt_batch` builds them for a single prompt."""
    import torch
    pixel_values, grids = encoders[0].encode_images(images)
    prompts = [enc.prompt_ids(g)[0] for enc, g in zip(encoders, grids)]
    length = max(len(p) for p in prompts)
    pad_id = encoders[0].pad_id
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p):] = torch.tensor(p)
        attention_mask[i, length - len(p):] = 1
    mm = (input_ids == encoders[0].image_token_id).to(torch.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
            "pixel_values": pixel_values, "image_grid_thw": grids}


def generate_answers(model, encoder_for, items: list, pres: list, batch_size: int = 16,
                     max_new_tokens: int = 16, progress: bool = False) -> list:
    """Greedy outputs (whitespace-normalised, special tokens dropped) of `batch_size` presentations per
    `generate` call."""
    import torch
    from tqdm import tqdm
    model.eval()
    out = []
    starts = range(0, len(pres), max(1, int(batch_size)))
    for s in tqdm(starts, desc="mcq generate", disable=not progress, mininterval=2.0):
        run = pres[s:s + max(1, int(batch_size))]
        encs = [encoder_for(p.prompt) for p in run]
        cache: dict = {}
        images = []
        for p in run:
            if p.item_index not in cache:
                cache[p.item_index] = item_image(items[p.item_index])
            images.append(cache[p.item_index])
        inputs = {k: v.to(model.device) for k, v in generation_inputs(encs, images).items()}
        with torch.no_grad():
            seqs = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                                  eos_token_id=encs[0].eos_id, pad_token_id=encs[0].pad_id)
        texts = encs[0].tokenizer.batch_decode(seqs[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [{"output": " ".join(t.split())} for t in texts]
    return out


def evaluate_mcq(model, encoder_factory_or_processor, items: list, scoring: str = "loglik",
                 circular: bool = False, batch_size: int = 16, *, max_new_tokens: int = 16,
                 max_response_tokens: int = 256, scorer=None, progress: bool = False) -> dict:
    """Accuracy of `model` on `items` (deterministic: no sampling; same inputs, same batches).

    scoring "loglik": the prediction is the letter whose response "<letter>. <option>" has the highest mean
    token log-prob (ties: the earliest letter); "generate": `parse_letter` of the greedy output (None =
    wrong). `encoder_factory_or_processor`: a processor (Encoders built with `max_response_tokens`), an
    Encoder (its processor and limit reused) or a prompt -> Encoder callable; one Encoder per distinct
    prompt. `scorer(items, presentations) -> [{"pred": letter position or None, ...}]` replaces the model
    (tests; other scorers). `batch_size`: option rows per forward (loglik) or prompts per generate call.

    With `circular`, every N-option item is shown under its N rotations and is correct only when all are;
    otherwise only rotation 0 (the source order) is shown. Returns {accuracy, n, correct, accuracy_plain
    (rotation 0 alone), accuracy_circular (when circular), by_category {cat: {n, accuracy,
    accuracy_plain}}, unparsed, truncated_responses, items: [{id, category, answer, n_options, correct,
    correct_plain, predictions: [{rotation, order, answer_letter, pred_letter, pred_option, correct,
    scores | output}]}], settings}.
    """
    if scoring not in ("loglik", "generate"):
        raise ValueError(f"scoring must be 'loglik' or 'generate', not {scoring!r}")
    pres = presentations(items, circular)
    if scorer is not None:
        results = list(scorer(items, pres))
        if len(results) != len(pres):
            raise ValueError(f"scorer returned {len(results)} results for {len(pres)} presentations")
    else:
        encoder_for = _encoder_factory(encoder_factory_or_processor, max_response_tokens)
        if scoring == "loglik":
            results = loglik_scores(model, encoder_for, items, pres, batch_size, progress)
        else:
            results = generate_answers(model, encoder_for, items, pres, batch_size, max_new_tokens, progress)
    records = [{"id": it.id, "category": it.category, "answer": it.answer, "n_options": len(it.options),
                "predictions": []} for it in items]
    unparsed = truncated = 0
    for p, res in zip(pres, results):
        item = items[p.item_index]
        res = dict(res)
        if "pred" in res:
            pred = res.pop("pred")
        elif "scores" in res:
            scores = res["scores"]
            pred = max(range(len(scores)), key=lambda j: (scores[j], -j))
        else:
            shown = [render_text(item.options[src].strip(), len(item.images)) for src in p.order]
            pred = parse_letter(res.get("output", ""), shown)
        if pred is not None and not 0 <= int(pred) < len(p.order):
            pred = None
        unparsed += pred is None
        truncated += int(res.pop("truncated", 0))
        pos = p.answer_position(item)
        rec = {"rotation": p.rotation, "order": list(p.order), "answer_letter": LETTERS[pos],
               "pred_letter": None if pred is None else LETTERS[int(pred)],
               "pred_option": None if pred is None else p.order[int(pred)],
               "correct": pred is not None and int(pred) == pos, **res}
        records[p.item_index]["predictions"].append(rec)
    for rec in records:
        rec["correct_plain"] = bool(rec["predictions"][0]["correct"])
        rec["correct"] = all(x["correct"] for x in rec["predictions"])

    def acc(rs, key):
        return sum(r[key] for r in rs) / len(rs) if rs else float("nan")

    by_category = {}
    for cat in sorted({r["category"] or "(none)" for r in records}):
        rs = [r for r in records if (r["category"] or "(none)") == cat]
        by_category[cat] = {"n": len(rs), "accuracy": acc(rs, "correct"), "accuracy_plain": acc(rs, "correct_plain")}
    result = {"accuracy": acc(records, "correct"), "n": len(records), "correct": sum(r["correct"] for r in records),
              "accuracy_plain": acc(records, "correct_plain"), "by_category": by_category,
              "unparsed": unparsed, "truncated_responses": truncated, "presentations": len(pres),
              "items": records,
              "settings": {"scoring": scoring, "circular": bool(circular), "batch_size": int(batch_size),
                           "max_new_tokens": int(max_new_tokens) if scoring == "generate" else None,
                           "max_response_tokens": int(max_response_tokens), "custom_scorer": scorer is not None,
                           "response_format": "<letter>. <option>", "letters": LETTERS,
                           "rotation": "letter j shows option (j + r) mod N", "instruction": ANSWER_INSTRUCTION,
                           "multi_image": "side by side, left to right, common height, 8-px white gap"}}
    if circular:
        result["accuracy_circular"] = result["accuracy"]
    return result
