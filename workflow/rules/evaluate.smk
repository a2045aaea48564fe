# Every evaluated model: beam-search captions on the test split and teacher-forced measures (held-out
# pairs), then pycocoevalcap scores of all caption files in one job.
for SFX, Q in PLANS:

    # (At the tiny scale the training jobs evaluate their own models: this rule then makes the base model's only.)
    rule:
        name:
            f"evaluate{SFX}"
        input:
            unpack(lambda wc, Q=Q: Q.eval_inputs(wc.key)),
        output:
            **Q.eval_outputs("{key}"),
        log:
            Q.log_file("evaluate"),
        benchmark:
            Q.benchmark_file("evaluate")
        wildcard_constraints:
            key=Q.evaluated_apart(),
        threads: Q.threads()
        resources:
            gpu=Q.gpus("infer"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.eval_spec(wc.key)),
            gpus=Q.gpu_prefix("infer"),
        shell:
            logged(
                "{params.gpus}cwdpo evaluate --spec {params.spec:q} --threads {threads} --captions {output.captions:q} "
                "--measures {output.measures:q}"
            )

    # The COCO categories of the captioned images (from COCO instance annotations), for CHAIR on real captions.
    rule:
        name:
            f"coco_objects{SFX}"
        input:
            lambda wc, Q=Q: Q.instances_of(wc.source),
        output:
            Q.pattern("objects"),
        log:
            Q.log_file("coco_objects"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.coco_objects_spec(wc.source)),
        shell:
            logged("cwdpo coco-objects --spec {params.spec:q} --out {output:q}")

    rule:
        name:
            f"trivial_baseline{SFX}"
        input:
            Q.data_inputs(),
            [f for f in [Q.objects_file("data")] if f],
        output:
            Q.path("captions", key=TRIVIAL),
        log:
            Q.log_file("trivial"),
        params:
            spec=to_json(Q.trivial_spec()),
        shell:
            logged(
                "cwdpo trivial --spec {params.spec:q} --out {output:q}"
            )

    # One job scores every caption file: METEOR's JVM loads its paraphrase tables once (~10 s).
    rule:
        name:
            f"score{SFX}"
        input:
            captions=[c for c, _ in Q.score_files()],
        output:
            [s for _, s in Q.score_files()],
        log:
            Q.log_file("score"),
        params:
            metrics=",".join(Q.c["evaluate"]["metrics"]),
            chair=Q.c["evaluate"]["chair"],
        shell:
            logged(
                "cwdpo score --captions {input.captions:q} --out {output:q} --metrics {params.metrics:q}"
                " --chair {params.chair:q}"
            )
