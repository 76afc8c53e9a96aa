rule metrics:
    input:
        dump=paths.FEATURES,
        code=code("metrics"),
    output:
        table=paths.METRICS,
    params:
        pinv_cutoff=config["metrics"]["pinv_cutoff"],
    log:
        paths.log("metrics", paths.METRICS),
    benchmark:
        paths.benchmark("metrics", paths.METRICS)
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe --threads {threads} metrics --dump {input.dump:q} --regime {wildcards.regime}"
        " --pinv-cutoff {params.pinv_cutoff} --out {output.table:q} > {log:q} 2>&1"


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
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe aggregate --out {output.table:q} {input.tables:q} > {log:q} 2>&1"


# Layerwise NC of the final checkpoint: NC1 and NCC accuracy at every probe layer, clean and PGD train data.
rule layerwise:
    input:
        checkpoint=lambda wc: grid.checkpoint_input(config, wc),
        code=code("layerwise"),
    output:
        table=paths.LAYERWISE,
        h5=paths.LAYERWISE_H5,
    params:
        spec=lambda wc: grid.layerwise_spec(config, wc),
    log:
        paths.log("layerwise", paths.LAYERWISE),
    benchmark:
        paths.benchmark("layerwise", paths.LAYERWISE)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe --threads {threads} --gpus {resources.gpu}"
        " layerwise --spec {params.spec:q} --checkpoint {input.checkpoint:q}"
        " --regime {wildcards.regime} --out-csv {output.table:q} --out-h5 {output.h5:q} > {log:q} 2>&1"


rule aggregate_layerwise:
    input:
        tables=grid.expand(paths.LAYERWISE, grid.layerwise_cells(config)),
    output:
        table=paths.ALL_LAYERWISE,
    log:
        paths.log("aggregate_layerwise", paths.ALL_LAYERWISE),
    benchmark:
        paths.benchmark("aggregate_layerwise", paths.ALL_LAYERWISE)
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe aggregate-layerwise --out {output.table:q} {input.tables:q} > {log:q} 2>&1"
