"""The experiment plan: from a validated config to the runs each table needs, the inputs of every rule
and the spec every command receives. Pure Python (no torch): the Snakefile imports it at parse time,
which must stay fast.

Paths come from `cwdpo.paths.Layout` (each template written once); specs are the dataclasses of
`cwdpo.specs`, complete because the schema filled every default; table and figure specs are built beside
their writers (`cwdpo.report.table_spec`: the module of the table's kind in cwdpo/report/;
`cwdpo.figures.figure_spec`).
"""
from __future__ import annotations

import dataclasses
import os
import re

from .config import (ARMS_KINDS, CALIBRATED, arm_runs, onpolicy_share, stage1_recipe, stage2_recipe, validate_config,
                     variant_config)
from .methods import REGISTRY
from .paths import KEY_TEMPLATES, TRIVIAL, Layout, ModelKey
from .specs import (BeamSpec, BuildModelSpec, CocoObjectsSpec, DataSpec, EvalSetSpec, EvalSpec, McqSpec,
                    NegativesSpec, PairsSpec, PopeSpec, ProbeSetSpec, ProbesSpec, RefSpec, SampleSpec, StabilitySpec,
                    TrainSpec, TrivialSpec, ValidateSpec, Vlm)

# The held-out pairs' w_c column of a model that is not a Stage-2 run uses stage2.defaults.l_floor; when
# that is "mean" (resolved per Stage-2 run from its reference pass) there is no single number, and the
# column uses the paper's default instead.
MEAN_FLOOR_FALLBACK = -5.0


class Plan:
    """The plan of one experiment tree: the experiment itself (`out` results/<experiment>), or one of its
    variants (config `variants`: out results/<experiment>/variants/<name>, planned from the variant's config).
    `arm_runs`: the run selections the experiment's tables across variants read from this tree (they are
    evaluated and scored here even when no table of this tree shows them)."""

    def __init__(self, config: dict, out: str | None = None, variant: str | None = None, arm_runs: list = ()):
        self.c = config
        self.out = out or f"results/{config['experiment']}"
        self.variant = variant
        self.layout = Layout(self.out)
        self._arm_runs = list(arm_runs)
        self._variants = None

    # ---- variants (config `variants`) and the tables across them ----
    def arms_tables(self) -> dict:
        """The enabled tables that compare arms (kinds scale, modality, negsource)."""
        return {k: t for k, t in self.enabled_tables().items() if t["kind"] in ARMS_KINDS}

    def variant_plans(self) -> dict:
        """{name: Plan} of the experiment's variants (none for a variant itself), built once."""
        if self._variants is None:
            wanted: dict = {}
            for table in self.arms_tables().values():
                for arm in table["arms"]:
                    if arm.get("variant"):
                        wanted.setdefault(arm["variant"], []).extend(arm_runs(table, arm).values())
            self._variants = {
                name: Plan(validate_config(variant_config(self.c, name), check_paths=False),
                           out=f"{self.out}/variants/{name}", variant=name, arm_runs=wanted.get(name, []))
                for name in self.c["variants"]}
        return self._variants

    def all_plans(self) -> list:
        """(rule-name suffix, Plan) of this experiment ("") and of each variant ("__<name>"): the rules are
        defined once per plan (workflow/rules/common.smk)."""
        return [("", self)] + [(f"__{name}", plan) for name, plan in self.variant_plans().items()]

    def arm_plan(self, arm: dict) -> "Plan":
        """The plan whose runs an arm of a table across variants reads."""
        return self.variant_plans()[arm["variant"]] if arm.get("variant") else self

    def arm_selections(self) -> list:
        """The run selections this tree's runs serve to tables across arms: its own arms tables' arms without a
        variant, and what the experiment's tables read from it (for a variant)."""
        own = [sel for table in self.arms_tables().values() for arm in table["arms"] if not arm.get("variant")
               for sel in arm_runs(table, arm).values()]
        return own + self._arm_runs

    def pattern(self, name: str, file: str | None = None) -> str:
        return self.layout.pattern(name, file)

    def path(self, name: str, file: str | None = None, **wildcards) -> str:
        return self.layout.path(name, file, **wildcards)

    def log_file(self, job: str) -> str:
        return self.layout.log_file(job)

    def benchmark_file(self, job: str) -> str:
        return self.layout.benchmark_file(job)

    # ---- data ----
    @property
    def is_shapes(self) -> bool:
        return self.c["data"]["source"] == "shapes"

    def data_json(self) -> str:
        return self.path("shapes_json") if self.is_shapes else self.c["data"]["karpathy"]["json"]

    def image_root(self):
        return None if self.is_shapes else self.c["data"]["karpathy"]["image_root"]

    def data_inputs(self) -> list:
        return [self.data_json(), self.path("validated")]

    def validate_spec(self) -> ValidateSpec:
        return ValidateSpec(json=self.data_json(), image_root=self.image_root(),
                            on_bad_input=self.c["data"]["on_bad_input"])

    def data_spec(self, role: str, stage: str | None = None) -> DataSpec:
        """The images of a role (pretrain, finetune, val, test, probe); `stage` takes Stage 1's or 2's share."""
        d = self.c["data"]
        return DataSpec(json=self.data_json(), image_root=self.image_root(), splits=d["splits"][role],
                        on_bad_input=d["on_bad_input"], validated=self.path("validated"), stage=stage,
                        stage1_fraction=self.c["stage1"]["fraction"] if stage else None)

    def shapes_spec(self):
        from .shapes import ShapesSpec  # torch-free
        s = self.c["data"]["shapes"]
        return ShapesSpec(splits=s["splits"], seed=s["seed"], image_size=s["image_size"],
                          heldout=tuple(tuple(x) for x in s["heldout_combos"]),
                          ood={k: v for k, v in s["ood"].items() if v}, p_counts=tuple(s["object_counts"]),
                          counts_by_split={k: tuple(v) for k, v in s["object_counts_by_split"].items()} or None,
                          qa=s["qa"])

    def negatives_spec(self, external: bool = True) -> NegativesSpec:
        """The dataset-negative settings of a data job; the held-out (colour, shape) combinations of the
        `shapes` dataset belong to the OOD split only, so no negative introduces them."""
        n = self.c["negatives"]
        return NegativesSpec(p_easy=n["p_easy"], gentle_kinds=n["gentle_kinds"], easy_kinds=n["easy_kinds"],
                             pairs_per_image=n["pairs_per_image"], external=n["external"] if external else None,
                             external_max_chars=n["external_max_chars"],
                             sft_c_kind=n["sft_c_kind"],
                             heldout=self.c["data"]["shapes"]["heldout_combos"] if self.is_shapes else [])

    # ---- models ----
    @property
    def tiny(self) -> bool:
        return self.c["model"]["source"] == "tiny"

    @property
    def hub(self) -> bool:
        """The model is a hub id: one fetch_model job fills `model.cache`, every other job runs offline."""
        from .hub import is_hub_id
        return is_hub_id(self.c["model"]["source"])

    def fetch_marker(self) -> str:
        """The file the fetch_model job writes once the hub model is in the workflow's cache."""
        from .hub import marker_name
        return os.path.join(self.c["model"]["cache"], "cwdpo-fetched", marker_name(self.c["model"]["source"]))

    def model_inputs(self) -> list:
        """What every job that loads the (base) model waits for: the fetch marker of a hub model."""
        return [self.fetch_marker()] if self.hub else []

    def hf_env(self) -> str:
        """Shell prefix of every job of a hub-model config: the workflow's cache (inside the working
        directory unless `model.cache` is absolute: `apptainer exec --home <workdir>` sees it) and offline
        mode. Empty for the tiny and local-folder models (no Hugging Face cache involved)."""
        if not self.hub:
            return ""
        from shlex import quote  # the config's text reaches the shell as one literal word, never as code
        cache = self.c["model"]["cache"]
        home = quote(cache) if os.path.isabs(cache) else f'"$PWD"/{quote(cache)}'
        return f'export HF_HOME={home}; export HF_HUB_CACHE="$HF_HOME/hub" HF_HUB_OFFLINE=1; '

    def tokenizer_source(self) -> str:
        """The model folder or hub id whose tokenizer and chat template count response tokens (the tiny
        model's tokenizer is built once with it and never changes)."""
        return self.path("base_init") if self.tiny else self.c["model"]["source"]

    def tokenizer_inputs(self) -> list:
        return [self.path("base_init")] if self.tiny else self.model_inputs()

    def base_model(self) -> str:
        """Folder (or hub id) of the base VLM."""
        if self.tiny:
            return self.path("pretrain_dir", "model") if self.c["pretrain"]["enabled"] else self.path("base_init")
        return self.c["model"]["source"]

    def run_file(self, key, file: str | None = None) -> str | None:
        """A file of the training folder of a model key (`paths.RUN_FILES`: model, metrics, train_log,
        probes), or the folder itself; None for the base model (it has no training run here)."""
        k = ModelKey.parse(key) if isinstance(key, str) else key
        if k.kind == "base":
            return None
        if k.kind == "stage1":
            return self.path("stage1_dir", file, stage1=k.stage1, seed=k.seed)
        return self.path("stage2_dir", file, stage1=k.stage1, seed=k.seed, stage2=k.stage2)

    def pairs_summary_of(self, key) -> str | None:
        """The summary of the preference set a Stage-2 model key trained on (None for other keys)."""
        k = ModelKey.parse(key) if isinstance(key, str) else key
        if k.kind != "stage2":
            return None
        return self.path("pairs_summary", stage1=k.stage1, seed=k.seed, negset=self.stage2_negset(k.stage2))

    def run_dir(self, key) -> str | None:
        return self.run_file(key)

    def model_dir(self, key) -> str:
        return self.run_file(key, "model") or self.base_model()

    def stage_init(self, stage1: str, seed) -> str:
        """The model Stage 2 starts from and is referenced to (its frozen copy)."""
        return self.base_model() if stage1 == "base" else self.model_dir(ModelKey(stage1, int(seed)))

    def reference_of(self, key) -> str | None:
        """The model a model key is compared with for TV/JS: a Stage-2 run's reference, a Stage-1 run's base."""
        k = ModelKey.parse(key) if isinstance(key, str) else key
        if k.kind == "stage2":
            return self.stage_init(k.stage1, k.seed)
        return self.base_model() if k.kind == "stage1" else None

    def sft_key(self, key) -> str | None:
        """The SFT run of the same seed as `key` (for the win-rate column), or None."""
        k = ModelKey.parse(key) if isinstance(key, str) else key
        if k.kind != "base" and "sft" in self.c["stage1"]["recipes"]:
            return str(ModelKey("sft", k.seed))
        return None

    def vlm(self) -> Vlm:
        m = self.c["model"]
        text = m["input"] == "text"
        return Vlm(base=None if self.tiny else m["source"], prompt=self.c["prompt"], min_pixels=m["min_pixels"],
                   max_pixels=m["max_pixels"], dtype=m["dtype"], max_response_tokens=m["max_response_tokens"],
                   trust_remote_code=m["trust_remote_code"], input=m["input"],
                   scenes=self.data_json() if text else None)

    @property
    def evaluate_in_training_job(self) -> bool:
        """Whether a training job evaluates its own model (config compute.evaluate_in_training_job)."""
        v = self.c["compute"]["evaluate_in_training_job"]
        return self.tiny if v == "auto" else bool(v)

    # ---- runs ----
    def row_keys(self, row: dict) -> list:
        """Model keys of a table row, one per seed (the base model has no seed)."""
        if row.get("trivial"):
            return []
        st1, st2 = row.get("stage1", "base"), row.get("stage2")
        seeds = row.get("seeds", self.c["seeds"])
        if st2 is None:
            return ["base"] if st1 == "base" else [str(ModelKey(st1, s)) for s in seeds]
        return [str(ModelKey(st1, s, st2)) for s in seeds]

    def enabled_tables(self) -> dict:
        return {k: t for k, t in self.c["tables"].items() if t["enabled"]}

    def enabled_figures(self) -> dict:
        return {k: f for k, f in self.c["figures"].items() if f["enabled"]}

    def eval_file(self, kind: str) -> str:
        """The template of one evaluation file of a model key, `{key}` left in: kind "captions", "measures",
        "scores", "scores_<evalset>", "captions_<evalset>", "mcq_<mcqset>" or "pope_<popeset>"."""
        for prefix, name, wildcard in (("scores_", "set_scores", "evalset"), ("captions_", "set_captions", "evalset"),
                                       ("mcq_", "mcq", "mcqset"), ("pope_", "pope", "popeset")):
            if kind.startswith(prefix):
                return self.pattern(name).replace("{" + wildcard + "}", kind[len(prefix):])
        return self.pattern(kind)

    def eval_keys(self) -> list:
        keys = []
        rows = [row for table in self.enabled_tables().values() for row in table.get("rows", [])]
        # a calibration sweep also reads the controls' Stage-1 models (the task side of its rule)
        rows += [{"name": "", **{k: v for k, v in row.items() if k in ("stage1", "seeds")}}
                 for table in self.enabled_tables().values() if table["kind"] == "calibrate"
                 for row in table["rows"] if row.get("stage2")]
        for row in rows + [{"name": "", **sel} for sel in self.arm_selections()]:
            for k in self.row_keys(row):
                if k not in keys:
                    keys.append(k)
        return keys

    def needs_topk_beams(self, key: str) -> bool:
        """Whether a table shows the "top-k beams" scores of this model (only those evaluations decode them)."""
        for table in self.enabled_tables().values():
            if any(c.startswith("top-5") for c in table["columns"] or []) and \
                    any(key in self.row_keys(row) for row in table.get("rows", [])):
                return True
        return False

    def final_outputs(self) -> list:
        return [self.path("table", table=name) + ".md" for name in self.enabled_tables()] + \
            [self.path("figure", figure=name) + ".png" for name in self.enabled_figures()]

    def unfinished_runs(self) -> list:
        """The metrics.json of every planned training run whose folder holds the remains of an attempt
        (checkpoints, probe files) but no metrics.json: its job failed (Snakemake then deletes the job's
        outputs) or was killed. Snakemake does not rebuild a missing intermediate file while the tables
        after it exist, so after a failed job a plain rerun said "Nothing to be done" and left the run
        folder empty; the `all` rule asks for these files again. (A glob at parse time; no torch.)"""
        import glob
        s1, s2 = self.c["stage1"]["recipes"], self.c["stage2"]["recipes"]
        seeds = r"s(\d+)"
        found = []
        if self.tiny and self.c["pretrain"]["enabled"]:
            found.append(self.path("pretrain_dir", "metrics"))
        for stage in ("stage1_dir", "stage2_dir"):
            pattern = self.pattern(stage)
            regex = re.escape(pattern).replace(r"\{stage1\}", "([^/]+)").replace(r"s\{seed\}", seeds) \
                .replace(r"\{stage2\}", "([^/]+)")
            for folder in glob.glob(pattern.replace("{stage1}", "*").replace("{seed}", "*").replace("{stage2}", "*")):
                m = re.fullmatch(regex, folder)
                if not m or not os.path.isdir(folder):
                    continue
                known = (m.group(1) in s1 if stage == "stage1_dir" else
                         (m.group(1) == "base" or m.group(1) in s1) and m.group(3) in s2)
                if known:
                    found.append(os.path.join(folder, "metrics.json"))
        return [f for f in found if os.path.isdir(os.path.dirname(f)) and not os.path.exists(f)
                and os.listdir(os.path.dirname(f))]

    # ---- extra evaluation sets (Flickr30k, NoCaps, the shapes OOD split) and MCQ sets ----
    def eval_sets(self) -> dict:
        return {k: v for k, v in self.c["eval_sets"].items() if v["enabled"]}

    def mcq_sets(self) -> dict:
        return {k: v for k, v in self.c["mcq_sets"].items() if v["enabled"]}

    def pope_sets(self) -> dict:
        return {k: v for k, v in self.c["pope_sets"].items() if v["enabled"]}

    def eval_set_data(self, name: str) -> DataSpec:
        es = self.eval_sets()[name]
        if es["source"] == "shapes":
            return dataclasses.replace(self.data_spec("test"), splits=es["splits"])
        return DataSpec(json=es["json"], image_root=es["image_root"], splits=es["splits"],
                        on_bad_input=self.c["data"]["on_bad_input"], validated=None, stage=None, stage1_fraction=None)

    # ---- COCO objects of the captioned images (CHAIR on real captions) ----
    def instances_of(self, source: str) -> list:
        """The COCO instance annotation files of a data source: "data" (the test split) or an eval set."""
        if source == "data":
            return [] if self.is_shapes else list(self.c["data"]["karpathy"]["instances"] or [])
        es = self.eval_sets()[source]
        return list(es["instances"] or []) if es["source"] == "karpathy" else []

    def objects_file(self, source: str) -> str | None:
        return self.path("objects", source=source) if self.instances_of(source) else None

    def objects_files(self) -> list:
        return [f for f in [self.objects_file("data")] + [self.objects_file(n) for n in self.eval_sets()] if f]

    def coco_objects_spec(self, source: str) -> CocoObjectsSpec:
        data = self.data_spec("test") if source == "data" else self.eval_set_data(source)
        return CocoObjectsSpec(instances=self.instances_of(source), data=data)

    def score_files(self) -> list:
        """(captions, scores) paths of every caption file the score job reads."""
        pairs = []
        for k in self.eval_keys() + [TRIVIAL]:
            pairs.append((self.path("captions", key=k), self.path("scores", key=k)))
            if k != TRIVIAL:
                for name in self.eval_sets():
                    pairs.append((self.path("set_captions", key=k, evalset=name),
                                  self.path("set_scores", key=k, evalset=name)))
        return pairs

    # ---- negatives and Stage 2 ----
    def stage2_negset(self, stage2: str) -> str:
        return stage2_recipe(self.c, stage2)["negatives"]

    def needs_onpolicy(self, negset: str) -> bool:
        return onpolicy_share(self.c["negatives"]["sets"][negset]) > 0

    def needs_beams(self, negset: str) -> bool:
        return self.c["negatives"]["sets"][negset]["beams"] > 0

    def calibration_choice_file(self) -> str:
        """The calibration rule's outcome that recipes with `lr: calibrated` read (stage2.calibration)."""
        return self.path("calibration_choice", table=self.c["stage2"]["calibration"])

    def calibrated(self, stage2: str) -> bool:
        return stage2_recipe(self.c, stage2)["lr"] == CALIBRATED

    def probes_enabled(self) -> bool:
        return bool(self.c["probes"]["enabled"])

    def init_inputs(self, stage1: str, seed) -> list:
        """The model a Stage-2 run (and its sampling / reference pass) starts from, when the DAG makes it,
        and the fetched hub model under it."""
        if stage1 == "base" and not self.tiny:
            return self.model_inputs()
        return [self.stage_init(stage1, seed)] + self.model_inputs()

    def pairs_inputs(self, stage1: str, seed, negset: str) -> dict:
        inputs = {"data": self.data_inputs(), "tokenizer": self.tokenizer_inputs()}
        if self.needs_onpolicy(negset):
            inputs["onpolicy"] = self.path("onpolicy", stage1=stage1, seed=seed)
        if self.needs_beams(negset):
            inputs["beams"] = self.path("beams", stage1=stage1, seed=seed)
        if self.c["negatives"]["external"]:
            inputs["external"] = self.c["negatives"]["external"]
        return inputs

    def probe_set_inputs(self, start: str, seed) -> dict:
        inputs = {"data": self.data_inputs()}
        if self.c["negatives"]["onpolicy"]["enabled"]:
            inputs["onpolicy"] = self.path("onpolicy", stage1=start, seed=seed)
        return inputs

    def train_inputs(self, stage: str, wildcards) -> dict:
        """The inputs of a training rule (`stage` "stage1" / "stage2") for its job's wildcards."""
        if stage == "stage1":
            return self.stage1_inputs(wildcards.stage1, wildcards.seed)
        return self.stage2_inputs(wildcards.stage1, wildcards.seed, wildcards.stage2)

    def train_spec(self, stage: str, wildcards) -> TrainSpec:
        """The spec of a training rule's job (`stage` "stage1" / "stage2") for its wildcards."""
        if stage == "stage1":
            return self.stage1_spec(wildcards.stage1, wildcards.seed)
        return self.stage2_spec(wildcards.stage1, wildcards.seed, wildcards.stage2)

    def stage1_inputs(self, recipe: str, seed) -> dict:
        inputs = {"data": self.data_inputs(), "hub": self.model_inputs()}
        if self.tiny:
            inputs["model"] = self.base_model()
        if self.probes_enabled():
            inputs["probe"] = self.path("probe_set", stage1="base", seed=seed)
        return {**inputs, **self._fused_eval_inputs(ModelKey(recipe, int(seed)))}

    def stage2_inputs(self, stage1: str, seed, stage2: str) -> dict:
        negset = self.stage2_negset(stage2)
        inputs = {"data": self.data_inputs(), "pairs": self.path("pairs", stage1=stage1, seed=seed, negset=negset),
                  "pairs_summary": self.path("pairs_summary", stage1=stage1, seed=seed, negset=negset),
                  "ref": self.path("ref_logps", stage1=stage1, seed=seed, negset=negset), "hub": self.model_inputs()}
        if stage1 != "base" or self.tiny:
            inputs["model"] = self.stage_init(stage1, seed)
        if self.probes_enabled():
            inputs["probe"] = self.path("probe_set", stage1=stage1, seed=seed)
        if self.calibrated(stage2):
            inputs["lr_choice"] = self.calibration_choice_file()
        return {**inputs, **self._fused_eval_inputs(ModelKey(stage1, int(seed), stage2))}

    def _fused_eval_inputs(self, key: ModelKey) -> dict:
        """What a training job that also evaluates its model reads for the evaluation (not its own outputs)."""
        if not self.evaluate_in_training_job:
            return {}
        inputs = self.eval_inputs(str(key))
        for own in ("model", "run_metrics", "data"):
            inputs.pop(own, None)
        return {f"eval_{name}": files for name, files in inputs.items()}

    def run_outputs(self, stage: str) -> dict:
        """The file outputs of a training rule (`stage` "stage1" / "stage2", wildcards left in; the model
        folder, a directory() output, is declared by the rule): the run's files and, when the training job
        evaluates its model, the model's evaluation files."""
        outputs = {file: self.pattern(f"{stage}_dir", file) for file in ("metrics", "train_log", "probes")}
        if self.evaluate_in_training_job:
            outputs.update(self.eval_outputs(KEY_TEMPLATES[stage]))
        return outputs

    def eval_outputs(self, key: str) -> dict:
        """The evaluation files of a model key (a key with wildcards left in, for a rule, or a real one)."""
        def fill(pattern):
            return pattern.replace("{key}", key)
        return {"captions": fill(self.pattern("captions")), "measures": fill(self.pattern("measures")),
                "sets": [fill(self.eval_file(f"captions_{n}")) for n in self.eval_sets()],
                "mcq": [fill(self.eval_file(f"mcq_{n}")) for n in self.mcq_sets()],
                "pope": [fill(self.eval_file(f"pope_{n}")) for n in self.pope_sets()]}

    def evaluated_apart(self) -> str:
        """The model keys the `evaluate` rule makes: all, or only the base model when training jobs
        evaluate their own models."""
        return "base" if self.evaluate_in_training_job else ModelKey.PATTERN

    def fused_eval_args(self, key) -> str:
        """The `cwdpo train` flags that evaluate the trained model in the same job ("" when not fused); `key`: the
        model key, or the training job's wildcards."""
        key = key if isinstance(key, str) else str(ModelKey.of_wildcards(key))
        if not self.evaluate_in_training_job:
            return ""
        from shlex import quote
        from .specs import to_json
        out = self.eval_outputs(key)
        return (f"--evaluate {quote(to_json(self.eval_spec(key)))} --captions {quote(out['captions'])} "
                f"--measures {quote(out['measures'])}")

    def eval_inputs(self, key: str) -> dict:
        k = ModelKey.parse(key)
        inputs = {"data": self.data_inputs(), "heldout": self.path("heldout_pairs"), "hub": self.model_inputs()}
        inputs["sets"] = [es["json"] for es in self.eval_sets().values() if es["source"] == "karpathy"] + \
            self.mcq_inputs() + \
            [p["files"][s] for p in self.pope_sets().values() if p["format"] == "pope" for s in p["settings"]]
        inputs["objects"] = self.objects_files()
        if k.kind != "base" or self.tiny:
            inputs["model"] = self.model_dir(k)
        if k.kind == "stage2":
            inputs["run_metrics"] = self.run_file(k, "metrics")
        ref = self.reference_of(k)
        if ref is not None and (ref != self.base_model() or self.tiny):
            inputs["reference"] = ref
        return inputs

    # ---- specs for the CLI ----
    def build_model_spec(self) -> BuildModelSpec:
        m = self.c["model"]
        return BuildModelSpec(data=self.data_spec("pretrain"), tiny=m["tiny"], prompt=self.c["prompt"],
                              min_pixels=m["min_pixels"], max_pixels=m["max_pixels"], seed=self.c["pretrain_seed"])

    def pretrain_spec(self) -> TrainSpec:
        hp = {k: v for k, v in self.c["pretrain"].items() if k not in ("enabled", "stability_seeds", "qa_share")}
        return TrainSpec(method="sft", init=self.path("base_init"), seed=self.c["pretrain_seed"], vlm=self.vlm(),
                         data=self.data_spec("pretrain"), hparams=hp, train=self.c["train"], lora=None, probes=None,
                         negatives=None, data_seed=None, pairs=None, ref_logps=None,
                         qa_share=self.c["pretrain"]["qa_share"])

    def stability_seeds(self) -> list:
        """Other pretraining seeds of the tiny base model (T-regime's stability row); none for a given model."""
        return list(self.c["pretrain"]["stability_seeds"]) if self.tiny and self.c["pretrain"]["enabled"] else []

    def stability_spec(self, seed) -> StabilitySpec:
        e = self.c["evaluate"]
        return StabilitySpec(seed=int(seed), build=dataclasses.replace(self.build_model_spec(), seed=int(seed)),
                             train=dataclasses.replace(self.pretrain_spec(), seed=int(seed), init=""),
                             test=self.data_spec("test"), num_beams=e["num_beams"],
                             max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"],
                             mcq_sets=tuple(self.mcq_specs(lambda name: "")))

    def probes_spec(self, start: str, seed, stage: int) -> ProbesSpec | None:
        p = self.c["probes"]
        if not p["enabled"]:
            return None
        return ProbesSpec(rows=self.path("probe_set", stage1=start, seed=seed), interval=p["interval"],
                          batch_size=p["batch_size"], n_bins=p["n_bins"], images=p["images"],
                          val=self.data_spec("val"), val_images=p["val_images"], val_interval=p["val_interval"],
                          top5=bool(p["top5"] and stage == 1), max_new_tokens=self.c["evaluate"]["max_new_tokens"])

    def stage1_spec(self, recipe: str, seed) -> TrainSpec:
        hp = stage1_recipe(self.c, recipe)
        method = hp.pop("method")
        qa_share = hp.pop("qa_share")
        sft_c = REGISTRY[method].reads_negatives  # only SFT-C does: others do not rerun when negatives change
        return TrainSpec(method=method, init=self.base_model(), seed=int(seed), vlm=self.vlm(),
                         data=self.data_spec("finetune", stage="stage1"), hparams=hp, train=self.c["train"],
                         lora=self.c["model"]["lora"], probes=self.probes_spec("base", seed, stage=1),
                         negatives=self.negatives_spec() if sft_c else None,
                         data_seed=self.c["data"]["shapes"]["seed"] if sft_c or qa_share else None, pairs=None,
                         ref_logps=None, qa_share=qa_share)

    def stage2_spec(self, stage1: str, seed, stage2: str) -> TrainSpec:
        hp = stage2_recipe(self.c, stage2)
        method = hp.pop("method")
        negset = hp.pop("negatives")
        return TrainSpec(method=method, init=self.stage_init(stage1, seed), seed=int(seed), vlm=self.vlm(),
                         data=self.data_spec("finetune", stage="stage2"), hparams=hp, train=self.c["train"],
                         lora=self.c["model"]["lora"], probes=self.probes_spec(stage1, seed, stage=2),
                         negatives=None, data_seed=None,
                         pairs=self.path("pairs", stage1=stage1, seed=seed, negset=negset),
                         ref_logps=self.path("ref_logps", stage1=stage1, seed=seed, negset=negset),
                         lr_choice=self.calibration_choice_file() if self.calibrated(stage2) else None,
                         pairs_summary=self.path("pairs_summary", stage1=stage1, seed=seed, negset=negset))

    def mcq_inputs(self) -> list:
        """The MCQ sets' files a job that answers them reads (a glob path is checked by the config instead)."""
        return [m["path"] for m in self.mcq_sets().values() if m["path"] and "*" not in m["path"]]

    def mcq_specs(self, out) -> list:
        """The enabled MCQ sets as `McqSpec`s, each written to `out(name)`."""
        mcq = []
        for name, m in self.mcq_sets().items():
            data = dataclasses.replace(self.data_spec("test"), splits=m["splits"]) if m["format"] == "shapes" else None
            mcq.append(McqSpec(name=name, out=out(name), data=data, **m))
        return mcq

    def eval_spec(self, key: str) -> EvalSpec:
        k = ModelKey.parse(key)
        e = self.c["evaluate"]
        floor = self.c["stage2"]["defaults"]["l_floor"]
        sets = [EvalSetSpec(name=n, data=self.eval_set_data(n), domains=es["domains"],
                            out=self.path("set_captions", key=key, evalset=n), objects=self.objects_file(n))
                for n, es in self.eval_sets().items()]
        mcq = self.mcq_specs(lambda name: self.path("mcq", key=key, mcqset=name))
        pope = tuple(PopeSpec(name=name, out=self.path("pope", key=key, popeset=name),
                              data=dataclasses.replace(self.data_spec("test"), splits=p["splits"]) if p["format"] ==
                              "shapes" else None,
                              train=self.data_spec("pretrain") if p["format"] == "shapes" else None,
                              **{k: v for k, v in p.items() if k not in ("enabled", "splits")})
                     for name, p in self.pope_sets().items())
        return EvalSpec(vlm=self.vlm(), model=self.model_dir(k), data=self.data_spec("test"),
                        num_beams=e["num_beams"], max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"],
                        forward_batch_size=e["forward_batch_size"],
                        topk_beams=e["topk_beams"] if self.needs_topk_beams(key) else 0,
                        heldout_pairs=self.path("heldout_pairs"),
                        l_floor=floor if floor != "mean" else MEAN_FLOOR_FALLBACK,
                        run_metrics=self.run_file(k, "metrics") if k.kind == "stage2" else None,
                        tau=self.c["stage2"]["defaults"]["tau"], reference=self.reference_of(k),
                        n_bins=self.c["probes"]["n_bins"], pixel_cache_mb=self.c["train"]["pixel_cache_mb"],
                        eval_sets=sets, mcq_sets=mcq, objects=self.objects_file("data"), pope_sets=pope)

    def sample_spec(self, stage1: str, seed) -> SampleSpec:
        o = self.c["negatives"]["onpolicy"]
        return SampleSpec(vlm=self.vlm(), model=self.stage_init(stage1, seed), onpolicy=o,
                          seed=int(o["seed"]) + int(seed), data=self.data_spec("finetune", stage="stage2"),
                          probe_data=self.data_spec("probe") if self.probes_enabled() else None,
                          probe_images=self.c["probes"]["images"])

    def pairs_spec(self, stage1: str, seed, negset: str) -> PairsSpec:
        n = self.c["negatives"]
        s = n["sets"][negset]
        o = n["onpolicy"]
        select = o["select"] if o["select"] != "auto" else ("grounding" if self.is_shapes else "relative")
        rule = {"absolute": f"CIDEr-D below threshold {o['threshold']}",
                "relative": f"the {o['quantile']:g} of each image's samples with the lowest CIDEr-D"}
        rule = rule.get(select, select)
        pools = []
        if self.needs_onpolicy(negset):
            pools.append(f"on-policy: select {rule}, k {o['k']} samples per image (negatives.onpolicy.k)")
        if self.needs_beams(negset):
            pools.append(f"wrong beams: k {n['beams']['k']} beams per image (negatives.beams.k)")
        return PairsSpec(prompt=self.c["prompt"], data=self.data_spec("finetune", stage="stage2"),
                         negatives=self.negatives_spec(), rho=s["rho"], p_easy=s.get("p_easy"), seed=int(seed),
                         tokenizer=self.tokenizer_source(),
                         max_response_tokens=self.c["model"]["max_response_tokens"], beams=s["beams"],
                         name=negset, min_fill=n["min_fill"] if s.get("min_fill") is None else s["min_fill"],
                         pools="; ".join(pools))

    def beam_spec(self, stage1: str, seed) -> BeamSpec:
        b = self.c["negatives"]["beams"]
        return BeamSpec(vlm=self.vlm(), model=self.stage_init(stage1, seed),
                        data=self.data_spec("finetune", stage="stage2"), k=b["k"], max_new_tokens=b["max_new_tokens"],
                        batch_size=b["batch_size"])

    def heldout_spec(self) -> PairsSpec:
        """Held-out pairs of the test split: dataset negatives only (no external file), a fixed seed."""
        return PairsSpec(prompt=self.c["prompt"], data=self.data_spec("test"),
                         negatives=self.negatives_spec(external=False), rho=1.0,
                         p_easy=self.c["negatives"]["p_easy"], seed=self.c["evaluate"]["heldout_seed"],
                         tokenizer=self.tokenizer_source(),
                         max_response_tokens=self.c["model"]["max_response_tokens"])

    def ref_spec(self, stage1: str, seed) -> RefSpec:
        return RefSpec(vlm=self.vlm(), model=self.stage_init(stage1, seed),
                       batch_size=self.c["stage2"]["ref_batch_size"])

    def probe_set_spec(self, start: str, seed) -> ProbeSetSpec:
        return ProbeSetSpec(probe_data=self.data_spec("probe"), probe_images=self.c["probes"]["images"],
                            negatives=self.negatives_spec(external=False), seed=int(seed))

    def trivial_spec(self) -> TrivialSpec:
        return TrivialSpec(train=self.data_spec("pretrain" if self.c["pretrain"]["enabled"] else "finetune"),
                           test=self.data_spec("test"), objects=self.objects_file("data"))

    # ---- compute ----
    def gpus(self, kind: str) -> int:
        """GPUs a job of `kind` ('train' or 'infer') asks for (the `gpu` resource of its rule)."""
        return int(self.c["compute"]["gpus_per_train_job" if kind == "train" else "gpus_per_infer_job"])

    def threads(self) -> int:
        """The `threads` of the GPU rules' jobs (config compute.threads)."""
        return int(self.c["compute"]["threads"])

    def dataloader_workers(self) -> int:
        """Data-loader worker processes of each training process (config compute.dataloader_workers)."""
        return int(self.c["compute"]["dataloader_workers"])

    def gpu_prefix(self, kind: str) -> str:
        """What a GPU job's command starts with: `cwdpo gpus --n N -- ` takes N free GPUs of the visible ones
        for it (CUDA_VISIBLE_DEVICES; `cwdpo.gpus`), so local jobs never share a GPU. Nothing for CPU jobs."""
        n = self.gpus(kind)
        return f"cwdpo gpus --n {n} -- " if n > 0 else ""

    def launcher(self, kind: str) -> str:
        """The command that starts `cwdpo`: plain, or torchrun/accelerate with one process per GPU. The
        launchers run the same `cwdpo` console script (`--no-python`), so every process imports the installed
        package — never a `cwdpo/` folder that happens to be in the working directory (`python -m` would)."""
        n = self.gpus(kind)
        if kind != "train" or n <= 1:
            return "cwdpo"
        if self.c["compute"]["launcher"] == "accelerate":
            return f"accelerate launch --num_processes {n} --no_python cwdpo"
        return f"torchrun --standalone --nproc_per_node {n} --no-python cwdpo"


def settings_for_variants(per_rule, suffixes) -> dict:
    """A Snakemake per-rule setting (a profile's set-resources or set-threads: {rule: value}) with every entry
    of a rule also given to the rule's variant copies `<rule><suffix>` (`Plan.all_plans`) that have none of
    their own: Snakemake keys these settings by exact rule name, so a variant's jobs would otherwise get the
    defaults (60 minutes, 4 GB, 1 thread)."""
    out = dict(per_rule)
    for name, value in per_rule.items():
        if "__" not in name:  # a rule of the experiment itself, not a variant's copy
            for suffix in suffixes:
                out.setdefault(name + suffix, value)
    return out
