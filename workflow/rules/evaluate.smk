# Beam-search captions of every evaluated model on the test split, then pycocoevalcap scores.


rule generate:
    input:
        model=lambda wc: P.model_inputs(wc.key),
        data=P.data_json(),
    output:
        f"{OUT}/eval/{{key}}/captions.json",
    log:
        f"{OUT}/logs/eval/{{key}}/generate.log",
    benchmark:
        f"{OUT}/benchmarks/eval/{{key}}/generate.tsv"
    threads: 1
    params:
        spec=lambda wc, threads: dumps(P.eval_spec(wc.key, threads)),
    shell:
        "cwdpo generate --spec {params.spec:q} --out {output:q} > {log:q} 2>&1"


rule trivial_baseline:
    input:
        P.data_json(),
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
        captions=[f"{OUT}/eval/{k}/captions.json" for k in P.eval_keys() + ["trivial"]],
    output:
        [f"{OUT}/eval/{k}/scores.json" for k in P.eval_keys() + ["trivial"]],
    log:
        f"{OUT}/logs/score.log",
    params:
        metrics=",".join(config["evaluate"]["metrics"]),
    shell:
        "cwdpo score --captions {input.captions:q} --out {output:q} --metrics {params.metrics:q} > {log:q} 2>&1"
