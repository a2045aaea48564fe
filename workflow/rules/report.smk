# Comparison tables: Markdown, CSV and LaTeX under results/<experiment>/tables/.


rule table:
    input:
        lambda wc: P.table_inputs(wc.table),
    output:
        md=f"{OUT}/tables/{{table}}.md",
        csv=f"{OUT}/tables/{{table}}.csv",
        tex=f"{OUT}/tables/{{table}}.tex",
    log:
        f"{OUT}/logs/tables/{{table}}.log",
    params:
        spec=lambda wc: dumps(P.table_spec(wc.table)),
        stem=lambda wc: f"{OUT}/tables/{wc.table}",
    shell:
        "cwdpo table --spec {params.spec:q} --out {params.stem:q} > {log:q} 2>&1"
