# Stage 1 (SFT / SFT-C on 75% of the finetune split) and Stage 2 (DPO / Focal-DPO / CW-DPO on the other
# 25%, from the frozen Stage-1 model as reference; stage1 = base: straight from the base model).
for SFX, Q in PLANS:

    rule:
        name:
            f"stage1{SFX}"
        input:
            unpack(lambda wc, Q=Q: Q.stage1_inputs(wc.stage1, wc.seed)),
        output:
            model=directory(Q.pattern("stage1_dir", "model")),
            **Q.run_outputs("stage1"),
        log:
            Q.log_file("stage1"),
        benchmark:
            Q.benchmark_file("stage1")
        threads: Q.threads()
        resources:
            gpu=Q.gpus("train"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.stage1_spec(wc.stage1, wc.seed)),
            out=lambda wc, output: os.path.dirname(output.metrics),
            launch=Q.launcher("train"),
            gpus=Q.gpu_prefix("train"),
            workers=Q.dataloader_workers(),
            evaluate=lambda wc, Q=Q: Q.fused_eval_args(wc),
        shell:
            logged(
                "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} "
                "--dataloader-workers {params.workers} "
                "{params.evaluate}"
            )

    rule:
        name:
            f"stage2{SFX}"
        input:
            unpack(lambda wc, Q=Q: Q.stage2_inputs(wc.stage1, wc.seed, wc.stage2)),
        output:
            model=directory(Q.pattern("stage2_dir", "model")),
            **Q.run_outputs("stage2"),
        log:
            Q.log_file("stage2"),
        benchmark:
            Q.benchmark_file("stage2")
        threads: Q.threads()
        resources:
            gpu=Q.gpus("train"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.stage2_spec(wc.stage1, wc.seed, wc.stage2)),
            out=lambda wc, output: os.path.dirname(output.metrics),
            launch=Q.launcher("train"),
            gpus=Q.gpu_prefix("train"),
            workers=Q.dataloader_workers(),
            evaluate=lambda wc, Q=Q: Q.fused_eval_args(wc),
        shell:
            logged(
                "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} "
                "--dataloader-workers {params.workers} "
                "{params.evaluate}"
            )
