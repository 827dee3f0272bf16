from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/sources.smk"
include: "workflow/rules/synthesis.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/testsets.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/study.smk"


rule all:
    default_target: True
    input:
        rules.psf_gallery.output.figure,
        rules.training_samples.output.figure,
        MODEL,
        rules.training_curve.output.figure,
        expand("results/metrics/{testset}.json", testset=TEXTURE_SETS),
        rules.fig2_two_zone.output.figure,
        rules.fig3_cylinder_sketch.output.figure,
        rules.fig4_cylinder.output.figure,
        rules.table1.output.figure,
        rules.crb_map.output.figure,
        expand(
            "results/figures/fit_vs_truth_{beadset}.png",
            beadset=BEAD_SETS,
        ),
