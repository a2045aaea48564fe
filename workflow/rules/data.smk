# The embedded `shapes` dataset, in the Karpathy format (COCO/Flickr30k configs point at their own file),
# then one check of every image and caption before any training job.
if P.is_shapes:

    rule prepare_data:
        output:
            json=P.pattern("shapes_json"),
            summary=P.pattern("data_summary"),
        log:
            f"{OUT}/logs/prepare_data.log",
        params:
            spec=to_json(P.shapes_spec()),
            out=lambda wc, output: os.path.dirname(output.json),
        shell:
            logged(
                "cwdpo prepare-data --spec {params.spec:q} --out {params.out:q}"
            )


rule validate_data:
    input:
        P.data_json(),
    output:
        P.pattern("validated"),
    log:
        f"{OUT}/logs/validate_data.log",
    params:
        spec=to_json(P.validate_spec()),
    shell:
        logged(
            "cwdpo validate-data --spec {params.spec:q} --out {output:q}"
        )
