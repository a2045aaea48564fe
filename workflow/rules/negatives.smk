# Negatives and preference pairs of Stage 2: on-policy samples of the Stage-1 model (hf or vllm backend) and
# its own wrong beams, mixed with dataset negatives (gentle / easy / external) at the set's shares, then the
# reference log-probs of every pair under the frozen Stage-1 model, computed once and cached.
for SFX, Q in PLANS:

    rule:
        name:
            f"sample_onpolicy{SFX}"
        input:
            model=lambda wc, Q=Q: Q.init_inputs(wc.stage1, wc.seed),
            data=Q.data_inputs(),
        output:
            samples=Q.pattern("onpolicy"),
            summary=Q.pattern("onpolicy_summary"),
        log:
            Q.log_file("onpolicy"),
        benchmark:
            Q.benchmark_file("onpolicy")
        threads: Q.threads()
        resources:
            gpu=Q.gpus("infer"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.sample_spec(wc.stage1, wc.seed)),
            gpus=Q.gpu_prefix("infer"),
        shell:
            logged(
                "{params.gpus}cwdpo sample-onpolicy --spec {params.spec:q} --threads {threads} --out {output.samples:q} "
                "--summary {output.summary:q}"
            )

    # the model's own beams of every Stage-2 image, grounded in its attribute record (negatives set `beams`)
    rule:
        name:
            f"beam_negatives{SFX}"
        input:
            model=lambda wc, Q=Q: Q.init_inputs(wc.stage1, wc.seed),
            data=Q.data_inputs(),
        output:
            beams=Q.pattern("beams"),
            summary=Q.pattern("beams_summary"),
        log:
            Q.log_file("beams"),
        benchmark:
            Q.benchmark_file("beams")
        threads: Q.threads()
        resources:
            gpu=Q.gpus("infer"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.beam_spec(wc.stage1, wc.seed)),
            gpus=Q.gpu_prefix("infer"),
        shell:
            logged(
                "{params.gpus}cwdpo beam-negatives --spec {params.spec:q} --threads {threads} --out {output.beams:q} "
                "--summary {output.summary:q}"
            )

    rule:
        name:
            f"make_pairs{SFX}"
        input:
            unpack(lambda wc, Q=Q: Q.pairs_inputs(wc.stage1, wc.seed, wc.negset)),
        output:
            pairs=Q.pattern("pairs"),
            summary=Q.pattern("pairs_summary"),
        log:
            Q.log_file("pairs"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.pairs_spec(wc.stage1, wc.seed, wc.negset)),
            onpolicy=optional_flag("onpolicy", "beams"),  # the samples files the set mixes in
        shell:
            logged(
                "cwdpo make-pairs --spec {params.spec:q} {params.onpolicy} --out {output.pairs:q} "
                "--summary {output.summary:q}"
            )

    rule:
        name:
            f"ref_logps{SFX}"
        input:
            model=lambda wc, Q=Q: Q.init_inputs(wc.stage1, wc.seed),
            pairs=Q.pattern("pairs"),
        output:
            Q.pattern("ref_logps"),
        log:
            Q.log_file("ref_logps"),
        benchmark:
            Q.benchmark_file("ref_logps")
        threads: Q.threads()
        resources:
            gpu=Q.gpus("infer"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.ref_spec(wc.stage1, wc.seed)),
            gpus=Q.gpu_prefix("infer"),
        shell:
            logged(
                "{params.gpus}cwdpo ref-logps --spec {params.spec:q} --threads {threads} --pairs {input.pairs:q} "
                "--out {output:q}"
            )

    # The fixed probe set of every run that starts from this model (learning-dynamics probes during training).
    rule:
        name:
            f"probe_set{SFX}"
        input:
            unpack(lambda wc, Q=Q: Q.probe_set_inputs(wc.stage1, wc.seed)),
        output:
            Q.pattern("probe_set"),
        log:
            Q.log_file("probe_set"),
        params:
            spec=lambda wc, Q=Q: to_json(Q.probe_set_spec(wc.stage1, wc.seed)),
            onpolicy=optional_flag("onpolicy"),
        shell:
            logged(
                "cwdpo probe-set --spec {params.spec:q} {params.onpolicy} --out {output:q}"
            )

    # Held-out pairs of the test split (dataset negatives only, fixed seed): preference accuracy and w_c.
    rule:
        name:
            f"heldout_pairs{SFX}"
        input:
            data=Q.data_inputs(),
            tokenizer=Q.tokenizer_inputs(),
        output:
            pairs=Q.pattern("heldout_pairs"),
            summary=Q.pattern("heldout_summary"),
        log:
            Q.log_file("heldout_pairs"),
        params:
            spec=to_json(Q.heldout_spec()),
        shell:
            logged(
                "cwdpo make-pairs --spec {params.spec:q} --out {output.pairs:q} --summary {output.summary:q}"
            )
