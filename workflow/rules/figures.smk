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
        **pipeline.rule_params(
            lambda wc: {"optics": config["optics"], "motion": config["motion"]}
        ),
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
        log=TRAINING_LOG,
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


rule fig2_two_zone:
    input:
        testset="results/testsets/two_zone.h5",
        predictions="results/predictions/two_zone.h5",
    output:
        figure=report(
            "results/figures/fig2_two_zone.png",
            caption="../report/fig2.rst",
            category="Paper figures",
        ),
    log:
        "logs/figures/fig2.log",
    benchmark:
        "results/benchmarks/figures/fig2.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    script:
        "../scripts/fig2_two_zone.py"


rule fig3_cylinder_sketch:
    output:
        figure=report(
            "results/figures/fig3_cylinder_sketch.png",
            caption="../report/fig3.rst",
            category="Paper figures",
        ),
    log:
        "logs/figures/fig3.log",
    benchmark:
        "results/benchmarks/figures/fig3.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    params:
        **pipeline.rule_params(
            lambda wc: {"testsets": {"cylinder": config["testsets"]["cylinder"]}}
        ),
    script:
        "../scripts/fig3_cylinder_sketch.py"


rule fig4_cylinder:
    input:
        testset="results/testsets/cylinder.h5",
        predictions="results/predictions/cylinder.h5",
    output:
        figure=report(
            "results/figures/fig4_cylinder.png",
            caption="../report/fig4.rst",
            category="Paper figures",
        ),
    log:
        "logs/figures/fig4.log",
    benchmark:
        "results/benchmarks/figures/fig4.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    script:
        "../scripts/fig4_cylinder.py"


rule table1:
    input:
        testset="results/testsets/table1.h5",
        predictions="results/predictions/table1.h5",
        fits="results/particles/table1.csv",
    output:
        csv=report(
            "results/tables/table1.csv",
            caption="../report/table1.rst",
            category="Paper figures",
        ),
        md="results/tables/table1.md",
        figure=report(
            "results/figures/table1.png",
            caption="../report/table1.rst",
            category="Paper figures",
        ),
    log:
        "logs/figures/table1.log",
    benchmark:
        "results/benchmarks/figures/table1.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    script:
        "../scripts/table1.py"


rule crb_map:
    output:
        csv="results/tables/crb_map.csv",
        figure=report(
            "results/figures/crb_map.png",
            caption="../report/crb_map.rst",
            category="Measurability study",
        ),
    log:
        "logs/figures/crb_map.log",
    benchmark:
        "results/benchmarks/figures/crb_map.tsv"
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    params:
        **pipeline.rule_params(
            lambda wc: {
                "optics": config["optics"],
                "study": {"settings": config["study"]["settings"]},
            }
        ),
        photons=[1000, 5000, 20000],
    script:
        "../scripts/crb_map.py"
