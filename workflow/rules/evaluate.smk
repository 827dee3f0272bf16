rule predict:
    input:
        model=MODEL,
        testset="results/testsets/{testset}.h5",
    output:
        h5="results/predictions/{testset}.h5",
    log:
        "logs/predict/{testset}.log",
    benchmark:
        "results/benchmarks/predict/{testset}.tsv"
    wildcard_constraints:
        testset="|".join(TESTSETS),
    conda:
        GPU_CONDA_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU_REQUEST,
    params:
        **pipeline.rule_params(
            lambda wc: {
                "testsets": {
                    "batch": config["testsets"]["batch"],
                    **pipeline.evaluated(config, wc.testset),
                }
            },
            [{"testset": name} for name in TESTSETS],
        ),
    script:
        "../scripts/predict.py"


rule metrics:
    input:
        testset="results/testsets/{testset}.h5",
        predictions="results/predictions/{testset}.h5",
    output:
        json="results/metrics/{testset}.json",
        csv=report(
            "results/metrics/{testset}.csv",
            caption="../report/metrics.rst",
            category="Scores",
            subcategory="{testset}",
        ),
        scatter=report(
            "results/figures/scatter_{testset}.png",
            caption="../report/scatter.rst",
            category="Scores",
            subcategory="{testset}",
        ),
    log:
        "logs/metrics/{testset}.log",
    benchmark:
        "results/benchmarks/metrics/{testset}.tsv"
    wildcard_constraints:
        testset="|".join(TEXTURE_SETS),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    script:
        "../scripts/metrics.py"


rule particles_fit:
    input:
        testset="results/testsets/{testset}.h5",
    output:
        csv="results/particles/{testset}.csv",
    log:
        "logs/particles/{testset}.log",
    benchmark:
        "results/benchmarks/particles/{testset}.tsv"
    wildcard_constraints:
        testset="|".join(FITTED_SETS),
    conda:
        CONDA_ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
    script:
        "../scripts/particles_fit.py"


rule bead_metrics:
    input:
        testset="results/testsets/{beadset}.h5",
        predictions="results/predictions/{beadset}.h5",
        fits="results/particles/{beadset}.csv",
    output:
        json="results/metrics/{beadset}.json",
        csv=report(
            "results/metrics/{beadset}.csv",
            caption="../report/fit_vs_truth.rst",
            category="Scores",
            subcategory="{beadset}",
        ),
        figure=report(
            "results/figures/fit_vs_truth_{beadset}.png",
            caption="../report/fit_vs_truth.rst",
            category="Scores",
            subcategory="{beadset}",
        ),
    log:
        "logs/metrics/{beadset}.log",
    benchmark:
        "results/benchmarks/metrics/{beadset}.tsv"
    wildcard_constraints:
        beadset="|".join(BEAD_SETS),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    script:
        "../scripts/bead_metrics.py"
