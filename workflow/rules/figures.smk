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
        "../../envs/blurflow.yaml"
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
