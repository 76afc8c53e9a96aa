# Figures, tables and the training-log table.  Every figure family is its own rule (figure_<family>) with one
# job per figure file set (all formats of one figure), so a figure option reruns figures only.  File names carry
# the wildcards (dataset, arch, regime, threat) so the main, l_2 and ImageNette grids never collide; the first
# configured format goes into `snakemake --report` with a caption from workflow/report/<family>.rst.
from ncpipe.figures import FAMILIES, TABLES
from ncpipe.tables import ACCURACY_STEM

REPORT_EXT = config["figures"]["formats"][0]
_LABELS = {
    "dataset": ("dataset", "{dataset}"),
    "arch": ("architecture", "{arch}"),
    "regime": ("training", "{regime}"),
    "norm": ("evaluation threat", "{norm} {eps}/255"),
}


def _figure_outputs(family):
    fam = FAMILIES[family]
    keys = [k for k in _LABELS if "{" + k + "}" in fam.stem]
    sub = " / ".join("{" + k + "}" for k in ("dataset", "arch") if k in keys)
    labels = dict(_LABELS[k] for k in keys)
    out = []
    for ext in config["figures"]["formats"]:
        path = paths.format_path(paths.FIGURE, name=f"{family}/{fam.stem}", ext=ext)
        if ext == REPORT_EXT:
            path = report(path, caption=f"../report/{family}.rst", category=fam.category, subcategory=sub,
                          labels=labels)
        out.append(path)
    return out


for _family, _fam in FAMILIES.items():

    rule:
        name:
            f"figure_{_family}"
        input:
            table=TABLES[_fam.table],
            code=code("figures"),
        output:
            _figure_outputs(_family),
        params:
            family=_family,
            spec=grid.figures_spec(config),
            outdir=f"{paths.FIGURE_DIR}/{_family}",
            stem=lambda wc, pattern=_fam.stem: pattern.format(**dict(wc.items())),
        log:
            paths.log("figures", f"{paths.FIGURE_DIR}/{_family}/{_fam.stem}"),
        benchmark:
            paths.benchmark("figures", f"{paths.FIGURE_DIR}/{_family}/{_fam.stem}")
        threads: 1
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
            f"{paths.TABLE_DIR}/{ACCURACY_STEM}.csv",
            caption="../report/accuracy_table.rst",
            category="Accuracy table",
            subcategory="{dataset}",
            labels={"dataset": "{dataset}", "evaluation threat": "{norm} {eps}/255"},
        ),
        tex=f"{paths.TABLE_DIR}/{ACCURACY_STEM}.tex",
    params:
        outdir=paths.TABLE_DIR,
        stem=lambda wc: ACCURACY_STEM.format(**dict(wc.items())),
    log:
        paths.log("tables", f"{paths.TABLE_DIR}/{ACCURACY_STEM}"),
    threads: 1
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
    threads: 1
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe train-logs --out {output.table:q} {input.logs:q} > {log:q} 2>&1"
