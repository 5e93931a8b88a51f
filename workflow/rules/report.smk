# Report phase: the results table beside the paper's numbers, plots, MLflow summary.


rule report:
    """Aggregate every metrics file into summary.csv / summary.md and plots."""
    input:
        model_targets(),
        evaluation_targets(),
    output:
        csv=report(
            layout.summary_csv(SETTINGS),
            category="Results",
            caption="../report/summary.rst",
        ),
        md=report(
            layout.summary_md(SETTINGS),
            category="Results",
            caption="../report/summary.rst",
        ),
        plots=report(
            directory(layout.plots(SETTINGS)),
            patterns=["{name}.png"],
            category="Plots",
            caption="../report/plots.rst",
        ),
        # for DVC: the preset's headline numbers and per-run curves (iicrepro.headline)
        headline=layout.headline(SETTINGS),
        curves=directory(layout.curves(SETTINGS)),
    log:
        log_file("report", "summary"),
    conda:
        "../envs/iicrepro.yaml"
    threads: 1
    params:
        preset=preset_option,
        settings=result_settings("report"),
        code=CODE["report"],
    shell:
        job("report")
        + "iicrepro report --params params.yaml --preset {params.preset} > {log} 2>&1"
