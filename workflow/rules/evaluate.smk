# Every evaluated model: beam-search captions on the test split and teacher-forced measures (held-out
# pairs), then pycocoevalcap scores of all caption files in one job.


rule evaluate:
    input:
        unpack(lambda wc: P.eval_inputs(wc.key)),
    output:
        captions=P.pattern("captions"),
        measures=P.pattern("measures"),
        sets=[P.eval_file(f"captions_{name}") for name in P.eval_sets()],
        mcq=[P.eval_file(f"mcq_{name}") for name in P.mcq_sets()],
    log:
        f"{OUT}/logs/eval/{{key}}/evaluate.log",
    benchmark:
        f"{OUT}/benchmarks/eval/{{key}}/evaluate.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: to_json(P.eval_spec(wc.key)),
        gpus=P.gpu_prefix("infer"),
    shell:
        "{params.gpus}cwdpo evaluate --spec {params.spec:q} --threads {threads} --captions {output.captions:q} "
        "--measures {output.measures:q} > {log:q} 2>&1"


rule trivial_baseline:
    input:
        P.data_inputs(),
    output:
        P.path("captions", key=TRIVIAL),
    log:
        f"{OUT}/logs/eval/trivial.log",
    params:
        spec=to_json(P.trivial_spec()),
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
