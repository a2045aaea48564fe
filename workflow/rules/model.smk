# The base VLM. tiny: built offline with random weights, then pretrained on the `shapes` train split.
# Hub ids / local folders (config model.source) are used as they are.
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
        shell:
            logged(
                "{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads}"
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
