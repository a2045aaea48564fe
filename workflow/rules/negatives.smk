# Negatives and preference pairs of Stage 2: on-policy samples of the Stage-1 model (hf or vllm backend),
# mixed with dataset negatives (gentle / easy / external) at a ratio rho, then the reference log-probs
# of every pair under the frozen Stage-1 model, computed once and cached.


rule sample_onpolicy:
    input:
        model=lambda wc: P.init_inputs(wc.stage1, wc.seed),
        data=P.data_inputs(),
    output:
        samples=f"{OUT}/negatives/{{stage1}}/s{{seed}}/onpolicy.jsonl",
        summary=f"{OUT}/negatives/{{stage1}}/s{{seed}}/onpolicy_summary.json",
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_onpolicy.log",
    benchmark:
        f"{OUT}/benchmarks/negatives/{{stage1}}_s{{seed}}_onpolicy.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: dumps(P.sample_spec(wc.stage1, wc.seed)),
    shell:
        "cwdpo sample-onpolicy --spec {params.spec:q} --threads {threads} --out {output.samples:q} "
        "--summary {output.summary:q} > {log:q} 2>&1"


rule make_pairs:
    input:
        unpack(lambda wc: P.pairs_inputs(wc.stage1, wc.seed, wc.negset)),
    output:
        pairs=f"{OUT}/negatives/{{stage1}}/s{{seed}}/pairs_{{negset}}.jsonl",
        summary=f"{OUT}/negatives/{{stage1}}/s{{seed}}/pairs_{{negset}}_summary.json",
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_pairs_{{negset}}.log",
    params:
        spec=lambda wc: dumps(P.pairs_spec(wc.stage1, wc.seed, wc.negset)),
        onpolicy=lambda wc, input: (
            f"--onpolicy {shlex_quote(input.onpolicy)}"
            if "onpolicy" in input.keys()
            else ""
        ),
    shell:
        "cwdpo make-pairs --spec {params.spec:q} {params.onpolicy} --out {output.pairs:q} "
        "--summary {output.summary:q} > {log:q} 2>&1"


rule ref_logps:
    input:
        model=lambda wc: P.init_inputs(wc.stage1, wc.seed),
        pairs=f"{OUT}/negatives/{{stage1}}/s{{seed}}/pairs_{{negset}}.jsonl",
    output:
        f"{OUT}/negatives/{{stage1}}/s{{seed}}/ref_{{negset}}.json",
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_ref_{{negset}}.log",
    benchmark:
        f"{OUT}/benchmarks/negatives/{{stage1}}_s{{seed}}_ref_{{negset}}.tsv"
    threads: 1
    resources:
        gpu=P.gpus("infer"),
    params:
        spec=lambda wc: dumps(P.ref_spec(wc.stage1, wc.seed)),
    shell:
        "cwdpo ref-logps --spec {params.spec:q} --threads {threads} --pairs {input.pairs:q} --out {output:q} > {log:q} 2>&1"


# The fixed probe set of every run that starts from this model (learning-dynamics probes during training).
rule probe_set:
    input:
        unpack(lambda wc: P.probe_set_inputs(wc.stage1, wc.seed)),
    output:
        f"{OUT}/negatives/{{stage1}}/s{{seed}}/probe.jsonl",
    log:
        f"{OUT}/logs/negatives/{{stage1}}_s{{seed}}_probe.log",
    params:
        spec=lambda wc: dumps(P.probe_set_spec(wc.stage1, wc.seed)),
        onpolicy=lambda wc, input: (
            f"--onpolicy {shlex_quote(input.onpolicy)}"
            if "onpolicy" in input.keys()
            else ""
        ),
    shell:
        "cwdpo probe-set --spec {params.spec:q} {params.onpolicy} --out {output:q} > {log:q} 2>&1"


# Held-out pairs of the test split (dataset negatives only, fixed seed): preference accuracy and w_c.
rule heldout_pairs:
    input:
        P.data_inputs(),
    output:
        pairs=P.heldout_pairs_path(),
        summary=f"{OUT}/eval/heldout_pairs_summary.json",
    log:
        f"{OUT}/logs/eval/heldout_pairs.log",
    params:
        spec=dumps(P.heldout_spec()),
    shell:
        "cwdpo make-pairs --spec {params.spec:q} --out {output.pairs:q} --summary {output.summary:q} > {log:q} 2>&1"
