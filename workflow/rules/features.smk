rule features:
    input:
        checkpoint=lambda wc: grid.checkpoint_input(config, wc),  # an external model's own file, or training's
        code=code("features"),
    output:
        h5=paths.FEATURES,
    params:
        spec=lambda wc: grid.features_spec(config, wc),
    log:
        paths.log("features", paths.FEATURES),
    benchmark:
        paths.benchmark("features", paths.FEATURES)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe --threads {threads} --gpus {resources.gpu}"
        " features --spec {params.spec:q} --checkpoint {input.checkpoint:q}"
        " --out {output.h5:q} > {log:q} 2>&1"
