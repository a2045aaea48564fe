# Every evaluated model: beam-search captions on the test split and teacher-forced measures (held-out
# pairs), then pycocoevalcap scores of all caption files in one job.


# (At the tiny scale the training jobs evaluate their own models: this rule then makes the base model's only.)
rule evaluate:
    input:
        unpack(lambda wc: P.eval_inputs(wc.key)),
    output:
        **P.eval_outputs("{key}"),
    log:
        f"{OUT}/logs/eval/{{key}}/evaluate.log",
    benchmark:
        f"{OUT}/benchmarks/eval/{{key}}/evaluate.tsv"
    wildcard_constraints:
        key=P.evaluated_apart(),
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: to_json(P.eval_spec(wc.key)),
        gpus=P.gpu_prefix("infer"),
    shell:
        logged(
            "{params.gpus}cwdpo evaluate --spec {params.spec:q} --threads {threads} --captions {output.captions:q} "
            "--measures {output.measures:q}"
        )


# The COCO categories of the captioned images (from COCO instance annotations), for CHAIR on real captions.
rule coco_objects:
    input:
        lambda wc: P.instances_of(wc.source),
    output:
        P.pattern("objects"),
    log:
        f"{OUT}/logs/coco_objects_{{source}}.log",
    params:
        spec=lambda wc: to_json(P.coco_objects_spec(wc.source)),
    shell:
        logged("cwdpo coco-objects --spec {params.spec:q} --out {output:q}")


rule trivial_baseline:
    input:
        P.data_inputs(),
        [f for f in [P.objects_file("data")] if f],
    output:
        P.path("captions", key=TRIVIAL),
    log:
        f"{OUT}/logs/eval/trivial.log",
    params:
        spec=to_json(P.trivial_spec()),
    shell:
        logged(
            "cwdpo trivial --spec {params.spec:q} --out {output:q}"
        )


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
        logged(
            "cwdpo score --captions {input.captions:q} --out {output:q} --metrics {params.metrics:q}"
        )
