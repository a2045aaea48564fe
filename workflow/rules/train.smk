# Stage 1 (SFT / SFT-C on 75% of the finetune split) and Stage 2 (DPO / Focal-DPO / CW-DPO on the other
# 25%, from the frozen Stage-1 model as reference; stage1 = base: straight from the base model).


rule stage1:
    input:
        unpack(lambda wc: P.stage1_inputs(wc.seed)),
    output:
        model=directory(P.pattern("stage1_dir", "model")),
        metrics=P.pattern("stage1_dir", "metrics"),
        train_log=P.pattern("stage1_dir", "train_log"),
        probes=P.pattern("stage1_dir", "probes"),
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
        gpus=P.gpu_prefix("train"),
    shell:
        "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"


rule stage2:
    input:
        unpack(lambda wc: P.stage2_inputs(wc.stage1, wc.seed, wc.stage2)),
    output:
        model=directory(P.pattern("stage2_dir", "model")),
        metrics=P.pattern("stage2_dir", "metrics"),
        train_log=P.pattern("stage2_dir", "train_log"),
        probes=P.pattern("stage2_dir", "probes"),
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
        gpus=P.gpu_prefix("train"),
    shell:
        "{params.gpus}{params.launch} train --spec {params.spec:q} --out {params.out:q} --threads {threads} > {log:q} 2>&1"
