"""The experiment plan: from a validated config to output paths, the runs each table needs, and the JSON
specs that the Snakemake rules hand to the `cwdpo` CLI. Pure Python (no torch): the Snakefile imports it
at parse time, which must stay fast.

Model keys name every model a table row can evaluate:
  base                              the base VLM (tiny: built + pretrained by the DAG; else a hub id/folder)
  stage1/{stage1}/s{seed}           a Stage-1 recipe (sft, sft_c, sft_c_hard, ...) from the base
  stage2/{stage1}/s{seed}/{stage2}  a Stage-2 recipe (dpo, focal_dpo, cw_dpo, ...) from that Stage-1 model
                                    ({stage1} = base: Stage 2 straight from the base model)
"""
from __future__ import annotations

import copy
import json
import os
import re

# Caption metrics whose corpus value is the mean of the per-image values: a bootstrap over images resamples
# that same statistic. BLEU-4 and METEOR are corpus-level (pooled n-gram / alignment statistics): no
# per-image bootstrap for them (their single-seed cells get no interval).
MEAN_OF_IMAGES = ("ROUGE-L", "CIDEr", "SPICE")

STAGE1_METHODS = ("sft", "sft_c")
STAGE2_METHODS = ("dpo", "focal_dpo", "cw_dpo")
NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


def deep_merge(base: dict, override: dict | None) -> dict:
    """`base` updated recursively with `override` (a new dict; inputs untouched)."""
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def dumps(obj) -> str:
    """Canonical JSON for specs: Snakemake reruns a job when its spec (a params value) changes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class Plan:
    def __init__(self, config: dict, check_paths: bool = True):
        self.c = config
        self.out = f"results/{config['experiment']}"
        self.check(check_paths)

    # ---- validation beyond the JSON schema ----
    def check(self, check_paths: bool = True):
        c = self.c
        s1 = c["stage1"]["recipes"]
        s2 = c["stage2"]["recipes"]
        for name, r in s1.items():
            if not re.fullmatch(NAME_RE, name) or name == "base":
                raise ConfigError(f"stage1.recipes: invalid recipe name {name!r}")
            if r["method"] not in STAGE1_METHODS:
                raise ConfigError(f"stage1.recipes.{name}.method: {r['method']!r} is not one of "
                                  f"{', '.join(STAGE1_METHODS)}")
        for name, r in s2.items():
            if not re.fullmatch(NAME_RE, name):
                raise ConfigError(f"stage2.recipes: invalid recipe name {name!r}")
            if r["method"] not in STAGE2_METHODS:
                raise ConfigError(f"stage2.recipes.{name}.method: {r['method']!r} is not one of "
                                  f"{', '.join(STAGE2_METHODS)}")
        for tname, table in c["tables"].items():
            for i, row in enumerate(table.get("rows", [])):
                where = f"tables.{tname}.rows[{i}]"
                if row.get("trivial"):
                    continue
                st1 = row.get("stage1", "base")
                if st1 != "base" and st1 not in s1:
                    raise ConfigError(f"{where}.stage1: unknown Stage-1 recipe {st1!r}; known: base, "
                                      f"{', '.join(s1)}")
                st2 = row.get("stage2")
                if st2 is not None and st2 not in s2:
                    raise ConfigError(f"{where}.stage2: unknown Stage-2 recipe {st2!r}; known: {', '.join(s2)}")
        sets = c["negatives"]["sets"]
        for name in sets:
            if not re.fullmatch(NAME_RE, name):
                raise ConfigError(f"negatives.sets: invalid set name {name!r}")
        for name in s2:
            negset = self.stage2_recipe(name)["negatives"]
            if negset not in sets:
                raise ConfigError(f"stage2.recipes.{name}.negatives: unknown negatives set {negset!r}; known: "
                                  f"{', '.join(sets)}")
            if sets[negset]["rho"] < 1 and not c["negatives"]["onpolicy"]["enabled"]:
                raise ConfigError(f"negatives.sets.{negset}.rho: {sets[negset]['rho']} needs on-policy negatives "
                                  "but negatives.onpolicy.enabled is false (use rho: 1)")
        if c["data"]["source"] == "karpathy" and not c["data"]["karpathy"].get("json"):
            raise ConfigError("data.karpathy.json: required when data.source is 'karpathy'")
        if check_paths:
            self.check_paths()
        if c["model"]["source"] != "tiny" and c["pretrain"]["enabled"]:
            raise ConfigError("pretrain.enabled: only the tiny model is pretrained by the pipeline; set it to "
                              "false for a hub or local model")

    def check_paths(self):
        """Paths the config names must exist before any job runs (the error names the key)."""
        c = self.c
        paths = []
        if c["data"]["source"] == "karpathy":
            paths += [("data.karpathy.json", c["data"]["karpathy"]["json"]),
                      ("data.karpathy.image_root", c["data"]["karpathy"].get("image_root"))]
        paths.append(("negatives.external", c["negatives"].get("external")))
        for name, m in c["mcq_sets"].items():
            if m.get("enabled", True) and m["format"] != "shapes":
                if not m.get("path"):
                    raise ConfigError(f"mcq_sets.{name}.path: required for format {m['format']}")
                if "*" not in m["path"]:
                    paths.append((f"mcq_sets.{name}.path", m["path"]))
        for name, es in c["eval_sets"].items():
            if es.get("enabled", True) and es["source"] == "karpathy":
                if not es.get("json"):
                    raise ConfigError(f"eval_sets.{name}.json: required for a Karpathy-format evaluation set")
                paths += [(f"eval_sets.{name}.json", es["json"]), (f"eval_sets.{name}.image_root", es.get("image_root"))]
        paths.append(("train.deepspeed", c["train"].get("deepspeed")))
        src = c["model"]["source"]
        if src != "tiny" and (src.startswith(("/", "./", "../", "~")) or os.path.isdir(src)):
            paths.append(("model.source", os.path.expanduser(src)))
        for key, path in paths:
            if path and not os.path.exists(path):
                raise ConfigError(f"{key}: {path!r} does not exist")

    # ---- data ----
    @property
    def is_shapes(self) -> bool:
        return self.c["data"]["source"] == "shapes"

    def data_json(self) -> str:
        if self.is_shapes:
            return f"{self.out}/data/dataset_shapes.json"
        return self.c["data"]["karpathy"]["json"]

    def validated_path(self) -> str:
        """The report of the validate_data rule (bad images listed there are skipped by every job)."""
        return f"{self.out}/data/validated.json"

    def data_inputs(self) -> list:
        return [self.data_json(), self.validated_path()]

    def validate_spec(self) -> dict:
        d = self.c["data"]
        return {"json": self.data_json(), "image_root": self.image_root(), "on_bad_input": d["on_bad_input"]}

    def image_root(self):
        return None if self.is_shapes else self.c["data"]["karpathy"].get("image_root")

    def data_spec(self, splits_key: str, stage: str | None = None) -> dict:
        d = self.c["data"]
        spec = {"json": self.data_json(), "image_root": self.image_root(), "splits": d["splits"][splits_key],
                "on_bad_input": d["on_bad_input"], "validated": self.validated_path()}
        if stage:
            spec["stage"] = stage
            spec["stage1_fraction"] = self.c["stage1"]["fraction"]
        return spec

    def shapes_spec(self) -> dict:
        return self.c["data"]["shapes"]

    # ---- models ----
    @property
    def tiny(self) -> bool:
        return self.c["model"]["source"] == "tiny"

    def base_init_dir(self) -> str:
        return f"{self.out}/base/init"

    def base_model(self) -> str:
        """Folder (or hub id) of the base VLM."""
        if self.tiny:
            return f"{self.out}/base/pretrain/model" if self.c["pretrain"]["enabled"] else self.base_init_dir()
        return self.c["model"]["source"]

    def base_is_output(self) -> bool:
        return self.tiny

    def model_dir(self, key: str) -> str:
        if key == "base":
            return self.base_model()
        parts = key.split("/")
        if parts[0] == "stage1":
            return f"{self.out}/stage1/{parts[1]}/{parts[2]}/model"
        if parts[0] == "stage2":
            return f"{self.out}/stage2/{parts[1]}/{parts[2]}/{parts[3]}/model"
        raise ConfigError(f"unknown model key {key!r}")

    def stage1_init(self) -> str:
        return self.base_model()

    def stage_init(self, stage1: str, seed) -> str:
        """The model Stage 2 starts from and is referenced to (its frozen copy)."""
        return self.base_model() if stage1 == "base" else self.model_dir(f"stage1/{stage1}/s{seed}")

    # ---- runs ----
    def row_keys(self, row: dict) -> list:
        """Model keys of a table row, one per seed (the base model has no seed)."""
        if row.get("trivial"):
            return []
        st1, st2 = row.get("stage1", "base"), row.get("stage2")
        seeds = row.get("seeds", self.c["seeds"])
        if st2 is None:
            return ["base"] if st1 == "base" else [f"stage1/{st1}/s{s}" for s in seeds]
        return [f"stage2/{st1}/s{s}/{st2}" for s in seeds]

    def enabled_tables(self) -> dict:
        return {k: t for k, t in self.c["tables"].items() if t.get("enabled", True)}

    def eval_keys(self) -> list:
        keys = []
        for table in self.enabled_tables().values():
            for row in table.get("rows", []):
                for k in self.row_keys(row):
                    if k not in keys:
                        keys.append(k)
        return keys

    # ---- extra evaluation sets (Flickr30k, NoCaps, the shapes OOD split) ----
    def eval_sets(self) -> dict:
        return {k: v for k, v in self.c["eval_sets"].items() if v.get("enabled", True)}

    def mcq_sets(self) -> dict:
        return {k: v for k, v in self.c["mcq_sets"].items() if v.get("enabled", True)}

    def eval_set_names(self) -> list:
        return list(self.eval_sets())

    def eval_set_data(self, name: str) -> dict:
        es = self.eval_sets()[name]
        if es["source"] == "shapes":
            return {**self.data_spec("test"), "splits": es["splits"]}
        return {"json": es["json"], "image_root": es.get("image_root"), "splits": es["splits"],
                "on_bad_input": self.c["data"]["on_bad_input"]}

    def mcq_names(self) -> list:
        return list(self.mcq_sets())

    def mcq_specs(self, key: str) -> list:
        out = []
        for name, m in self.mcq_sets().items():
            spec = {**m, "name": name, "out": f"{self.out}/eval/{key}/mcq_{name}.json"}
            if m["format"] == "shapes":
                spec["data"] = {**self.data_spec("test"), "splits": m["splits"]}
            out.append(spec)
        return out

    def score_files(self) -> list:
        """(captions, scores) paths of every caption file the score job reads."""
        pairs = []
        for k in self.eval_keys() + ["trivial"]:
            pairs.append((f"{self.out}/eval/{k}/captions.json", f"{self.out}/eval/{k}/scores.json"))
            if k != "trivial":
                for name in self.eval_set_names():
                    pairs.append((f"{self.out}/eval/{k}/captions_{name}.json", f"{self.out}/eval/{k}/scores_{name}.json"))
        return pairs

    def eval_set_columns(self) -> dict:
        """Columns of the evaluation sets: '<set> <metric>' (and '<set> CIDEr (<domain>)' per domain), and
        '<mcq set> acc.' (circular when configured) / '<mcq set> acc. (plain)'."""
        from .shapes import DOMAINS
        cols = {}
        for name, m in self.mcq_sets().items():
            cols[f"{name} acc."] = [f"mcq_{name}", ["accuracy"], True, 1, None]  # percent (× evaluate.scale)
            if m["circular"]:
                cols[f"{name} acc. (plain)"] = [f"mcq_{name}", ["accuracy_plain"], True, 1, None]
        for name, es in self.eval_sets().items():
            for m in es["metrics"]:
                if m == "SPICE" and "SPICE" not in self.c["evaluate"]["metrics"]:
                    continue
                # corpus-level metrics (BLEU-4, METEOR) get no per-image bootstrap, as in the main columns
                cols[f"{name} {m}"] = [f"scores_{name}", ["corpus", m], True, 1,
                                       ["per_image", m] if m in MEAN_OF_IMAGES else None]
            if es["domains"]:
                for d in DOMAINS:
                    cols[f"{name} CIDEr ({d})"] = [f"scores_{name}", ["domains", d, "corpus", "CIDEr"], True, 1,
                                                   ["domains", d, "per_image", "CIDEr"]]
        return cols

    def eval_dir(self, key: str) -> str:
        return f"{self.out}/eval/{key}"

    def enabled_figures(self) -> dict:
        return {k: f for k, f in self.c["figures"].items() if f.get("enabled", True)}

    def final_outputs(self) -> list:
        return [f"{self.out}/tables/{name}.md" for name in self.enabled_tables()] + \
            [f"{self.out}/figures/{name}.png" for name in self.enabled_figures()]

    # ---- negatives and Stage 2 ----
    def stage2_recipe(self, name: str) -> dict:
        return deep_merge(self.c["stage2"]["defaults"], self.c["stage2"]["recipes"][name])

    def neg_dir(self, stage1: str, seed) -> str:
        return f"{self.out}/negatives/{stage1}/s{seed}"

    def needs_onpolicy(self, negset: str) -> bool:
        return self.c["negatives"]["sets"][negset]["rho"] < 1

    def negatives_cfg(self, drop=("onpolicy", "sets")) -> dict:
        """The negatives settings a data job needs, with the held-out (colour, shape) combinations of the
        `shapes` dataset (negatives never use them: they belong to the OOD split only)."""
        cfg = {k: v for k, v in self.c["negatives"].items() if k not in drop}
        if self.is_shapes:
            cfg["heldout"] = self.c["data"]["shapes"]["heldout_combos"]
        return cfg

    def pairs_inputs(self, stage1: str, seed, negset: str) -> dict:
        inputs = {"data": self.data_inputs()}
        if self.needs_onpolicy(negset):
            inputs["onpolicy"] = f"{self.neg_dir(stage1, seed)}/onpolicy.jsonl"
        if self.c["negatives"]["external"]:
            inputs["external"] = self.c["negatives"]["external"]
        return inputs

    def stage2_inputs(self, stage1: str, seed, stage2: str) -> dict:
        negset = self.stage2_recipe(stage2)["negatives"]
        d = self.neg_dir(stage1, seed)
        inputs = {"pairs": f"{d}/pairs_{negset}.jsonl", "ref": f"{d}/ref_{negset}.json"}
        if stage1 != "base" or self.base_is_output():
            inputs["model"] = self.stage_init(stage1, seed)
        if self.probes_enabled():
            inputs["probe"] = self.probe_path(stage1, seed)
        return inputs

    def stage1_inputs(self, seed) -> dict:
        inputs = {"data": self.data_inputs()}
        if self.base_is_output():
            inputs["model"] = self.base_model()
        if self.probes_enabled():
            inputs["probe"] = self.probe_path("base", seed)
        return inputs

    def eval_inputs(self, key: str) -> dict:
        inputs = {"data": self.data_inputs(), "heldout": self.heldout_pairs_path()}
        inputs["sets"] = [es["json"] for es in self.eval_sets().values() if es["source"] == "karpathy"] + \
            [m["path"] for m in self.mcq_sets().values() if m.get("path") and "*" not in m["path"]]
        if key != "base" or self.base_is_output():
            inputs["model"] = self.model_dir(key)
        ref = self.reference_of(key)
        if ref is not None and (ref != self.base_model() or self.base_is_output()):
            inputs["reference"] = ref
        return inputs

    def init_inputs(self, stage1: str, seed) -> list:
        """The model a Stage-2 run (and its sampling / reference pass) starts from, when the DAG makes it."""
        if stage1 == "base" and not self.base_is_output():
            return []
        return [self.stage_init(stage1, seed)]

    def probe_path(self, start: str, seed) -> str:
        """The probe set of runs that start from `start` (base or a Stage-1 recipe) with this seed."""
        return f"{self.neg_dir(start, seed)}/probe.jsonl"

    def probes_enabled(self) -> bool:
        return bool(self.c["probes"]["enabled"])

    def probe_set_inputs(self, start: str, seed) -> dict:
        inputs = {"data": self.data_inputs()}
        if self.c["negatives"]["onpolicy"]["enabled"]:
            inputs["onpolicy"] = f"{self.neg_dir(start, seed)}/onpolicy.jsonl"
        return inputs

    def probe_set_spec(self, start: str, seed) -> dict:
        return {"probe_data": self.data_spec("probe"), "probe_images": self.c["probes"]["images"],
                "negatives": self.negatives_cfg(("onpolicy", "sets", "external")), "seed": int(seed)}

    def probes_spec(self, start: str, seed, stage: int) -> dict | None:
        p = self.c["probes"]
        if not p["enabled"]:
            return None
        return {"enabled": True, "rows": self.probe_path(start, seed), "interval": p["interval"],
                "batch_size": p["batch_size"], "n_bins": p["n_bins"], "images": p["images"],
                "val": self.data_spec("val"), "val_images": p["val_images"], "val_interval": p["val_interval"],
                "top5": bool(p["top5"] and stage == 1), "max_new_tokens": self.c["evaluate"]["max_new_tokens"]}

    def reference_of(self, key: str):
        """The model a model key is compared with for TV/JS: a Stage-2 run's reference, a Stage-1 run's base."""
        parts = key.split("/")
        if parts[0] == "stage2":
            return self.stage_init(parts[1], parts[2][1:])
        if parts[0] == "stage1":
            return self.base_model()
        return None

    def heldout_pairs_path(self) -> str:
        return f"{self.out}/eval/heldout_pairs.jsonl"

    # ---- specs for the CLI ----
    def common_model_spec(self) -> dict:
        m = self.c["model"]
        return {"prompt": self.c["prompt"], "min_pixels": m["min_pixels"], "max_pixels": m["max_pixels"],
                "dtype": m["dtype"], "max_response_tokens": m["max_response_tokens"],
                "trust_remote_code": m["trust_remote_code"],
                "base": None if self.tiny else self.c["model"]["source"]}

    def train_settings(self) -> dict:
        return dict(self.c["train"])

    def pretrain_spec(self) -> dict:
        hp = {k: v for k, v in self.c["pretrain"].items() if k != "enabled"}
        return {**self.common_model_spec(), "method": "sft", "init": self.base_init_dir(), "seed": self.c["pretrain_seed"],
                "data": self.data_spec("pretrain"), "hparams": hp, "train": self.train_settings(),
                "lora": None}

    def stage1_spec(self, recipe: str, seed: int) -> dict:
        r = deep_merge(self.c["stage1"]["defaults"], self.c["stage1"]["recipes"][recipe])
        method = r.pop("method")
        spec = {**self.common_model_spec(), "method": method, "init": self.stage1_init(), "seed": int(seed),
                "data": self.data_spec("finetune", stage="stage1"), "hparams": r,
                "train": self.train_settings(), "lora": self.c["model"]["lora"],
                "probes": self.probes_spec("base", seed, stage=1)}
        if method == "sft_c":  # only SFT-C reads negatives: other recipes do not rerun when they change
            spec["negatives"] = self.negatives_cfg(("onpolicy", "sets"))
            spec["data_seed"] = self.c["data"]["shapes"]["seed"]
        return spec

    def eval_spec(self, key: str) -> dict:
        e = self.c["evaluate"]
        d = self.c["stage2"]["defaults"]
        return {**self.common_model_spec(), "model": self.model_dir(key), "data": self.data_spec("test"),
                "num_beams": e["num_beams"], "max_new_tokens": e["max_new_tokens"], "batch_size": e["batch_size"],
                "heldout_pairs": self.heldout_pairs_path(),
                "l_floor": d["l_floor"] if d["l_floor"] != "mean" else -5.0, "tau": d["tau"],
                "reference": self.reference_of(key), "n_bins": self.c["probes"]["n_bins"],
                "topk_beams": e["topk_beams"], "pixel_cache_mb": self.c["train"]["pixel_cache_mb"],
                "eval_sets": [{"name": n, "data": self.eval_set_data(n), "domains": self.eval_sets()[n]["domains"],
                               "out": f"{self.out}/eval/{key}/captions_{n}.json"} for n in self.eval_set_names()],
                "mcq_sets": self.mcq_specs(key)}

    def sample_spec(self, stage1: str, seed) -> dict:
        o = self.c["negatives"]["onpolicy"]
        return {**self.common_model_spec(), "model": self.stage_init(stage1, seed), "onpolicy": o,
                "seed": int(o["seed"]) + int(seed), "data": self.data_spec("finetune", stage="stage2"),
                "probe_data": self.data_spec("probe") if self.probes_enabled() else None,
                "probe_images": self.c["probes"]["images"]}

    def pairs_spec(self, stage1: str, seed, negset: str) -> dict:
        n = self.c["negatives"]
        spec = {"prompt": self.c["prompt"], "data": self.data_spec("finetune", stage="stage2"), "stage": "stage2",
                "negatives": self.negatives_cfg(("onpolicy", "sets")),
                "rho": n["sets"][negset]["rho"], "p_easy": n["sets"][negset].get("p_easy"), "seed": int(seed)}
        return spec

    def heldout_spec(self) -> dict:
        n = self.c["negatives"]
        return {"prompt": self.c["prompt"], "data": self.data_spec("test"), "stage": "all",
                "negatives": {**self.negatives_cfg(("onpolicy", "sets", "external")), "external": None},
                "rho": 1.0, "p_easy": n["p_easy"], "seed": 12345}

    def ref_spec(self, stage1: str, seed) -> dict:
        return {**self.common_model_spec(), "model": self.stage_init(stage1, seed),
                "batch_size": self.c["stage2"]["ref_batch_size"]}

    def stage2_spec(self, stage1: str, seed, stage2: str) -> dict:
        r = self.stage2_recipe(stage2)
        method = r.pop("method")
        negset = r.pop("negatives")
        d = self.neg_dir(stage1, seed)
        return {**self.common_model_spec(), "method": method, "init": self.stage_init(stage1, seed), "seed": int(seed),
                "data": self.data_spec("finetune", stage="stage2"), "hparams": r,
                "pairs": f"{d}/pairs_{negset}.jsonl", "ref_logps": f"{d}/ref_{negset}.json",
                "train": self.train_settings(), "lora": self.c["model"]["lora"],
                "probes": self.probes_spec(stage1, seed, stage=2)}

    def trivial_spec(self) -> dict:
        return {"train": self.data_spec("pretrain" if self.c["pretrain"]["enabled"] else "finetune"),
                "test": self.data_spec("test")}

    def build_model_spec(self) -> dict:
        return {"data": self.data_spec("pretrain"), "tiny": self.c["model"]["tiny"], "prompt": self.c["prompt"],
                "min_pixels": self.c["model"]["min_pixels"], "max_pixels": self.c["model"]["max_pixels"],
                "seed": self.c["pretrain_seed"]}

    def run_dir(self, key: str):
        """The training folder of a model key (its probes.csv, metrics.json), None for the base model."""
        return None if key == "base" else os.path.dirname(self.model_dir(key))

    def sft_key(self, key: str):
        """The SFT run of the same seed as `key` (for the win-rate column), or None."""
        parts = key.split("/")
        if parts[0] in ("stage1", "stage2") and "sft" in self.c["stage1"]["recipes"]:
            return f"stage1/sft/{parts[2]}"
        return None

    def _table_rows(self, table: dict) -> list:
        rows = []
        for row in table.get("rows", []):
            entry = {"name": row["name"], "keys": self.row_keys(row)}
            if row.get("trivial"):
                entry["trivial"] = True
            else:
                entry["sft_keys"] = [self.sft_key(k) for k in entry["keys"]]
            rows.append(entry)
        return rows

    def _tables_for(self, name: str) -> list:
        """The comparison tables a table reads (T-paper reads main and ablation)."""
        t = self.c["tables"][name]
        if t.get("kind") == "paper":
            return [n for n in ("main", "ablation") if n in self.c["tables"]]
        return [name]

    def table_inputs(self, name: str) -> list:
        files = []
        for tname in self._tables_for(name):
            table = self.c["tables"][tname]
            columns = table.get("columns") or []
            for row in self._table_rows(table):
                if row.get("trivial"):
                    files.append(f"{self.out}/eval/trivial/scores.json")
                    continue
                keys = list(row["keys"])
                if "win-rate vs SFT" in columns:
                    keys += [k for k in row["sft_keys"] if k]
                for k in keys:
                    files += [f"{self.out}/eval/{k}/scores.json", f"{self.out}/eval/{k}/measures.json"]
                    if tname in ("main", "ablation") or table.get("kind") == "paper":
                        files += [f"{self.out}/eval/{k}/scores_{n}.json" for n in self.eval_set_names()]
                        files += [f"{self.out}/eval/{k}/mcq_{n}.json" for n in self.mcq_names()]
                    if "conv. step" in columns and self.run_dir(k):
                        files.append(f"{self.run_dir(k)}/probes.csv")
        return sorted(set(files))

    # ---- compute ----
    def gpus(self, kind: str) -> int:
        """GPUs a job of `kind` ('train' or 'infer') asks for (the `gpu` resource of its rule)."""
        return int(self.c["compute"]["gpus_per_train_job" if kind == "train" else "gpus_per_infer_job"])

    def launcher(self, kind: str) -> str:
        """The command that starts `cwdpo`: plain, or torchrun/accelerate with one process per GPU."""
        n = self.gpus(kind)
        if kind != "train" or n <= 1:
            return "cwdpo"
        if self.c["compute"]["launcher"] == "accelerate":
            return f"accelerate launch --num_processes {n} -m cwdpo.cli"
        return f"torchrun --standalone --nproc_per_node {n} -m cwdpo.cli"

    # ---- figures ----
    def _series_keys(self, series: dict) -> list:
        """[(label, model keys)] in config order (a list: JSON specs sort dict keys, colours follow order)."""
        return [(label, self.row_keys({"name": label, **sel})) for label, sel in series.items()]

    def figure_spec(self, name: str) -> dict:
        f = self.enabled_figures()[name]
        spec = {"kind": name, "scale": self.c["evaluate"]["scale"]}
        if name in ("stage1", "squeeze"):
            spec["series"] = [[label, [f"{self.run_dir(k)}/probes.csv" for k in keys if self.run_dir(k)]]
                              for label, keys in self._series_keys(f["series"])]
            if name == "stage1" and "SPICE" not in self.c["evaluate"]["metrics"]:
                spec["spice_reason"] = "SPICE is not in evaluate.metrics"
            elif name == "stage1":
                spec["spice_reason"] = ("SPICE over training steps is not probed (it runs a Java parser per "
                                        "call); the final top-5 SPICE is in scores.json when available")
        elif name == "calibration":
            spec["series"] = [[label, [f"{self.out}/eval/{k}/measures.json" for k in keys]]
                              for label, keys in self._series_keys(f["series"])]
        elif name == "floor":
            table = self.c["tables"][f.get("table", "floor")]
            spec["rows"] = []
            for row in self._table_rows(table):
                keys = row["keys"]
                spec["rows"].append({"name": row["name"],
                                     "scores": [f"{self.out}/eval/{k}/scores.json" for k in keys],
                                     "measures": [f"{self.out}/eval/{k}/measures.json" for k in keys],
                                     "probes": [f"{self.run_dir(k)}/probes.csv" for k in keys if self.run_dir(k)],
                                     "metrics": [f"{self.run_dir(k)}/metrics.json" for k in keys if self.run_dir(k)]})
        return spec

    def figure_inputs(self, name: str) -> list:
        spec = self.figure_spec(name)
        files = [p for _, paths in spec.get("series", []) for p in paths]
        for r in spec.get("rows", []):
            files += r["scores"] + r["measures"] + r["probes"] + r["metrics"]
        return sorted(set(files))

    def table_spec(self, name: str) -> dict:
        t = self.enabled_tables()[name]
        spec = {"name": name, "kind": t.get("kind", "comparison"), "title": t.get("title") or name,
                "scale": self.c["evaluate"]["scale"], "eval_root": f"{self.out}/eval",
                "trivial_scores": f"{self.out}/eval/trivial/scores.json", "experiment": self.c["experiment"]}
        if spec["kind"] == "paper":
            spec["rows_by_name"] = {n: {r["name"]: r["keys"] for r in self._table_rows(self.c["tables"][n])
                                        if not r.get("trivial")} for n in self._tables_for(name)}
            keys = [k for rows in spec["rows_by_name"].values() for ks in rows.values() for k in ks]
            spec["scale_note"] = (f"model {self.c['model']['source']}, data {self.c['data']['source']}, "
                                  f"{len(self.c['seeds'])} seed(s)")
        else:
            spec["rows"] = self._table_rows(t)
            spec["columns"] = [c for c in t["columns"] if c not in ("SPICE", "top-5 SPICE")
                               or "SPICE" in self.c["evaluate"]["metrics"]]
            if name in ("main", "ablation"):  # T-main and T-ablation carry the extra evaluation sets
                spec["columns"] += list(self.eval_set_columns())
            keys = [k for r in spec["rows"] for k in r["keys"] + [x for x in r.get("sft_keys", []) if x]]
        spec["extra_columns"] = self.eval_set_columns()
        spec["run_dirs"] = {k: self.run_dir(k) for k in keys if self.run_dir(k)}
        return spec
