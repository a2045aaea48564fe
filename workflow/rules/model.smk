# The base VLM. tiny: built offline with random weights, then pretrained on the `shapes` train split.
# A hub id (config model.source) is fetched once into the workflow's own Hugging Face cache (model.cache,
# default resources/huggingface) by a local job (compute nodes often have no internet); every other job
# reads it offline (common.smk). A local folder is used as it is.
if P.hub:

    rule fetch_model:
        output:
            P.fetch_marker(),
        log:
            f"{OUT}/logs/fetch_model.log",
        localrule: True
        params:
            model=config["model"]["source"],
            cache=config["model"]["cache"],
        shell:
            logged(
                "HF_HUB_OFFLINE=0 cwdpo fetch-model --model {params.model:q} --cache {params.cache:q} --out {output:q}"
            )

if P.tiny:

    rule build_model:
        input:
            P.data_inputs(),
        output:
            directory(P.pattern("base_init")),
        log:
            f"{OUT}/logs/build_model.log",
        benchmark:
            f"{OUT}/benchmarks/build_model.tsv"
        params:
            spec=to_json(P.build_model_spec()),
        shell:
            logged(
                "cwdpo build-model --spec {params.spec:q} --out {output:q}"
            )


if P.tiny and config["pretrain"]["enabled"]:

    rule pretrain:
        input:
            model=P.pattern("base_init"),
            data=P.data_inputs(),
        output:
            model=directory(P.pattern("pretrain_dir", "model")),
            metrics=P.pattern("pretrain_dir", "metrics"),
            train_log=P.pattern("pretrain_dir", "train_log"),
        log:
            f"{OUT}/logs/pretrain.log",
        benchmark:
            f"{OUT}/benchmarks/pretrain.tsv"
        threads: lambda wildcards: workflow.cores  # a callable: `snakemake --unlock` (no --cores) must parse
        resources:
            gpu=P.gpus("train"),
        params:
            spec=to_json(P.pretrain_spec()),
            out=lambda wc, output: os.path.dirname(output.metrics),
            launch=P.launcher("train"),
            gpus=P.gpu_prefix("train"),
        shell:
            logged(
                "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads}"
            )

    # the same pretraining from other seeds, measured only (T-regime: the testbed's stability)
    rule stability:
        input:
            P.data_inputs(),
        output:
            P.pattern("stability"),
        log:
            f"{OUT}/logs/stability_s{{seed}}.log",
        benchmark:
            f"{OUT}/benchmarks/stability_s{{seed}}.tsv"
        threads: 1
        params:
            spec=lambda wc: to_json(P.stability_spec(wc.seed)),
            out=lambda wc, output: os.path.dirname(output[0]),
        shell:
            logged(
                "cwdpo stability --spec {params.spec:q} --out {params.out:q} --threads {threads}"
            )
