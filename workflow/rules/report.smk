# Comparison tables (Markdown, CSV, LaTeX) and figures (PNG, PDF) under results/<experiment>/;
# `snakemake --report report.html` bundles them with the captions of workflow/report/.
for SFX, Q in PLANS:

    rule:
        name:
            f"table{SFX}"
        input:
            lambda wc, Q=Q: table_inputs(Q, wc.table),
        output:
            md=report(
                Q.pattern("table") + ".md",
                caption="../report/table.rst",
                category="Tables",
                labels={"table": "{table}"},
            ),
            csv=Q.pattern("table") + ".csv",
            tex=Q.pattern("table") + ".tex",
        log:
            Q.log_file("table"),
        params:
            spec=lambda wc, Q=Q: to_json(table_spec(Q, wc.table)),
            stem=lambda wc, output: output.md[: -len(".md")],
        shell:
            logged(
                "cwdpo table --spec {params.spec:q} --out {params.stem:q}"
            )

    rule:
        name:
            f"figure{SFX}"
        input:
            lambda wc, Q=Q: figure_inputs(Q, wc.figure),
        output:
            png=report(
                Q.pattern("figure") + ".png",
                caption="../report/figure.rst",
                category="Figures",
                labels={"figure": "{figure}"},
            ),
            pdf=Q.pattern("figure") + ".pdf",
        log:
            Q.log_file("figure"),
        params:
            spec=lambda wc, Q=Q: to_json(figure_spec(Q, wc.figure)),
            stem=lambda wc, output: output.png[: -len(".png")],
        shell:
            logged(
                "cwdpo figure --spec {params.spec:q} --out {params.stem:q}"
            )

    # The calibration rule's outcome of a sweep table (kind calibrate): the learning rate of every recipe
    # with `lr: calibrated`. It reads only what the rule reads (the measures, captions and probes of the
    # sweep), so the Stage-2 runs that wait for it do not wait for the scoring job.
    rule:
        name:
            f"calibration_choice{SFX}"
        input:
            lambda wc, Q=Q: calibration_inputs(Q, wc.table),
        output:
            Q.pattern("calibration_choice"),
        log:
            Q.log_file("calibration"),
        params:
            spec=lambda wc, Q=Q: to_json(table_spec(Q, wc.table)),
        shell:
            logged(
                "cwdpo calibration-choice --spec {params.spec:q} --out {output:q}"
            )
