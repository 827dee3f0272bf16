rule psf_gallery:
    output:
        figure=report(
            "results/figures/psf_gallery.png",
            caption="../report/psf_gallery.rst",
            category="Optics",
        ),
    log:
        "logs/psf_gallery.log",
    benchmark:
        "results/benchmarks/psf_gallery.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        optics=config["optics"],
        motion=config["motion"],
    script:
        "../scripts/psf_gallery.py"


rule training_samples:
    input:
        shard="results/shards/train/shard-0000.h5",
    output:
        figure=report(
            "results/figures/training_samples.png",
            caption="../report/training_samples.rst",
            category="Training data",
        ),
    log:
        "logs/training_samples.log",
    benchmark:
        "results/benchmarks/training_samples.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    script:
        "../scripts/training_samples.py"


rule training_curve:
    input:
        log="results/model/training_log.csv",
    output:
        figure=report(
            "results/figures/training_curve.png",
            caption="../report/training_curve.rst",
            category="Training",
        ),
    log:
        "logs/training_curve.log",
    benchmark:
        "results/benchmarks/training_curve.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    script:
        "../scripts/training_curve.py"
