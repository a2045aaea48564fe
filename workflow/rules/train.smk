# Stage 1 (SFT / SFT-C on 75% of the finetune split) and Stage 2 (DPO / Focal-DPO / CW-DPO on the other
# 25%, from the frozen Stage-1 model as reference; stage1 = base: straight from the base model).


rule stage1:
    input:
        unpack(lambda wc: P.stage1_inputs(wc.stage1, wc.seed)),
    output:
        model=directory(P.pattern("stage1_dir", "model")),
        **P.run_outputs("stage1"),
    log:
        f"{OUT}/logs/stage1/{{stage1}}_s{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/stage1/{{stage1}}_s{{seed}}.tsv"
    threads: 1
    resources:
        gpu=P.gpus("train"),
    params:
        spec=lambda wc: to_json(P.stage1_spec(wc.stage1, wc.seed)),
        out=lambda wc, output: os.path.dirname(output.metrics),
        launch=P.launcher("train"),
        evaluate=lambda wc: P.fused_eval_args(f"stage1/{wc.stage1}/s{wc.seed}"),
        gpus=P.gpu_prefix("train"),
    shell:
        logged(
            "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} "
            "{params.evaluate}"
        )


rule stage2:
    input:
        unpack(lambda wc: P.stage2_inputs(wc.stage1, wc.seed, wc.stage2)),
    output:
        model=directory(P.pattern("stage2_dir", "model")),
        **P.run_outputs("stage2"),
    log:
        f"{OUT}/logs/stage2/{{stage1}}_s{{seed}}_{{stage2}}.log",
    benchmark:
        f"{OUT}/benchmarks/stage2/{{stage1}}_s{{seed}}_{{stage2}}.tsv"
    threads: 1
    resources:
        gpu=P.gpus("train"),
    params:
        spec=lambda wc: to_json(P.stage2_spec(wc.stage1, wc.seed, wc.stage2)),
        out=lambda wc, output: os.path.dirname(output.metrics),
        launch=P.launcher("train"),
        evaluate=lambda wc: P.fused_eval_args(f"stage2/{wc.stage1}/s{wc.seed}/{wc.stage2}"),
        gpus=P.gpu_prefix("train"),
    shell:
        logged(
            "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} "
            "{params.evaluate}"
        )
