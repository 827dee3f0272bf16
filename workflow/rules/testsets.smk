rule testset:
    input:
        sources="results/sources/test.h5",
    output:
        h5="results/testsets/{testset}.h5",
    log:
        "logs/testsets/{testset}.log",
    benchmark:
        "results/benchmarks/testsets/{testset}.tsv"
    wildcard_constraints:
        testset="|".join(TESTSETS),
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    params:
        **pipeline.rule_params(
            lambda wc: pipeline.for_testset(config, wc.testset),
            [{"testset": name} for name in TESTSETS],
        ),
    script:
        "../scripts/testset.py"
