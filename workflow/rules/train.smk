rule train:
    input:
        code=code("train"),
    output:
        checkpoints=checkpoint_outputs(),
        log_csv=paths.TRAIN_LOG,
    params:
        spec=lambda wc: grid.train_spec(config, wc),
        resume_dir=paths.RESUME_DIR,
    log:
        paths.log("train", paths.RUN),
    benchmark:
        paths.benchmark("train", paths.RUN)
    threads: 1
    resources:
        gpu=1,
    conda:
        "../envs/ncpipe.yaml"
    shell:
        "ncpipe --threads {threads} --gpus {resources.gpu}"
        " train --spec {params.spec:q} --log-csv {output.log_csv:q}"
        " --resume-dir {params.resume_dir:q} {output.checkpoints:q} > {log:q} 2>&1"
