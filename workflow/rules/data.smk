# The embedded `shapes` dataset, in the Karpathy format (COCO/Flickr30k configs point at their own file),
# then one check of every image and caption before any training job.
for SFX, Q in PLANS:

    if Q.is_shapes:

        rule:
            name:
                f"prepare_data{SFX}"
            output:
                json=Q.pattern("shapes_json"),
                summary=Q.pattern("data_summary"),
            log:
                Q.log_file("prepare_data"),
            params:
                spec=to_json(Q.shapes_spec()),
                out=lambda wc, output: os.path.dirname(output.json),
            shell:
                logged(
                    "cwdpo prepare-data --spec {params.spec:q} --out {params.out:q}"
                )

    rule:
        name:
            f"validate_data{SFX}"
        input:
            Q.data_json(),
        output:
            Q.pattern("validated"),
        log:
            Q.log_file("validate_data"),
        params:
            spec=to_json(Q.validate_spec()),
        shell:
            logged(
                "cwdpo validate-data --spec {params.spec:q} --out {output:q}"
            )
