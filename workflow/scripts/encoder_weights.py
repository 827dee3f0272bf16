"""Download ImageNet weights for the ResNet encoder, checksum-verified (rule encoder_weights)."""

from blurflow import logs
from blurflow.modelfile import fetch_encoder_weights

log = logs.job(snakemake)
path = fetch_encoder_weights(snakemake.wildcards.encoder, snakemake.output.weights, snakemake.params.base_url)
log.info("%s: %.1f MB, SHA-256 verified", path, path.stat().st_size / 1e6)
