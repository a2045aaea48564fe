"""Loaders of local multiple-choice files in the public datasets' layouts (MMBench TSV/parquet, MMMU
parquet) and our JSONL, read with `datasets` (JSONL line by line with `cwdpo.data.iter_jsonl`)."""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import glob
import math
import os
import re

from ..data import DataError, JsonlLineError, image_size_problem, inside, iter_jsonl, verify_image
from .items import _PLACEHOLDER, LETTERS, InvalidItem, MCQItem, _lazy_image, composed_size, image_size

MMBENCH_CIRCULAR_OFFSET = 1_000_000  # MMBench TSVs carry circular copies of row i as index i + k * 1e6
MMMU_MAX_IMAGES = 7
FORMATS = ("mmbench", "mmmu", "jsonl")
_Bad = InvalidItem


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _text(v) -> str | None:
    """A cell as stripped text; None for None/NaN/empty."""
    if _is_missing(v):
        return None
    s = str(v).strip()
    return s or None


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


def _rows_jsonl(file: str, bad):
    """(row index among the non-empty lines, dict) of a JSON-lines file; a line that is not a JSON object
    goes to `bad` (named and skipped, or an error)."""
    for i, (_, _, row) in enumerate(iter_jsonl(file)):
        if isinstance(row, JsonlLineError):
            bad(i, None, _Bad("invalid JSON", row.reason))
        elif not isinstance(row, dict):
            bad(i, None, _Bad("invalid JSON", "line is not a JSON object"))
        else:
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
            return image_path(path, base_dir)
        try:
            data = base64.b64decode("".join(s.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _Bad("bad image", f"image is neither base64 nor an existing file: {s[:80]!r}") from None
        return decode_image(data)
    raise _Bad("bad image", f"unsupported image cell of type {type(value).__name__}")


def image_path(path: str, base_dir: str | None) -> str:
    """`path` once it is known to lie inside the image root `base_dir` (`..` and absolute paths resolved)
    and to decode into an image every job can take (`cwdpo.data.verify_image`); else InvalidItem."""
    if base_dir is not None and not inside(path, base_dir):
        raise _Bad("bad image", f"image path {path} is outside the image root {os.path.abspath(base_dir)}")
    problem = verify_image(path)
    if problem:
        raise _Bad("bad image", problem[1])
    return path


def check_composition(images: list) -> None:
    """Several images of an item are composed side by side (`compose_images`): the composition too must be
    an image the processor takes (two images of 1×200 and 200×1 compose to 40000×200)."""
    if len(images) > 1:
        problem = image_size_problem(*composed_size([image_size(x) for x in images]))
        if problem:
            raise _Bad("bad image", f"its {len(images)} images composed side by side: {problem[1]}")


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
    check_composition(images)

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
        if not inside(full, base_dir):
            raise _Bad("bad image", f"image path {full} is outside the image root {os.path.abspath(base_dir)}")
        if not os.path.isfile(full):
            raise _Bad("bad image", f"image file not found: {full}")
        images.append(image_path(full, base_dir))
    check_composition(images)
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
            for i, row in _rows_jsonl(file, bad):
                ident = _text(row.get("id"))
                try:
                    if ident is None:
                        raise _Bad("missing id", "no id")
                    add(_jsonl_item(row, ident, file, base_dir))
                except ValueError as e:  # InvalidItem (a ValueError) or a bad field
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
                except ValueError as e:  # InvalidItem (a ValueError) or a bad field
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
                except ValueError as e:  # InvalidItem (a ValueError) or a bad field
                    bad(i, ident, e if isinstance(e, _Bad) else _Bad("invalid item", str(e)))
    by_reason: dict = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    summary = {"format": fmt, "files": files, "rows": len(items) + len(skipped), "loaded": len(items),
               "skipped": len(skipped), "by_reason": by_reason, "skipped_rows": skipped}
    return items, summary
