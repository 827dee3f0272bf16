from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

CONDA_ENV = "../../envs/blurflow.yaml"
GPU_CONDA_ENV = (
    "../../envs/blurflow-cuda.yaml"
    if config["conda"]["gpu_env"] == "cuda"
    else CONDA_ENV
)


def shard_paths(split):
    """All synthesis shards of a split ('train' or 'val')."""
    n = config["synthesis"]["shards"][split]
    return [f"results/shards/{split}/shard-{i:04d}.h5" for i in range(n)]
