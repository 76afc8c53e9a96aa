# One job per figure file set (all formats of one figure), so a figure option reruns figures only.
rule figures:
    input:
        table=paths.ALL_METRICS,
        code=code("figures"),
    output:
        expand(paths.FIGURE, name="{family}/{stem}", ext=config["figures"]["formats"]),
    params:
        spec=grid.figures_spec(config),
        outdir=lambda wc: f"{paths.FIGURE_DIR}/{wc.family}",
    log:
        paths.log("figures", paths.FIGURE_DIR + "/{family}/{stem}"),
    benchmark:
        paths.benchmark("figures", paths.FIGURE_DIR + "/{family}/{stem}")
    threads: 1
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe figures --family {wildcards.family} --table {input.table:q} --outdir {params.outdir:q}"
        " --spec {params.spec:q} {wildcards.stem:q} > {log:q} 2>&1"
