# Comparison tables (Markdown, CSV, LaTeX) and figures (PNG, PDF) under results/<experiment>/;
# `snakemake --report report.html` bundles them with the captions of workflow/report/.


rule table:
    input:
        lambda wc: P.table_inputs(wc.table),
    output:
        md=report(
            f"{OUT}/tables/{{table}}.md",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        csv=f"{OUT}/tables/{{table}}.csv",
        tex=f"{OUT}/tables/{{table}}.tex",
    log:
        f"{OUT}/logs/tables/{{table}}.log",
    params:
        spec=lambda wc: dumps(P.table_spec(wc.table)),
        stem=lambda wc: f"{OUT}/tables/{wc.table}",
    shell:
        "cwdpo table --spec {params.spec:q} --out {params.stem:q} > {log:q} 2>&1"


rule figure:
    input:
        lambda wc: P.figure_inputs(wc.figure),
    output:
        png=report(
            f"{OUT}/figures/{{figure}}.png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf=f"{OUT}/figures/{{figure}}.pdf",
    log:
        f"{OUT}/logs/figures/{{figure}}.log",
    params:
        spec=lambda wc: dumps(P.figure_spec(wc.figure)),
        stem=lambda wc, output: output.png[: -len(".png")],
    shell:
        "cwdpo figure --spec {params.spec:q} --out {params.stem:q} > {log:q} 2>&1"
