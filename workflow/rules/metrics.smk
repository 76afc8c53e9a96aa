rule metrics:
    input:
        dump=paths.FEATURES,
        code=code("metrics"),
    output:
        table=paths.METRICS,
    log:
        paths.log("metrics", paths.METRICS),
    benchmark:
        paths.benchmark("metrics", paths.METRICS)
    threads: 1
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe --threads {threads} metrics --dump {input.dump:q} --regime {wildcards.regime}"
        " --out {output.table:q} > {log:q} 2>&1"


rule aggregate:
    input:
        tables=grid.expand(paths.METRICS, grid.cells(config)),
    output:
        table=paths.ALL_METRICS,
    log:
        paths.log("aggregate", paths.ALL_METRICS),
    benchmark:
        paths.benchmark("aggregate", paths.ALL_METRICS)
    threads: 1
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe aggregate --out {output.table:q} {input.tables:q} > {log:q} 2>&1"
