# Comparison tables (Markdown, CSV, LaTeX) and figures (PNG, PDF) under results/<experiment>/;
# `snakemake --report report.html` bundles them with the captions of workflow/report/.


rule table:
    input:
        lambda wc: table_inputs(P, wc.table),
    output:
        md=report(
            P.pattern("table") + ".md",
            caption="../report/table.rst",
            category="Tables",
            labels={"table": "{table}"},
        ),
        csv=P.pattern("table") + ".csv",
        tex=P.pattern("table") + ".tex",
    log:
        f"{OUT}/logs/tables/{{table}}.log",
    params:
        spec=lambda wc: to_json(table_spec(P, wc.table)),
        stem=lambda wc, output: output.md[: -len(".md")],
    shell:
        logged(
            "cwdpo table --spec {params.spec:q} --out {params.stem:q}"
        )


rule figure:
    input:
        lambda wc: figure_inputs(P, wc.figure),
    output:
        png=report(
            P.pattern("figure") + ".png",
            caption="../report/figure.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
        pdf=P.pattern("figure") + ".pdf",
    log:
        f"{OUT}/logs/figures/{{figure}}.log",
    params:
        spec=lambda wc: to_json(figure_spec(P, wc.figure)),
        stem=lambda wc, output: output.png[: -len(".png")],
    shell:
        logged(
            "cwdpo figure --spec {params.spec:q} --out {params.stem:q}"
        )
