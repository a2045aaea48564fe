# Stage 1 (SFT / SFT-C on 75% of the finetune split) and Stage 2 (DPO / Focal-DPO / CW-DPO on the other
# 25%, from the frozen Stage-1 model as reference; stage1 = base: straight from the base model): one rule per
# stage, the same shape — their inputs and specs come from the plan (Plan.train_inputs, Plan.train_spec).
for SFX, Q in PLANS:
    for STAGE in ("stage1", "stage2"):

        rule:
            name:
                f"{STAGE}{SFX}"
            input:
                unpack(lambda wc, Q=Q, S=STAGE: Q.train_inputs(S, wc)),
            output:
                model=directory(Q.pattern(f"{STAGE}_dir", "model")),
                **Q.run_outputs(STAGE),
            log:
                Q.log_file(STAGE),
            benchmark:
                Q.benchmark_file(STAGE)
            threads: Q.threads()
            resources:
                gpu=Q.gpus("train"),
            params:
                spec=lambda wc, Q=Q, S=STAGE: to_json(Q.train_spec(S, wc)),
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
