if config["train"]["model_file"]:

    rule pretrained_model:
        input:
            model=config["train"]["model_file"],
            log=pipeline.model_log(config["train"]["model_file"]),
        output:
            model=MODEL,
            log=report(
                TRAINING_LOG,
                caption="../report/training_log.rst",
                category="Training",
            ),
        log:
            "logs/pretrained_model.log",
        benchmark:
            "results/benchmarks/pretrained_model.tsv"
        conda:
            CONDA_ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=5,
            gpu=0,
        script:
            "../scripts/pretrained_model.py"

else:

    rule train:
        input:
            train=train_inputs("train"),
            val=train_inputs("val"),
            weights=config["train"]["pretrained_weights"] or [],
            init=config["train"]["init_model"] or [],
        output:
            # update(): a job that fails gets the finished model and log of the last run back
            model=update(MODEL),
            log=report(
                update(TRAINING_LOG),
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
            mem_mb=pipeline.train_mem_mb(config),
            runtime=24 * 60,
            gpu=GPU_REQUEST,
        params:
            **pipeline.rule_params(lambda wc: pipeline.for_training(config)),
            checkpoint="results/model/checkpoint.pt",
        script:
            "../scripts/train.py"


rule encoder_weights:
    output:
        weights="resources/weights/{encoder}-imagenet.pth",
    log:
        "logs/encoder_weights/{encoder}.log",
    benchmark:
        "results/benchmarks/encoder_weights/{encoder}.tsv"
    wildcard_constraints:
        encoder="resnet18|resnet34|resnet50",
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=30,
        gpu=0,
    params:
        base_url=config["train"]["weights_url"],
    script:
        "../scripts/encoder_weights.py"
