# Figures, tables and the training-log table.  The figure families drawn from one aggregated table (metrics,
# layerwise, training logs) are ONE job per table, rule figures_<table>, which draws every figure of them: each
# figure reads that whole table, so a change of any cell reran all of them before too, and one process pays
# the ~1 s of importing matplotlib/seaborn/pandas once (18 jobs -> 3 in the default run).  The families read
# from per-threat inputs (leap tables, feature dumps) stay one job per figure, so a new regime or threat draws
# only its own.  File names carry the wildcards (dataset, arch, regime, threat) so the main, l_2 and
# ImageNette grids never collide; the first configured format goes into `snakemake --report` with a caption
# from workflow/report/<family>.rst.  A figure option (formats, dpi, context) is a param: it reruns the figure
# rules only.  The names come from ncpipe.families (no plotting imports: parsing loads no matplotlib).
for _table, _table_path in families.TABLES.items():
    _fams = families.table_families(config, _table)
    if not _fams:
        continue  # a table the config draws nothing from

    rule:
        name:
            families.table_rule(_table)
        input:
            table=_table_path,
            code=code("figures"),
        output:
            [out for f in _fams for out in family_figure_outputs(f)],
        params:
            spec=grid.figures_spec(config),
            outdir=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),  # <outdir>/<family>/<stem>
            names=[f"{f}/{stem}" for f in _fams for stem in families.figure_stems(config, f)],
        log:
            paths.log("figures", f"{paths.FIGURE_DIR}/{_table}"),
        benchmark:
            paths.benchmark("figures", f"{paths.FIGURE_DIR}/{_table}")
        threads: 1
        resources:
            gpu=0,  # CPU only: memory, runtime and partition come from the profile
        conda:
            "../envs/ncpipe.yaml"
        shell:
            "ncpipe figures --table {input.table:q} --outdir {params.outdir:q} --spec {params.spec:q}"
            " {params.names:q} > {log:q} 2>&1"


# The leap-matrix figure of one (dataset, arch, threat), from that threat's leap table.
rule figure_leap_matrix:
    input:
        table=families.family_table("leap_matrix"),
        code=code("figures"),
    output:
        figure_rule_outputs("leap_matrix"),
    params:
        spec=grid.figures_spec(config),
        outdir=lambda wc, output: os.path.dirname(os.path.dirname(output[0])),  # <outdir>/<family>/<stem>
        name=lambda wc: f"leap_matrix/{families.FAMILIES['leap_matrix'].stem.format(**dict(wc.items()))}",
    log:
        paths.log("figures", f"{paths.FIGURE_DIR}/leap_matrix/{families.FAMILIES['leap_matrix'].stem}"),
    benchmark:
        paths.benchmark("figures", f"{paths.FIGURE_DIR}/leap_matrix/{families.FAMILIES['leap_matrix'].stem}")
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe figures --table {input.table:q} --outdir {params.outdir:q} --spec {params.spec:q}"
        " {params.name:q} > {log:q} 2>&1"


rule accuracy_table:
    input:
        table=paths.ALL_METRICS,
        code=code("tables"),
    output:
        csv=families.table_path(families.ACCURACY_STEM, "csv"),
        html=report(
            families.table_path(families.ACCURACY_STEM, "html"),
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


# The leap table: true class -> class of the nearest clean train mean of the perturbed feature, final checkpoint,
# every regime and seed of one (dataset, arch, threat); the leap_matrix figures read its CSV.
rule leap_table:
    input:
        dumps=lambda wc: families.leap_dumps(config, wc),
        code=code("tables"),
    output:
        csv=families.table_path(families.LEAP_STEM, "csv"),
        html=report(
            families.table_path(families.LEAP_STEM, "html"),
            caption="../report/leap_table.rst",
            category="Leap matrix",
            subcategory="{dataset} / {arch}",
            labels={"dataset": "{dataset}", "architecture": "{arch}", "evaluation threat": "{norm} {eps}/255"},
        ),
        tex=families.table_path(families.LEAP_STEM, "tex"),
    params:
        outdir=lambda wc, output: os.path.dirname(output.csv),
        stem=lambda wc: families.LEAP_STEM.format(**dict(wc.items())),
    log:
        paths.log("tables", f"{paths.TABLE_DIR}/{families.LEAP_STEM}"),
    benchmark:
        paths.benchmark("tables", f"{paths.TABLE_DIR}/{families.LEAP_STEM}")
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe leap-table --outdir {params.outdir:q} --stem {params.stem:q} {input.dumps:q} > {log:q} 2>&1"


# The simplex picture: class means and sampled features of the first and final checkpoint, from their dumps.
rule figure_simplex_projection:
    input:
        dumps=lambda wc: families.simplex_dumps(config, wc),
        code=code("figures"),
    output:
        figure_rule_outputs("simplex_projection"),
    params:
        spec=grid.figures_spec(config),
        outdir=lambda wc, output: os.path.dirname(output[0]),
        stem=lambda wc: families.FAMILIES["simplex_projection"].stem.format(**dict(wc.items())),
    log:
        paths.log("figures", f"{paths.FIGURE_DIR}/simplex_projection/{families.FAMILIES['simplex_projection'].stem}"),
    benchmark:
        paths.benchmark("figures", f"{paths.FIGURE_DIR}/simplex_projection/{families.FAMILIES['simplex_projection'].stem}")
    threads: 1
    resources:
        gpu=0,  # CPU only: memory, runtime and partition come from the profile
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe simplex-figure --outdir {params.outdir:q} --spec {params.spec:q} --stem {params.stem:q}"
        " {input.dumps:q} > {log:q} 2>&1"


# The per-run training logs with their run identity in one table, for the training-curve figures.
rule train_logs:
    input:
        logs=grid.expand(paths.TRAIN_LOG, grid.trained_runs(config)),
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
