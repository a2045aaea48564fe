# Every evaluated model: beam-search captions on the test split and teacher-forced measures (held-out
# pairs), then pycocoevalcap scores of all caption files in one job.


rule evaluate:
    input:
        unpack(lambda wc: P.eval_inputs(wc.key)),
    output:
        captions=f"{OUT}/eval/{{key}}/captions.json",
        measures=f"{OUT}/eval/{{key}}/measures.json",
        sets=[f"{OUT}/eval/{{key}}/captions_{name}.json" for name in P.eval_set_names()],
        mcq=[f"{OUT}/eval/{{key}}/mcq_{name}.json" for name in P.mcq_names()],
    log:
        f"{OUT}/logs/eval/{{key}}/evaluate.log",
    benchmark:
        f"{OUT}/benchmarks/eval/{{key}}/evaluate.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: dumps(P.eval_spec(wc.key)),
    shell:
        "cwdpo evaluate --spec {params.spec:q} --threads {threads} --captions {output.captions:q} "
        "--measures {output.measures:q} > {log:q} 2>&1"


rule trivial_baseline:
    input:
        P.data_inputs(),
    output:
        f"{OUT}/eval/trivial/captions.json",
    log:
        f"{OUT}/logs/eval/trivial.log",
    params:
        spec=dumps(P.trivial_spec()),
    shell:
        "cwdpo trivial --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


# One job scores every caption file: METEOR's JVM loads its paraphrase tables once (~10 s).
rule score:
    input:
        captions=[c for c, _ in P.score_files()],
    output:
        [s for _, s in P.score_files()],
    log:
        f"{OUT}/logs/score.log",
    params:
        metrics=",".join(config["evaluate"]["metrics"]),
    shell:
        "cwdpo score --captions {input.captions:q} --out {output:q} --metrics {params.metrics:q} > {log:q} 2>&1"
