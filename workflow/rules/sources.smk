rule sources:
    output:
        h5="results/sources/{split}.h5",
    log:
        "logs/sources/{split}.log",
    benchmark:
        "results/benchmarks/sources/{split}.tsv"
    wildcard_constraints:
        split="train|val|test",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        gpu=0,
    params:
        **pipeline.rule_params(
            lambda wc: {
                "sources": pipeline.for_sources(config, wc.split),
                "seed": config["seed"],
            },
            [{"split": split} for split in ("train", "val", "test")],
        ),
        resources_dir="resources",
    script:
        "../scripts/sources.py"
