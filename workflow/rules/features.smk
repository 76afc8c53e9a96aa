# Feature dumps of the checkpoints in features.keep stay (rule features); the others are temporary (rule
# features_temp, the same job): Snakemake removes each once every rule reading it (metrics, leap table, simplex
# figure) is done, and a later run that needs one again re-attacks its checkpoint (checkpoints are never temp).
# The epoch constraints split the cells between the two rules, so every dump has exactly one producer.
_KEPT_EPOCHS = families.kept_dump_epochs(config)
_TEMP_EPOCHS = sorted(set(config["train"]["checkpoints"]) - set(_KEPT_EPOCHS))


rule features:
    input:
        checkpoint=lambda wc: grid.checkpoint_input(config, wc),  # an external model's own file, or training's
        code=code("features"),
    output:
        h5=paths.FEATURES,
    wildcard_constraints:
        epoch="|".join(str(e) for e in _KEPT_EPOCHS),
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


if _TEMP_EPOCHS:

    use rule features as features_temp with:
        output:
            h5=temp(paths.FEATURES),
        wildcard_constraints:
            epoch="|".join(str(e) for e in _TEMP_EPOCHS),
