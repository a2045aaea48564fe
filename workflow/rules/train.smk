# Stage 1 (SFT / SFT-C on 75% of the finetune split).


rule stage1:
    input:
        model=P.model_inputs("base"),
        data=P.data_json(),
    output:
        model=directory(f"{OUT}/stage1/{{stage1}}/s{{seed}}/model"),
        metrics=f"{OUT}/stage1/{{stage1}}/s{{seed}}/metrics.json",
        train_log=f"{OUT}/stage1/{{stage1}}/s{{seed}}/train_log.csv",
    log:
        f"{OUT}/logs/stage1/{{stage1}}_s{{seed}}.log",
    benchmark:
        f"{OUT}/benchmarks/stage1/{{stage1}}_s{{seed}}.tsv"
    threads: 1
    params:
        spec=lambda wc, threads: dumps(P.stage1_spec(wc.stage1, wc.seed, threads)),
        out=lambda wc, output: os.path.dirname(output.metrics),
    shell:
        "cwdpo train --spec {params.spec:q} --out {params.out:q} > {log:q} 2>&1"
