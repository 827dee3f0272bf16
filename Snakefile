from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/synthesis.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/figures.smk"


rule all:
    default_target: True
    input:
        rules.psf_gallery.output.figure,
        rules.training_samples.output.figure,
        rules.train.output.model,
        rules.training_curve.output.figure,
        "results/sources/test.h5",
