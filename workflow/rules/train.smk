rule train:
    input:
        train=shard_paths("train"),
        val=shard_paths("val"),
    output:
        model="results/model/model.pt",
        log=report(
            "results/model/training_log.csv",
            caption="../report/training_log.rst",
            category="Training",
        ),
    log:
        "logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    conda:
        GPU_CONDA_ENV
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    params:
        config=config,
        checkpoint="results/model/checkpoint.pt",
    script:
        "../scripts/train.py"
