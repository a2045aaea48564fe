# The base VLM. tiny: built offline with random weights, then pretrained on the `shapes` train split.
# Hub ids / local folders (config model.source) are used as they are.
for SFX, Q in PLANS:

    if Q.tiny:

        rule:
            name:
                f"build_model{SFX}"
            input:
                Q.data_inputs(),
            output:
                directory(Q.pattern("base_init")),
            log:
                f"{Q.out}/logs/build_model.log",
            benchmark:
                f"{Q.out}/benchmarks/build_model.tsv"
            params:
                spec=to_json(Q.build_model_spec()),
            shell:
                logged(
                    "cwdpo build-model --spec {params.spec:q} --out {output:q}"
                )

    if Q.tiny and Q.c["pretrain"]["enabled"]:

        rule:
            name:
                f"pretrain{SFX}"
            input:
                model=Q.pattern("base_init"),
                data=Q.data_inputs(),
            output:
                model=directory(Q.pattern("pretrain_dir", "model")),
                metrics=Q.pattern("pretrain_dir", "metrics"),
                train_log=Q.pattern("pretrain_dir", "train_log"),
            log:
                f"{Q.out}/logs/pretrain.log",
            benchmark:
                f"{Q.out}/benchmarks/pretrain.tsv"
            threads: lambda wildcards: workflow.cores  # a callable: `snakemake --unlock` (no --cores) must parse
            resources:
                gpu=Q.gpus("train"),
            params:
                spec=to_json(Q.pretrain_spec()),
                out=lambda wc, output: os.path.dirname(output.metrics),
                launch=Q.launcher("train"),
            shell:
                logged(
                    "{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads}"
                )

        # the same pretraining from other seeds, measured only (T-regime: the testbed's stability)
        rule:
            name:
                f"stability{SFX}"
            input:
                Q.data_inputs(),
            output:
                Q.pattern("stability"),
            log:
                f"{Q.out}/logs/stability_s{{seed}}.log",
            benchmark:
                f"{Q.out}/benchmarks/stability_s{{seed}}.tsv"
            threads: 1
            params:
                spec=lambda wc, Q=Q: to_json(Q.stability_spec(wc.seed)),
                out=lambda wc, output: os.path.dirname(output[0]),
            shell:
                logged(
                    "cwdpo stability --spec {params.spec:q} --out {params.out:q} --threads {threads}"
                )
