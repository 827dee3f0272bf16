from blurflow import study as blurflow_study

STUDY = blurflow_study.settings(config)


rule study_train:
    input:
        train=["results/sources/train.h5"],
        val=["results/sources/val.h5"],
    output:
        model="results/study/L{lateral}_A{axial}/model.pt",
        log="results/study/L{lateral}_A{axial}/training_log.csv",
    log:
        "logs/study/L{lateral}_A{axial}.log",
    benchmark:
        "results/benchmarks/study/L{lateral}_A{axial}.tsv"
    wildcard_constraints:
        lateral=r"[0-9.]+",
        axial=r"[0-9.]+",
    conda:
        GPU_CONDA_ENV
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=GPU_REQUEST,
    params:
        **pipeline.rule_params(
            lambda wc: pipeline.for_training(
                blurflow_study.setting_config(
                    config, float(wc.lateral), float(wc.axial)
                )
            ),
            [{"lateral": lateral, "axial": axial} for lateral, axial in STUDY],
        ),
        checkpoint=lambda wc: f"results/study/L{wc.lateral}_A{wc.axial}/checkpoint.pt",
    script:
        "../scripts/train.py"


rule study:
    input:
        logs=[
            f"results/study/L{lateral:g}_A{axial:g}/training_log.csv"
            for lateral, axial in STUDY
        ],
    output:
        csv=report(
            "results/study/measurability.csv",
            caption="../report/measurability.rst",
            category="Measurability study",
        ),
        figure=report(
            "results/figures/measurability.png",
            caption="../report/measurability.rst",
            category="Measurability study",
        ),
    log:
        "logs/study/summary.log",
    benchmark:
        "results/benchmarks/study/summary.tsv"
    conda:
        CONDA_ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
        gpu=0,
    params:
        **pipeline.rule_params(
            lambda wc: {
                k: config[k]
                for k in ("optics", "motion", "synthesis", "train", "study")
            }
        ),
        settings=STUDY,
    script:
        "../scripts/study.py"
