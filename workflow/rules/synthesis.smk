rule synthesize_shard:
    input:
        sources="results/sources/{split}.h5",
    output:
        shard="results/shards/{split}/shard-{shard}.h5",
    log:
        "logs/synthesis/{split}-{shard}.log",
    benchmark:
        "results/benchmarks/synthesis/{split}-{shard}.tsv"
    wildcard_constraints:
        split="train|val",
        shard=r"\d+",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=0,
    params:
        **pipeline.rule_params(lambda wc: pipeline.for_synthesis(config)),
    script:
        "../scripts/synthesize_shard.py"
