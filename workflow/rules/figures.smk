# Figures, tables and the training-log table.  Every figure family is its own rule (figure_<family>) with one
# job per figure file set (all formats of one figure), so a figure option reruns figures only.  File names carry
# the wildcards (dataset, arch, regime, threat) so the main, l_2 and ImageNette grids never collide; the first
# configured format goes into `snakemake --report` with a caption from workflow/report/<family>.rst.
# The names come from ncpipe.families (no plotting imports: parsing the workflow loads no matplotlib).
for _family, _fam in families.FAMILIES.items():

    rule:
        name:
            f"figure_{_family}"
        input:
            table=families.TABLES[_fam.table],
            code=code("figures"),
        output:
            figure_rule_outputs(_family),
        params:
            family=_family,
            spec=grid.figures_spec(config),
            outdir=lambda wc, output: os.path.dirname(output[0]),
            stem=lambda wc, pattern=_fam.stem: pattern.format(**dict(wc.items())),
        log:
            paths.log("figures", f"{paths.FIGURE_DIR}/{_family}/{_fam.stem}"),
        benchmark:
            paths.benchmark("figures", f"{paths.FIGURE_DIR}/{_family}/{_fam.stem}")
        threads: 1
        resources:
            gpu=0,  # CPU only: memory, runtime and partition come from the profile
        conda:
            "../envs/ncpipe.yaml"
        shell:
            "ncpipe figures --family {params.family} --table {input.table:q} --outdir {params.outdir:q}"
            " --spec {params.spec:q} {params.stem:q} > {log:q} 2>&1"


rule accuracy_table:
    input:
        table=paths.ALL_METRICS,
        code=code("tables"),
    output:
        csv=report(
            families.table_path(families.ACCURACY_STEM, "csv"),
            caption="../report/accuracy_table.rst",
            category="Accuracy table",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "evaluation threat": "{norm} {eps}/255"},
        ),
        tex=families.table_path(families.ACCURACY_STEM, "tex"),
    params:
        outdir=lambda wc, output: os.path.dirname(output.csv),
        stem=lambda wc: families.ACCURACY_STEM.format(**dict(wc.items())),
    log:
        paths.log("tables", f"{paths.TABLE_DIR}/{families.ACCURACY_STEM}"),
    benchmark:
        paths.benchmark("tables", f"{paths.TABLE_DIR}/{families.ACCURACY_STEM}")
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe tables --table {input.table:q} --outdir {params.outdir:q} {params.stem:q} > {log:q} 2>&1"


# The per-run training logs with their run identity in one table, for the training-curve figures.
rule train_logs:
    input:
        logs=grid.expand(paths.TRAIN_LOG, grid.runs(config)),
        code=code("tables"),
    output:
        table=paths.ALL_TRAIN_LOGS,
    log:
        paths.log("train_logs", paths.ALL_TRAIN_LOGS),
    benchmark:
        paths.benchmark("train_logs", paths.ALL_TRAIN_LOGS)
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe train-logs --out {output.table:q} {input.logs:q} > {log:q} 2>&1"


# The `figures` step of train -> features -> metrics -> figures: every figure and table of the config (defined
# last: its input lists the figures whose table some rule makes).  Its output lists those files, one a line.
rule figures:
    localrule: True
    input:
        figure_and_table_targets(),
    output:
        index=paths.FIGURES_INDEX,
    log:
        paths.log("figures_index", paths.FIGURES_INDEX),
    benchmark:
        paths.benchmark("figures_index", paths.FIGURES_INDEX)
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "printf '%s\\n' {input:q} > {output.index:q} 2> {log:q}"
