"""The catalogue of bad configs and bad data, each with the one line it must end with.

Every new option or input check adds a row here: CONFIG_CASES go through `cwdpo validate-config` (one
line, no traceback) and `snakemake -n` (the same verdict, before any job); DATA_CASES through the command
a rule runs, under `data.on_bad_input: error` (one last line `cwdpo <command>: <message>`) and `skip`
(the bad item left out and counted, or the same error where nothing could be skipped).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import micro_specs as specs
from conftest import copy_workflow
from cwdpo.specs import DataSpec, PairsSpec, TrivialSpec, ValidateSpec, to_json

# ---------------------------------------------------------------------------------------------------
# bad configs: (id, YAML text (None: no file at all), the message after "cwdpo validate-config: ", a text
# snakemake's rejection shows too)

NAME_RULE = r"\(it becomes part of a path under results/: letters, digits, '_', '\.' and '-', starting with a " \
    r"letter or digit\)"
CONFIG_CASES = [
    # the file itself (snakemake: "No such file", "not valid JSON or YAML", "keys at top level")
    ("file-missing", None, r"{cfg}: config file not found", "No such file"),
    ("file-empty", "", r"{cfg}: a config must be a YAML mapping with keys at top level \(the file is empty\)",
     "keys at top level"),
    ("file-only-comments", "# nothing\n", r"{cfg}: a config must be a YAML mapping with keys at top level "
     r"\(the file is empty\)", "keys at top level"),
    ("file-list", "- seeds\n- experiment\n", r"{cfg}: a config must be a YAML mapping with keys at top level "
     r"\(its top level is a list\)", "keys at top level"),
    ("file-python-tag", "experiment: !!python/object/apply:os.system [\"touch PWNED\"]\n",
     r"{cfg}:1: not valid YAML \(could not determine a constructor for the tag "
     r"'tag:yaml\.org,2002:python/object/apply:os\.system'\)", "not valid JSON or YAML"),
    ("file-bad-yaml", "experiment: [unclosed\n", r"{cfg}:2: not valid YAML \(.*\)", "not valid JSON or YAML"),
    # names that become paths (every key: test_names_that_become_paths_are_checked_at_every_key)
    ("table-name-escapes", "tables: {'../../../../tmp/cfg/ESCAPED': {rows: []}}",
     r"invalid config: tables: invalid name '\.\./\.\./\.\./\.\./tmp/cfg/ESCAPED' " + NAME_RULE, "ESCAPED"),
    ("experiment-trailing-newline", 'experiment: "nl\\n"', r"invalid config: experiment: invalid name 'nl\\n' "
     + NAME_RULE, "experiment"),
    ("experiment-absolute", "experiment: /tmp/x", r"invalid config: experiment: invalid name '/tmp/x' " + NAME_RULE,
     "experiment"),
    ("stage2-recipe-slash", "stage2: {recipes: {'a/b': {method: dpo}}}",
     r"invalid config: stage2\.recipes: invalid name 'a/b' " + NAME_RULE, "stage2.recipes"),
    ("eval-set-dotdot", "eval_sets: {'..': {source: shapes}}",
     r"invalid config: eval_sets: invalid name '\.\.' " + NAME_RULE, "eval_sets"),
    ("mcq-set-newline", "mcq_sets: {\"m\\n\": {format: shapes}}",
     r"invalid config: mcq_sets: invalid name 'm\\n' " + NAME_RULE, "mcq_sets"),
    ("negatives-set-hidden", "negatives: {sets: {.hidden: {rho: 1}}}",
     r"invalid config: negatives\.sets: invalid name '\.hidden' " + NAME_RULE, "negatives.sets"),
    ("stage1-recipe-base", "stage1: {recipes: {base: {method: sft}}}",
     r"invalid config: stage1\.recipes: 'base' is reserved \(the base model\); rename the recipe", "reserved"),
    # recipes that extend another
    ("recipe-extends-unknown", "stage2: {recipes: {x: {extends: cw_dpoo, l_floor: -3.0}}}",
     r"invalid config: stage2\.recipes\.x\.extends: unknown recipe 'cw_dpoo'; known: .*cw_dpo.*", "extends"),
    ("recipe-extends-circular", "stage1: {recipes: {a: {extends: b}, b: {extends: a}}}",
     r"invalid config: stage1\.recipes\.a\.extends: circular \(a -> b -> a\)", "circular"),
    ("recipe-without-method", "stage2: {recipes: {x: {lr: 1.0e-4}}}",
     r"invalid config: stage2\.recipes\.x: no method \(give `method`, or `extends` a recipe that has one\)",
     "no method"),
    # seeds are unique wherever they are listed
    ("seeds-duplicate", "seeds: [0, 0]", r"invalid config: seeds: \[0, 0\] has non-unique elements", "seeds"),
    ("table-row-seeds-duplicate", "tables: {t: {rows: [{name: r, stage1: sft, seeds: [1, 1]}]}}",
     r"invalid config: tables\.t\.rows\.0\.seeds: \[1, 1\] has non-unique elements", "non-unique"),
    ("figure-series-seeds-duplicate", "figures: {stage1: {series: {SFT: {stage1: sft, seeds: [2, 2]}}}}",
     r"invalid config: figures\.stage1\.series\.SFT\.seeds: \[2, 2\] has non-unique elements", "non-unique"),
    # unknown keys in the hyperparameter defaults
    ("stage2-defaults-unknown-key", "stage2: {defaults: {tua: 2}}",
     r"invalid config: stage2\.defaults: unknown key\(s\) — Additional properties are not allowed \('tua' was "
     r"unexpected\); check for a typo \(allowed: .*\btau\b.*\)", "tua"),
    ("stage1-defaults-unknown-key", "stage1: {defaults: {margn: 2}}",
     r"invalid config: stage1\.defaults: unknown key\(s\) — .*'margn' was unexpected.*", "margn"),
    # ranges
    ("stage1-fraction-0", "stage1: {fraction: 0}",
     r"invalid config: stage1\.fraction: 0 is less than or equal to the minimum of 0", "stage1.fraction"),
    ("stage1-fraction-1", "stage1: {fraction: 1}",
     r"invalid config: stage1\.fraction: 1 is greater than or equal to the maximum of 1", "stage1.fraction"),
    ("external-max-chars-0", "negatives: {external_max_chars: 0}",
     r"invalid config: negatives\.external_max_chars: 0 is less than the minimum of 1", "external_max_chars"),
    ("rho-above-1", "negatives: {sets: {mix: {rho: 1.5}}}",
     r"invalid config: negatives\.sets\.mix\.rho: 1\.5 is greater than the maximum of 1", "rho"),
    # NaN / infinity anywhere
    ("l-floor-nan", "stage2: {defaults: {l_floor: .nan}}",
     r"invalid config: stage2\.defaults\.l_floor: nan is not a finite number \(NaN and infinity are not "
     r"allowed\)", "l_floor"),
    ("beta-inf", "stage2: {recipes: {dpo: {method: dpo, beta: .inf}}}",
     r"invalid config: stage2\.recipes\.dpo\.beta: inf is not a finite number \(NaN and infinity are not "
     r"allowed\)", "beta"),
    ("threshold-minus-inf", "negatives: {onpolicy: {threshold: -.inf}}",
     r"invalid config: negatives\.onpolicy\.threshold: -inf is not a finite number \(NaN and infinity are not "
     r"allowed\)", "threshold"),
    ("seeds-in-list-nan", "tables: {t: {rows: [{name: r, stage1: sft}]}}\nevaluate: {scale: .nan}",
     r"invalid config: evaluate\.scale: nan is not a finite number \(NaN and infinity are not allowed\)", "scale"),
    # references
    ("figure-series-unknown-recipe", "figures: {squeeze: {series: {X: {stage1: sft_c, stage2: ppo}}}}",
     r"invalid config: figures\.squeeze\.series\.X\.stage2: unknown Stage-2 recipe 'ppo'; known: .*", "ppo"),
    ("figure-floor-unknown-table", "figures: {floor: {table: nope}}",
     r"invalid config: figures\.floor\.table: unknown table 'nope'; known: .*", "nope"),
    ("object-counts-all-zero", "data: {shapes: {object_counts: [0, 0, 0]}}",
     r"invalid config: data\.shapes\.object_counts: \[0, 0, 0\] gives no image any objects .*", "object_counts"),
    ("object-counts-unknown-split", "data: {shapes: {object_counts_by_split: {trian: [1, 0, 0]}}}",
     r"invalid config: data\.shapes\.object_counts_by_split: unknown split\(s\) trian; known: .*", "trian"),
    ("table-row-unknown-recipe", "tables: {t: {rows: [{name: r, stage1: sft_x}]}}",
     r"invalid config: tables\.t\.rows\[0\]\.stage1: unknown Stage-1 recipe 'sft_x'; known: .*", "sft_x"),
    # a calibrate table's sweep (cwdpo.config.expand_sweeps)
    ("sweep-recipe-conflict", "stage2: {recipes: {dpo_lr1e-3: {method: dpo, lr: 5.0e-4}}}\ntables: {c: {kind: "
     "calibrate, rows: [{name: SFT, stage1: sft}], sweep: {stage1: sft_c, method: dpo, grids: [{lr: [1.0e-3]}]}}}",
     r"invalid config: tables\.c\.sweep: it makes Stage-2 recipe 'dpo_lr1e-3' \(.*\), but stage2\.recipes\.dpo_lr1e-3 "
     r"says otherwise \(.*\); rename or drop it", "says otherwise"),
    ("sweep-unknown-method", "tables: {c: {kind: calibrate, sweep: {stage1: sft_c, method: ppo, grids: [{lr: [1]}]}}}",
     r"invalid config: tables\.c\.sweep\.method: 'ppo' is not one of dpo, .*", "'ppo'"),
    ("sweep-unknown-stage1", "tables: {c: {kind: calibrate, sweep: {stage1: sftc, method: dpo, grids: [{lr: [1]}]}}}",
     r"invalid config: tables\.c\.sweep\.stage1: unknown Stage-1 recipe 'sftc'; known: .*", "'sftc'"),
    # a POPE set of the release's files: each setting's file and the image folder must be there
    ("pope-files-missing", "pope_sets: {p: {format: pope, settings: [random, popular]}}",
     r"invalid config: pope_sets\.p: format pope needs `files` for every setting \(missing: random, popular\) and "
     r"`image_root`", "needs `files`"),
    ("pope-file-not-found", "pope_sets: {p: {format: pope, settings: [random], files: {random: nope.json}, "
     "image_root: .}}", r"invalid config: pope_sets\.p\.files\.random: 'nope\.json' does not exist", "nope.json"),
    ("model-source-unknown", "model: {source: 'not a model'}\npretrain: {enabled: false}",
     r"invalid config: model\.source: 'not a model' is neither tiny, a hub id \(org/name\) nor an existing model "
     r"folder", "neither tiny"),
    # the YAML itself, before anything walks it (validate-config, and the Snakefile re-reading Snakemake's files)
    ("yaml-duplicate-key", "seeds: [0]\nexperiment: a\nseeds: [1]",
     r"{cfg}:3: duplicate key 'seeds' \(first at line 1\); a mapping holds each key once", "duplicate key"),
    ("yaml-alias-bomb", "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]),
     r"{cfg}:9: key 'i': YAML aliases expand the file by \d+ values, over the limit of 10000 \(an alias "
     r"bomb\?\); write the values out instead", "alias bomb"),
    # seeds: integers in a sane range
    ("seeds-float", "seeds: [1.0]",
     r"invalid config: seeds\[0\]: 1\.0 is not an integer \(a seed is a whole number in 0\.\.2147483647\)", "seeds[0]"),
    ("seed-too-large", "pretrain_seed: 1180591620717411303424",
     r"invalid config: pretrain_seed: 1180591620717411303424 is outside 0\.\.2147483647 \(a seed must fit random, "
     r"numpy and torch\)", "pretrain_seed"),
    ("table-row-seed-float", "tables: {t: {rows: [{name: r, stage1: sft, seeds: [2.0]}]}}",
     r"invalid config: tables\.t\.rows\[0\]\.seeds\[0\]: 2\.0 is not an integer .*", "seeds[0]"),
    # pass-through dictionaries: the keys of the pinned peft / vLLM
    ("lora-unknown-key", "model: {lora: {r: 8, lora_alfa: 16}}",
     r"invalid config: model\.lora: unknown key 'lora_alfa' — did you mean 'lora_alpha'\? "
     r"peft\.LoraConfig\(\*\*model\.lora\) of peft 0\.21\.2 accepts: .*\blora_alpha\b.*", "lora_alfa"),
    ("vllm-unknown-key", "negatives: {onpolicy: {vllm: {tensor_paralel_size: 2}}}",
     r"invalid config: negatives\.onpolicy\.vllm: unknown key 'tensor_paralel_size' — did you mean "
     r"'tensor_parallel_size'\? vllm\.LLM\(\.\.\., \*\*negatives\.onpolicy\.vllm\) of vllm 0\.33\.0 accepts: the \d+ "
     r"keys listed in cwdpo/resources/passthrough_keys\.json", "tensor_paralel_size"),
    ("vllm-key-set-by-cwdpo", "negatives: {onpolicy: {vllm: {seed: 3}}}",
     r"invalid config: negatives\.onpolicy\.vllm\.seed: set by cwdpo itself \(cwdpo\.sampling\.VLLMSampler sets it "
     r"from the config's model settings; leave it out\)", "set by cwdpo"),
    # config strings that reach a shell or Markdown
    ("container-shell", "container: 'x.sif; touch PWNED'",
     r"invalid config: container: 'x\.sif; touch PWNED' holds characters a shell would interpret .*", "container"),
    ("table-row-name-newline", 'tables: {t: {rows: [{name: "a\\nb", stage1: sft}]}}',
     r"invalid config: tables\.t\.rows\[0\]\.name: 'a\\nb' holds a line break or another control character "
     r"\(it is printed into a Markdown table row\); write it on one line", "line break"),
]


def _write_config(tmp_path, text):
    cfg = tmp_path / "bad.yaml"
    if text is not None:
        cfg.write_text(text + ("\n" if text and not text.endswith("\n") else ""))
    return cfg


@pytest.mark.parametrize("case_id,text,line,_", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_says_one_line(tmp_path, case_id, text, line, _):
    cfg = _write_config(tmp_path, text)
    proc = subprocess.run(["cwdpo", "validate-config", "--configfile", str(cfg)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    expected = "cwdpo validate-config: " + line.replace("{cfg}", re.escape(str(cfg)))
    assert re.fullmatch(expected, lines[0]), (lines[0], expected)
    assert not (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def wf(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("wf"))


@pytest.mark.slow
@pytest.mark.parametrize("case_id,text,_,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_snakemake_gives_the_same_verdict_before_any_job(wf, tmp_path, case_id, text, _, needle):
    cfg = _write_config(tmp_path, text)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(cfg)], cwd=wf,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and needle in out, out[-3000:]
    assert "Job stats" not in out and not os.path.exists(os.path.join(wf, "results"))
    assert not os.path.exists(os.path.join(wf, "PWNED"))


# ---------------------------------------------------------------------------------------------------
# bad data

def _karpathy(tmp_path, edit=None, raw=None):
    """A Karpathy file of 6 images (ids 100-105; train: 100-102, test: 103-105) under tmp/data; `edit(doc,
    root)` changes the entries, `raw(bytes)` the file's bytes. Returns (json path, image root)."""
    from PIL import Image
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    images = []
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 40, 90, 10)).save(root / f"img{i}.png")
        images.append({"filename": f"img{i}.png", "imgid": i, "cocoid": 100 + i,
                       "split": "train" if i < 3 else "test",
                       "sentences": [{"raw": f"a red square number {i}"}, {"raw": "a blue circle on the left"}]})
    doc = {"images": images}
    if edit:
        edit(doc, root)
    text = json.dumps(doc, indent=1).encode()
    path = root / "dataset.json"
    path.write_bytes(raw(text) if raw else text)
    return str(path), str(root)


def _outside_image(tmp_path):
    from PIL import Image
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "elsewhere" / "secret.png")
    return str(tmp_path / "elsewhere")


def _save_image(root, name, size, mode="RGB"):
    """Write an image of `size` (width, height) and PIL `mode` (I;16: a 16-bit grayscale PNG)."""
    from PIL import Image
    Image.new(mode, size, 40000 if mode.startswith("I") else 0).save(root / name)


def _all_train(doc, root):
    for img in doc["images"]:
        img["split"] = "train"


@dataclasses.dataclass
class DataCase:
    id: str
    command: str  # validate-data | make-pairs (Stage 2 of the train split, external negatives) | trivial
    line: str  # the message after "cwdpo <command>: " ({json}, {root}, {ext}: the files' paths)
    skip: int | str  # under on_bad_input: skip, the items left out and counted, or the message there
    edit: object = None
    raw: object = None
    external: bytes | None = None  # the external negatives JSONL (make-pairs)
    splits: tuple = ("train",)


EMPTY_STAGE2 = (r"{json}: the stage2 share of split\(s\) train is empty \(1 image\(s\), stage1\.fraction 0\.75\); "
                r"add images or change stage1\.fraction")
DATA_CASES = [
    DataCase("duplicate-image-id", "validate-data",
             r"{json}: images\[4\] \(id 101\): duplicate image id 101 \(first at images\[1\]\)", 1,
             edit=lambda d, r: d["images"][4].update(cocoid=101)),
    DataCase("image-path-absolute", "validate-data",
             r"{json}: images\[1\] \(id 101\): image path .*/elsewhere/secret\.png is outside the image root {root}",
             1, edit=lambda d, r: d["images"][1].update(filepath=_outside_image(r.parent), filename="secret.png")),
    DataCase("image-path-dotdot", "validate-data",
             r"{json}: images\[2\] \(id 102\): image path .*/\.\./elsewhere/secret\.png is outside the image root "
             r"{root}", 1,
             edit=lambda d, r: (_outside_image(r.parent), d["images"][2].update(filepath="../elsewhere",
                                                                               filename="secret.png"))),
    DataCase("caption-json-not-utf8", "validate-data",
             r"{json}:\d+: not UTF-8 text \(byte 0xff at offset \d+\)", 1,
             raw=lambda b: b.replace(b"a red square number 1", b"a red \xff square number 1")),
    DataCase("image-missing", "validate-data", r"{json}: images\[3\] \(id 103\): image file not found: .*img9\.png", 1,
             edit=lambda d, r: d["images"][3].update(filename="img9.png")),
    DataCase("caption-empty", "validate-data",
             r"{json}: images\[0\] \(id 100\): sentences\[1\] has an empty or missing 'raw' caption", 1,
             edit=lambda d, r: d["images"][0]["sentences"][1].update(raw=" ")),
    DataCase("every-image-bad", "validate-data",
             r"{json}: images\[0\] \(id 100\): field\(s\) split must be strings",
             r"{json}: no usable images \(6 skipped as bad input\)",
             edit=lambda d, r: [img.update(split=1) for img in d["images"]]),
    DataCase("empty-split-trivial", "trivial",
             r"{json}: no images in split\(s\) test; the file's splits: train \(6\)",
             r"{json}: no images in split\(s\) test; the file's splits: train \(6\)", edit=_all_train),
    DataCase("empty-split-heldout-pairs", "make-pairs",
             r"{json}: no images in split\(s\) test; the file's splits: train \(6\)",
             r"{json}: no images in split\(s\) test; the file's splits: train \(6\)", edit=_all_train,
             splits=("test",)),
    DataCase("empty-stage2-share", "make-pairs", EMPTY_STAGE2, EMPTY_STAGE2,
             edit=lambda d, r: [img.update(split="train" if i == 0 else "test") for i, img in enumerate(d["images"])]),
    DataCase("external-not-utf8", "make-pairs", r"{ext}:2: not UTF-8 text \(byte 0xff at column \d+\)", 1,
             external=b'{"image_id": 100, "negative": "a green square"}\n'
                      b'{"image_id": 101, "negative": "a gr\xffen square"}\n'),
    DataCase("external-too-long", "make-pairs",
             r"{ext}:2: 'negative' is 1001 characters, over the limit of 1000 \(negatives\.external_max_chars\)", 1,
             external=b'{"image_id": 100, "negative": "a green square"}\n'
                      b'{"image_id": 101, "negative": "' + b"x" * 1001 + b'"}\n'),
    # images every later job could not take: named now, or skipped and counted
    DataCase("image-aspect-ratio", "validate-data",
             r"{json}: images\[1\] \(id 101\): image of 60000×4 pixels has an aspect ratio of 15000 \(the VLM's "
             r"processor takes below 200\): .*wide\.png", 1,
             edit=lambda d, r: (_save_image(r, "wide.png", (60000, 4)), d["images"][1].update(filename="wide.png"))),
    DataCase("image-16-bit", "validate-data",
             r"{json}: images\[2\] \(id 102\): image of mode I;16 \(16- or 32-bit samples\) would turn white when "
             r"converted to RGB; convert it to 8-bit: .*deep\.png", 1,
             edit=lambda d, r: (_save_image(r, "deep.png", (32, 32), "I;16"),
                                d["images"][2].update(filename="deep.png"))),
    DataCase("external-not-json", "make-pairs", r"{ext}:1: not valid JSON \(.*\)", 1,
             external=b'{"image_id": 100, "negative": \n{"image_id": 101, "negative": "a green square"}\n'),
]


def _data_command(case, tmp_path, on_bad_input, tokenizer):
    path, root = _karpathy(tmp_path, case.edit, case.raw)
    ext = None
    if case.external is not None:
        ext = tmp_path / "neg.jsonl"
        ext.write_bytes(case.external)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    data = DataSpec(json=path, image_root=root, splits=list(case.splits), on_bad_input=on_bad_input,
                    validated=None, stage=None, stage1_fraction=None)
    if case.command == "validate-data":
        argv = ["--spec", to_json(ValidateSpec(json=path, image_root=root, on_bad_input=on_bad_input)),
                "--out", str(out / "validated.json")]
    elif case.command == "trivial":
        spec = TrivialSpec(train=data, test=dataclasses.replace(data, splits=["test"]), objects=None)
        argv = ["--spec", to_json(spec), "--out", str(out / "trivial.json")]
    else:
        if case.splits == ("train",):  # Stage 2's share of the train split, as the make_pairs rule reads it
            data = dataclasses.replace(data, stage="stage2", stage1_fraction=0.75)
        spec = PairsSpec(prompt=specs.PROMPT, data=data,
                         negatives=specs.negatives(pairs_per_image=1, external=str(ext) if ext else None),
                         rho=1.0, p_easy=None, seed=0, tokenizer=tokenizer, max_response_tokens=40)
        argv = ["--spec", to_json(spec), "--out", str(out / "pairs.jsonl"), "--summary", str(out / "summary.json")]
    proc = subprocess.run(["cwdpo", case.command, *argv], capture_output=True, text=True)
    return proc, path, root, str(ext), out


def _expected(case, line, path, root, ext):
    return f"cwdpo {case.command}: " + line.replace("{json}", re.escape(path)).replace(
        "{root}", re.escape(root)).replace("{ext}", re.escape(ext))


@pytest.mark.parametrize("case", DATA_CASES, ids=[c.id for c in DATA_CASES])
def test_bad_data_ends_with_one_line_or_is_skipped_and_counted(tmp_path, case, tiny_model_dir):
    (tmp_path / "error").mkdir()
    proc, path, root, ext, out = _data_command(case, tmp_path / "error", "error", tiny_model_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.splitlines()[-1]
    expected = _expected(case, case.line, path, root, ext)
    assert re.fullmatch(expected, last), (last, expected)
    assert "Traceback" in proc.stderr  # a job's log keeps the traceback above the line
    assert os.listdir(out) == []  # nothing half-written

    (tmp_path / "skip").mkdir()
    proc, path, root, ext, out = _data_command(case, tmp_path / "skip", "skip", tiny_model_dir)
    if isinstance(case.skip, str):  # nothing to leave out: the same kind of error
        assert proc.returncode == 1
        last = proc.stderr.splitlines()[-1]
        assert re.fullmatch(_expected(case, case.skip, path, root, ext), last), last
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    if case.command == "validate-data":
        report = json.loads((out / "validated.json").read_text())
        assert report["skipped"] == case.skip, report
        assert sum(report["images"].values()) == 6 - case.skip
    else:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["bad_input"]["skipped"] == case.skip, summary["bad_input"]


# ---------------------------------------------------------------------------------------------------
# names that become paths

# every config section whose entry names (for `experiment`: the value) become part of an output path, with
# a valid body for an entry
NAME_SECTIONS = {
    "experiment": None,
    "stage1.recipes": {"method": "sft"},
    "stage2.recipes": {"method": "dpo"},
    "tables": {"rows": [{"name": "r", "stage1": "sft"}]},
    "figures": {"enabled": False},
    "eval_sets": {"source": "shapes", "splits": ["test"]},
    "mcq_sets": {"format": "shapes"},
    "pope_sets": {"format": "shapes"},
    "negatives.sets": {"rho": 1.0},
}
HOSTILE_NAMES = ["../../../../tmp/ESCAPED", "/tmp/ESCAPED", "a/b", "nl\n", "\n", "cr\r", "..", ".hidden", "",
                 "a b", "x\\y", "-x", "_x", "tab\t", "a\x00b", "é"]


def _nested(section: str, value) -> dict:
    out = value
    for part in reversed(section.split(".")):
        out = {part: out}
    return out


def test_every_name_bearing_key_is_known_and_every_path_wildcard_comes_from_one():
    """A new section whose names become paths must be added to `cwdpo.config.name_keys` (and here); every
    wildcard of the path templates is a checked name, a seed or the experiment folder."""
    from cwdpo.config import name_keys
    from cwdpo.paths import TEMPLATES
    assert {k for k, _ in name_keys(specs.config())} == set(NAME_SECTIONS)
    wildcards = {w for t in TEMPLATES.values() for w in re.findall(r"{(\w+)}", t)}
    # stage1/stage2: recipes; negset: negatives.sets; evalset/mcqset/popeset: eval_sets/mcq_sets/pope_sets;
    # table/figure: tables/figures; key: a model key of recipes and a seed; seed: an integer; out: results/<experiment>;
    # source: "data" or an eval_sets name (the COCO objects of a data source)
    assert wildcards == {"out", "stage1", "seed", "stage2", "key", "negset", "evalset", "mcqset", "popeset", "table",
                         "figure", "source"}


@pytest.mark.slow
@pytest.mark.parametrize("section", list(NAME_SECTIONS))
def test_names_that_become_paths_are_checked_at_every_key(section):
    from cwdpo.config import ConfigError, load_config
    for name in HOSTILE_NAMES:
        if section == "experiment":
            overrides = {"experiment": name}
        else:
            overrides = _nested(section, {name: NAME_SECTIONS[section]})
        with pytest.raises(ConfigError) as err:
            load_config(specs.MICRO_CONFIG, overrides, check_paths=False)
        msg = str(err.value)
        assert section in msg and (repr(name) in msg or "unknown key" in msg), (section, name, msg)


@pytest.mark.slow
def test_no_config_value_writes_outside_results(wf, tmp_path):
    """Unusual but valid names in every name-bearing key: every output, log and benchmark file of the DAG
    lies under results/ (Snakemake's own .snakemake/ aside)."""
    import yaml
    cfg = {"experiment": "e..1", "stage1": {"recipes": {"s1..x": {"method": "sft_c"}}},
           "stage2": {"recipes": {"s2.-_": {"method": "cw_dpo", "negatives": "ng.."}}},
           "negatives": {"sets": {"ng..": {"rho": 0.5}}},
           "tables": {"t..": {"rows": [{"name": "r", "stage1": "s1..x", "stage2": "s2.-_"}]}},
           "eval_sets": {"ev..": {"source": "shapes", "splits": ["test"]}},
           "mcq_sets": {"mq..": {"format": "shapes", "images": 4}}}
    path = tmp_path / "names.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", "micro.yaml", str(path)],
                          cwd=wf, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [f for line in proc.stdout.splitlines()
             if re.match(r"\s+(output|log|benchmark): ", line)
             for f in line.split(": ", 1)[1].split(", ")]
    assert len(files) > 50 and any("/t../" in f or f.endswith("t...md") for f in files)
    for name in ("e..1", "s1..x", "s2.-_", "ng..", "ev..", "mq.."):
        assert any(name in f for f in files), name
    for f in files:
        norm = os.path.normpath(f)
        assert not os.path.isabs(f) and norm.startswith("results" + os.sep) and ".." not in norm.split(os.sep), f
