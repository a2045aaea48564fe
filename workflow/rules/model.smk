# The base VLM. tiny: built offline with random weights, then pretrained on the `shapes` train split.
# A hub id (config model.source) is fetched once into the workflow's own Hugging Face cache (model.cache,
# default resources/huggingface) by a local job (compute nodes often have no internet); every other job
# reads it offline (common.smk). A local folder is used as it is. (Variants share the experiment's model
# source and cache: one fetch serves them all.)
if P.hub:

    rule fetch_model:
        output:
            P.fetch_marker(),
        log:
            P.log_file("fetch_model"),
        localrule: True
        params:
            model=config["model"]["source"],
            cache=config["model"]["cache"],
        shell:
            logged(
                "HF_HUB_OFFLINE=0 cwdpo fetch-model --model {params.model:q} --cache {params.cache:q} --out {output:q}"
            )

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
                Q.log_file("build_model"),
            benchmark:
                Q.benchmark_file("build_model")
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
                Q.log_file("pretrain"),
            benchmark:
                Q.benchmark_file("pretrain")
            # one core, as every training job (compute.threads): the tiny model gains ≈ 1.2× from a second
            # thread, so a stability seed pretrains on the other core meanwhile; first among ready jobs, since
            # every later job waits for the base model (the stability seeds can wait)
            threads: Q.threads()
            priority: 10
            resources:
                gpu=Q.gpus("train"),
            params:
                spec=to_json(Q.pretrain_spec()),
                out=lambda wc, output: os.path.dirname(output.metrics),
                launch=Q.launcher("train"),
                gpus=Q.gpu_prefix("train"),
                workers=Q.dataloader_workers(),
            shell:
                logged(
                    "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} "
                    "--dataloader-workers {params.workers}"
                )

        # the same pretraining from other seeds, measured only (T-regime: the testbed's stability), beside the
        # base model's
        rule:
            name:
                f"stability{SFX}"
            input:
                data=Q.data_inputs(),
                mcq=Q.mcq_inputs(),
            output:
                Q.pattern("stability"),
            log:
                Q.log_file("stability"),
            benchmark:
                Q.benchmark_file("stability")
            threads: Q.threads()
            params:
                spec=lambda wc, Q=Q: to_json(Q.stability_spec(wc.seed)),
                out=lambda wc, output: os.path.dirname(output[0]),
            shell:
                logged(
                    "cwdpo stability --spec {params.spec:q} --out {params.out:q} --threads {threads}"
                )
