"""Datasets: the Karpathy-format loader (COCO, Flickr30k, `shapes`), stage splits and preference pairs I/O.

Karpathy format (`dataset_coco.json`): {"images": [{"filename", "filepath"?, "split", "imgid", "cocoid"?,
"sentences": [{"raw", "tokens"}]}]}. Flickr30k's file has no `filepath`; the image path is then
`image_root/filename`. Extra fields (`attributes` of `shapes`, `domain` of NoCaps-style files) are kept.

No torch import: the data rules stay light.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field


class DataError(ValueError):
    """Bad input data; the message names the file and the line or image id."""


@dataclass
class ImageRecord:
    image_id: str
    path: str
    split: str
    captions: list
    attributes: dict | None = None
    domain: str | None = None
    extra: dict = field(default_factory=dict)
    qa: list = field(default_factory=list)  # instruction turns {kind, prompt, answer, negative} (`shapes` qa)


@dataclass
class BadInputLog:
    """Items skipped under `on_bad_input: skip`, counted per reason for the run summary."""

    skipped: list = field(default_factory=list)

    def add(self, where: str, reason: str, image_id=None, kind: str | None = None):
        """`kind`: the reason without the item's own details (counted in `by_reason`); by default
        `reason_kind(reason)`."""
        self.skipped.append({"where": where, "reason": reason, "image_id": image_id,
                             "kind": kind or reason_kind(reason)})

    def summary(self) -> dict:
        counts: dict = {}
        for item in self.skipped:
            counts[item["kind"]] = counts.get(item["kind"], 0) + 1
        return {"skipped": len(self.skipped), "by_reason": counts, "items": self.skipped}


def reason_kind(reason: str) -> str:
    """A reason without what is particular to one item: the text before its first ': ' or ' (', numbers as N
    ('image file not found: x.png' → 'image file not found')."""
    return re.sub(r"(?<![\w-])\d+(?!\w)", "N", re.split(r": | \(", reason, maxsplit=1)[0]).strip()


def _fail_or_skip(on_bad_input: str, log: BadInputLog | None, where: str, reason: str, image_id=None,
                  kind: str | None = None):
    if on_bad_input == "skip":
        if log is not None:
            log.add(where, reason, image_id, kind)
        return
    raise DataError(f"{where}: {reason}")


# What every image job can take: Qwen2.5-VL's processor refuses an aspect ratio of 200 or more (`smart_resize`),
# PIL refuses to decode more than twice MAX_IMAGE_PIXELS (a decompression bomb), and an image of 16- or 32-bit
# samples (PIL modes I, I;16*, F) is clipped to white by the RGB conversion every job makes.
MAX_ASPECT_RATIO = 200
MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS (its warning threshold)
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def image_size_problem(width: int, height: int) -> tuple | None:
    """(kind, message) of why an image (or a composition of images) of `width` × `height` cannot be used,
    or None."""
    if width < 1 or height < 1:
        return "empty image", f"image of {width}×{height} pixels is empty"
    if width * height > MAX_IMAGE_PIXELS:
        return "image too large", f"image of {width}×{height} pixels is over the limit of {MAX_IMAGE_PIXELS} pixels"
    ratio = max(width, height) / min(width, height)
    if ratio >= MAX_ASPECT_RATIO:
        return "aspect ratio out of range", (f"image of {width}×{height} pixels has an aspect ratio of {ratio:.0f} "
                                             f"(the VLM's processor takes below {MAX_ASPECT_RATIO})")
    return None


def image_problem(im) -> tuple | None:
    """(kind, message) of why an opened PIL image cannot be used (size, aspect ratio, bit depth), or None."""
    problem = image_size_problem(*im.size)
    if problem:
        return problem
    if im.mode not in EIGHT_BIT_MODES:
        return "not 8-bit", (f"image of mode {im.mode} (16- or 32-bit samples) would turn white when converted to "
                             "RGB; convert it to 8-bit")
    return None


def verify_image(path: str) -> tuple | None:
    """None when `path` decodes as a usable image, else (kind, reason): missing, unreadable, corrupt, or its
    size, aspect ratio or bit depth out of range (`image_problem`)."""
    from PIL import Image
    if not os.path.isfile(path):
        return "image file not found", f"image file not found: {path}"
    try:
        with Image.open(path) as im:
            problem = image_problem(im)  # from the header, before anything is decoded
            if problem:
                return problem[0], f"{problem[1]}: {path}"
            im.verify()  # checks the file's structure (PNG CRCs, JPEG markers) without a full decode
        with Image.open(path) as im:
            im.load()  # and that it decodes
    except Exception as e:  # PIL raises many types for corrupt files
        return "corrupt or unreadable image", f"corrupt or unreadable image {path}: {type(e).__name__}: {e}"
    return None


_CAPTION_FILES: dict = {}  # (path, mtime_ns, size) → (parsed caption file, where its first non-UTF-8 byte is)


def _caption_file(json_path: str) -> tuple:
    """(the parsed caption file, None or ('file:line', 'not UTF-8 text (...)')), read once per process while
    unchanged (a job reads its splits separately). The file is UTF-8; bytes that are not are kept as lone
    surrogates (`surrogateescape`), so `load_karpathy` can stop naming file:line or skip just the entries
    that hold them."""
    try:
        st = os.stat(json_path)
    except FileNotFoundError:
        raise DataError(f"{json_path}: caption file not found") from None
    key = (os.path.abspath(json_path), st.st_mtime_ns, st.st_size)
    if key not in _CAPTION_FILES:
        not_utf8 = None
        try:
            try:
                with open(json_path, encoding="utf-8") as f:
                    doc = json.load(f)
            except UnicodeDecodeError:
                with open(json_path, "rb") as f:
                    raw = f.read()
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = raw.count(b"\n", 0, e.start) + 1
                    not_utf8 = (f"{json_path}:{line}",
                                f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})")
                with open(json_path, encoding="utf-8", errors="surrogateescape") as f:
                    doc = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{json_path}:{e.lineno}: not valid JSON ({e.msg})") from None
        _CAPTION_FILES[key] = (doc, not_utf8)
    return _CAPTION_FILES[key]


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, kept by surrogateescape


def _has_undecodable(node) -> bool:
    if isinstance(node, str):
        return bool(_NOT_UTF8.search(node))
    if isinstance(node, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in node.items())
    if isinstance(node, list):
        return any(_has_undecodable(v) for v in node)
    return False


def inside(path: str, root: str) -> bool:
    """Whether `path` stays inside the folder `root` once `..` and absolute parts are resolved (symbolic
    links inside the root are followed as they are: a linked image folder is fine)."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(path)]) == root


def load_karpathy(json_path: str, image_root: str | None = None, splits=None, on_bad_input: str = "error",
                  bad_log: BadInputLog | None = None, check_files: bool = True,
                  verify_images: bool = False) -> list[ImageRecord]:
    """Read a Karpathy-format caption file; return the images of `splits` (all when None), in file order.

    Every image needs a unique id (`cocoid`, else `imgid`), string `filename` and `split`, and a non-empty
    `sentences` list of non-empty `raw` captions; its path must stay inside `image_root`, and with
    `check_files` the image file must exist. The file is UTF-8. A violation raises `DataError` naming the
    file and the image (index and id; file:line for bytes that are not UTF-8), or with
    `on_bad_input='skip'` the image is skipped and logged in `bad_log` (a repeated id: the later entry).
    """
    image_root = image_root if image_root is not None else os.path.dirname(json_path)
    doc, not_utf8 = _caption_file(json_path)
    if not_utf8 and on_bad_input != "skip":
        raise DataError(": ".join(not_utf8))
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{json_path}: top level must be an object with an 'images' list (Karpathy format)")
    wanted = None if splits is None else set([splits] if isinstance(splits, str) else splits)
    out = []
    first_of: dict = {}  # image id → index of its first entry
    n_undecodable = 0
    for idx, img in enumerate(doc["images"]):
        ident = img.get("cocoid", img.get("imgid", idx)) if isinstance(img, dict) else idx
        where = f"{json_path}: images[{idx}] (id {ident})"
        if not isinstance(img, dict):
            _fail_or_skip(on_bad_input, bad_log, where, "entry is not an object")
            continue
        if not_utf8 and _has_undecodable(img):
            n_undecodable += 1
            _fail_or_skip(on_bad_input, bad_log, where, "not UTF-8 text", str(ident))
            continue
        if str(ident) in first_of:  # a later entry never replaces (nor hides) the first one
            # logged without an image id: the run leaves out this entry, not the first one of that id
            _fail_or_skip(on_bad_input, bad_log, where,
                          f"duplicate image id {ident} (first at images[{first_of[str(ident)]}])")
            continue
        first_of[str(ident)] = idx
        missing = [k for k in ("filename", "split", "sentences") if k not in img]
        if missing:
            _fail_or_skip(on_bad_input, bad_log, where, f"missing field(s) {', '.join(missing)}", str(ident))
            continue
        wrong = [k for k in ("filename", "split", "filepath") if k in img and not isinstance(img[k], str)]
        if wrong:
            _fail_or_skip(on_bad_input, bad_log, where, f"field(s) {', '.join(wrong)} must be strings", str(ident))
            continue
        if wanted is not None and img["split"] not in wanted:
            continue
        sentences = img["sentences"]
        if not isinstance(sentences, list) or not sentences:
            _fail_or_skip(on_bad_input, bad_log, where, "no sentences", str(ident))
            continue
        captions = []
        bad = None
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if not isinstance(raw, str) or not normalise_caption(raw):
                bad = f"sentences[{j}] has an empty or missing 'raw' caption"
                break
            captions.append(normalise_caption(raw))
        if bad:
            _fail_or_skip(on_bad_input, bad_log, where, bad, str(ident))
            continue
        path = os.path.join(image_root, img.get("filepath", ""), img["filename"])
        if not inside(path, image_root):
            problem = ("image path outside the image root",
                       f"image path {path} is outside the image root {os.path.abspath(image_root)}")
        else:
            problem = verify_image(path) if verify_images else (
                ("image file not found", f"image file not found: {path}")
                if check_files and not os.path.isfile(path) else None)
        if problem:
            _fail_or_skip(on_bad_input, bad_log, where, problem[1], str(ident), kind=problem[0])
            continue
        extra = {k: v for k, v in img.items() if k not in
                 ("filename", "filepath", "split", "sentences", "attributes", "domain", "sentids", "qa")}
        if all(isinstance(s, dict) and "template" in s for s in sentences):
            extra["sentence_meta"] = [{"template": s["template"], "slots": s["slots"]} for s in sentences]
        out.append(ImageRecord(image_id=str(ident), path=path, split=img["split"], captions=captions,
                               attributes=img.get("attributes"), domain=img.get("domain"), extra=extra,
                               qa=list(img.get("qa") or [])))
    if not_utf8 and not n_undecodable and bad_log is not None:  # the bytes are outside every image entry
        bad_log.add(*not_utf8)
    return out


def split_counts(json_path: str) -> dict:
    """{split: images} of a Karpathy-format file (every entry with a `split`), for messages."""
    doc, _ = _caption_file(json_path)
    counts: dict = {}
    for img in doc.get("images", []) if isinstance(doc, dict) else []:
        if isinstance(img, dict) and isinstance(img.get("split"), str):
            counts[img["split"]] = counts.get(img["split"], 0) + 1
    return counts


def _no_images(json_path: str, splits, after: str = "") -> DataError:
    have = ", ".join(f"{k} ({v})" for k, v in sorted(split_counts(json_path).items())) or "none"
    return DataError(f"{json_path}: no images in split(s) {', '.join(splits)}{after}; the file's splits: {have}")


def load_records(d, bad_log: BadInputLog | None = None) -> list[ImageRecord]:
    """All images of the splits of a data spec (a `cwdpo.specs.DataSpec`), whatever its `stage`.

    `validated` is the report of the `validate_data` rule, which checked every image once (file present,
    decodes, captions non-empty): with `on_bad_input: skip` the images it lists are left out here
    without checking the files again; with `error` that rule has already stopped the workflow.
    """
    excluded = set()
    if d.validated and os.path.isfile(d.validated):
        excluded = {x["image_id"] for x in read_json(d.validated).get("items", []) if x.get("image_id")}
    records = load_karpathy(d.json, d.image_root, d.splits, on_bad_input=d.on_bad_input, bad_log=bad_log,
                            check_files=not d.validated)
    kept = [r for r in records if r.image_id not in excluded]
    if not kept:  # every job needs images: say which file and splits instead of failing later
        raise _no_images(d.json, d.splits, " (after leaving out bad input)" if records or excluded else "")
    return kept


def stage_records(records: list, d) -> list:
    """The share of `records` the spec's `stage` takes (stage1 / stage2 of `stage_split`); all without one.
    An empty share raises `DataError` naming the file, the splits and stage1.fraction."""
    if d.stage is None:
        return records
    first, second = stage_split(records, d.stage1_fraction)
    share = first if d.stage == "stage1" else second
    if not share:
        raise DataError(f"{d.json}: the {d.stage} share of split(s) {', '.join(d.splits)} is empty "
                        f"({len(records)} image(s), stage1.fraction {d.stage1_fraction}); add images or change "
                        "stage1.fraction")
    return share


def validate_data(spec, out: str) -> list:
    """`cwdpo validate-data` (a `ValidateSpec`): every image and caption checked once, before any training
    job — file present, decodes, non-empty captions, required Karpathy fields. `error`: raises `DataError`
    naming file and image; `skip`: writes them to the report. Returns the skipped items."""
    bad = BadInputLog()
    records = load_karpathy(spec.json, spec.image_root, None, on_bad_input=spec.on_bad_input, bad_log=bad,
                            verify_images=True)
    if not records:
        raise DataError(f"{spec.json}: no usable images" + (f" ({len(bad.skipped)} skipped as bad input)"
                                                            if bad.skipped else ""))
    counts: dict = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    write_json(out, {"json": spec.json, "on_bad_input": spec.on_bad_input, "images": counts, **bad.summary()})
    return bad.skipped


def normalise_caption(raw: str) -> str:
    """A caption as every job uses it (training target, reference, source of negatives): runs of whitespace
    collapsed to one space, trailing periods dropped — COCO's raw captions end in ". " or "." about half
    the time and hold double spaces, which a model would otherwise learn to reproduce (scoring tokenizes
    punctuation away; cwdpo's decoded captions are whitespace-normalised the same way)."""
    return re.sub(r"[\s.]*\.$", "", " ".join(raw.split())).strip()


def caption_tokens(raw: str) -> list[str]:
    """Karpathy-style tokens: lower-cased alphanumeric words (the Java-free tokenizer of every caption)."""
    return re.findall(r"[a-z0-9]+", raw.lower())


@dataclass(frozen=True)
class JsonlLineError:
    """A line of a JSONL file that cannot be read; `reason` says why (not UTF-8, not valid JSON)."""
    reason: str


def iter_jsonl(path: str):
    """(line number, 'file:line', parsed object or a `JsonlLineError`) of every non-empty line. Lines are
    decoded as UTF-8 one by one, so a line that is not UTF-8 is named (and can be skipped) like a line
    that is not JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, f"{path}:{lineno}", JsonlLineError(
                    f"not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = JsonlLineError(f"not valid JSON ({e.msg})")
            yield lineno, f"{path}:{lineno}", obj


def read_jsonl(path: str) -> list:
    """Every object of a JSONL file (UTF-8); an unreadable line raises `DataError` naming file:line."""
    rows = []
    for _, where, obj in iter_jsonl(path):
        if isinstance(obj, JsonlLineError):
            raise DataError(f"{where}: {obj.reason}")
        rows.append(obj)
    return rows


def stable_fraction(key: str, salt: str) -> float:
    """A deterministic number in [0, 1) from a string key (independent of Python's hash seed)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def stage_split(records: list, stage1_fraction: float, salt: str = "stage-split") -> tuple[list, list]:
    """Split the finetune images into Stage 1 (`stage1_fraction`, default 75%) and Stage 2 (the rest).

    The assignment orders images by a keyed hash of their id, so it is deterministic and does not depend on
    the file order. Returns (stage1_records, stage2_records), each in file order.
    """
    ranked = sorted(records, key=lambda r: stable_fraction(r.image_id, salt))
    n1 = int(round(stage1_fraction * len(ranked)))
    first = {r.image_id for r in ranked[:n1]}
    return [r for r in records if r.image_id in first], [r for r in records if r.image_id not in first]


def grounding_truth(records: list, objects: str | None = None) -> dict:
    """What the scoring job checks captions against, for a captions file: the attribute records of
    `shapes` images ({"attributes": {id: record}}), or the COCO categories of each image from a file of
    `cwdpo coco-objects` ({"objects": {id: [names]}}); {} when neither exists."""
    if records and all(r.attributes is not None for r in records):
        return {"attributes": {r.image_id: r.attributes for r in records}}
    if objects:
        known = read_json(objects)
        return {"objects": {r.image_id: known.get(r.image_id, []) for r in records}}
    return {}


def write_trivial(spec, out: str) -> None:
    """`cwdpo trivial` (a `TrivialSpec`): the most frequent training caption for every test image."""
    caption = most_frequent_caption(load_records(spec.train))
    test = load_records(spec.test)
    write_json(out, {"captions": {r.image_id: caption for r in test},
                     "references": {r.image_id: r.captions for r in test},
                     "decoding": {"trivial": "most frequent training caption", "caption": caption},
                     **grounding_truth(test, spec.objects)})


def most_frequent_caption(records: list) -> str:
    """The most frequent reference caption (ties: the lexicographically first) — the trivial baseline."""
    counts: dict = {}
    for r in records:
        for c in r.captions:
            key = c.lower().strip()
            counts[key] = counts.get(key, 0) + 1
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def write_atomically(path: str, write) -> None:
    """`write(tmp)` to a temporary file beside `path` (named with the process id, so two processes never share
    one), then rename it onto `path`: a reader sees the old file or the whole new one. On any failure (a full
    disk, a kill signal turned exception, a failed dump) the temporary file is removed and `path` untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json(path: str, obj, indent: int | None = 1):
    """Write JSON atomically (`write_atomically`) with sorted keys, so reruns give identical bytes."""
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=True, allow_nan=True)
            f.write("\n")
    write_atomically(path, dump)


def write_text(path: str, text: str):
    """Write a text file atomically (`write_atomically`)."""
    def dump(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomically(path, dump)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def format_value(v) -> str:
    """A CSV cell: '' for None, 'nan' for NaN, repr for floats (round-trips exactly)."""
    import math
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return str(v)


def write_rows_csv(path: str, rows: list, first: str = "step", skip=()):
    """Write dict rows as CSV: `first` column, then every other key in sorted order (atomic)."""
    cols = sorted({k for r in rows for k in r if k not in skip} - {first})
    lines = [",".join([first] + cols)]
    for r in rows:
        lines.append(",".join([format_value(r.get(first))] + [format_value(r.get(c)) for c in cols]))
    write_text(path, "\n".join(lines) + "\n")


def convert_nocaps(annotations_path: str, out_path: str, split: str = "val") -> dict:
    """NoCaps annotations (COCO style: images[].{id, file_name, domain}, annotations[].{image_id, caption})
    → our Karpathy-format file with each image's `domain` (in-domain / near-domain / out-domain, renamed
    out-of-domain), so the same loader and the per-domain scoring serve it. A file that is not of that
    layout raises `DataError` naming the file and the entry."""
    try:
        doc = read_json(annotations_path)
    except FileNotFoundError:
        raise DataError(f"{annotations_path}: annotations file not found") from None
    except IsADirectoryError:
        raise DataError(f"{annotations_path}: is a directory, not an annotations file") from None
    except UnicodeDecodeError:
        raise DataError(f"{annotations_path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{annotations_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{annotations_path}: top level must be an object with an 'images' list (NoCaps / COCO "
                        "captions layout)")
    annotations = doc.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{annotations_path}: 'annotations' must be a list")
    caps: dict = {}
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise DataError(f"{annotations_path}: annotations[{i}]: needs an 'image_id' and a string 'caption'")
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    images = []
    for idx, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DataError(f"{annotations_path}: images[{idx}]: needs an 'id' and a string 'file_name'")
        if not isinstance(img.get("domain", "entire"), str):
            raise DataError(f"{annotations_path}: images[{idx}] (id {img['id']}): 'domain' must be a string")
        domain = img.get("domain", "entire").replace("out-domain", "out-of-domain")
        sents = [{"raw": c} for c in caps.get(img["id"], [])]
        images.append({"filename": img["file_name"], "imgid": idx, "cocoid": img["id"], "split": split,
                       "domain": domain, "sentences": sents})
    write_json(out_path, {"dataset": "nocaps", "images": images}, indent=None)
    counts: dict = {}
    for im in images:
        counts[im["domain"]] = counts.get(im["domain"], 0) + 1
    return counts
