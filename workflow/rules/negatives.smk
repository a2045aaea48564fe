# Negatives and preference pairs of Stage 2: on-policy samples of the Stage-1 model (hf or vllm backend),
# mixed with dataset negatives (gentle / easy / external) at a ratio rho, then the reference log-probs
# of every pair under the frozen Stage-1 model, computed once and cached.


rule sample_onpolicy:
    input:
        model=lambda wc: P.init_inputs(wc.stage1, wc.seed),
        data=P.data_inputs(),
    output:
        samples=P.pattern("onpolicy"),
        summary=P.pattern("onpolicy_summary"),
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_onpolicy.log",
    benchmark:
        f"{OUT}/benchmarks/negatives/{{stage1}}_s{{seed}}_onpolicy.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: to_json(P.sample_spec(wc.stage1, wc.seed)),
        gpus=P.gpu_prefix("infer"),
    shell:
        logged(
            "{params.gpus}cwdpo sample-onpolicy --spec {params.spec:q} --threads {threads} --out {output.samples:q} "
            "--summary {output.summary:q}"
        )


rule make_pairs:
    input:
        unpack(lambda wc: P.pairs_inputs(wc.stage1, wc.seed, wc.negset)),
    output:
        pairs=P.pattern("pairs"),
        summary=P.pattern("pairs_summary"),
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_pairs_{{negset}}.log",
    params:
        spec=lambda wc: to_json(P.pairs_spec(wc.stage1, wc.seed, wc.negset)),
        onpolicy=optional_flag("onpolicy"),
    shell:
        logged(
            "cwdpo make-pairs --spec {params.spec:q} {params.onpolicy} --out {output.pairs:q} "
            "--summary {output.summary:q}"
        )


rule ref_logps:
    input:
        model=lambda wc: P.init_inputs(wc.stage1, wc.seed),
        pairs=P.pattern("pairs"),
    output:
        P.pattern("ref_logps"),
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_ref_{{negset}}.log",
    benchmark:
        f"{OUT}/benchmarks/negatives/{{stage1}}_s{{seed}}_ref_{{negset}}.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: to_json(P.ref_spec(wc.stage1, wc.seed)),
        gpus=P.gpu_prefix("infer"),
    shell:
        logged(
            "{params.gpus}cwdpo ref-logps --spec {params.spec:q} --threads {threads} --pairs {input.pairs:q} --out {output:q}"
        )


# The fixed probe set of every run that starts from this model (learning-dynamics probes during training).
rule probe_set:
    input:
        unpack(lambda wc: P.probe_set_inputs(wc.stage1, wc.seed)),
    output:
        P.pattern("probe_set"),
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_probe.log",
    params:
        spec=lambda wc: to_json(P.probe_set_spec(wc.stage1, wc.seed)),
        onpolicy=optional_flag("onpolicy"),
    shell:
        logged(
            "cwdpo probe-set --spec {params.spec:q} {params.onpolicy} --out {output:q}"
        )


# Held-out pairs of the test split (dataset negatives only, fixed seed): preference accuracy and w_c.
rule heldout_pairs:
    input:
        data=P.data_inputs(),
        tokenizer=P.tokenizer_inputs(),
    output:
        pairs=P.pattern("heldout_pairs"),
        summary=P.pattern("heldout_summary"),
    log:
        f"{OUT}/logs/eval/heldout_pairs.log",
    params:
        spec=to_json(P.heldout_spec()),
    shell:
        logged(
            "cwdpo make-pairs --spec {params.spec:q} --out {output.pairs:q} --summary {output.summary:q}"
        )
