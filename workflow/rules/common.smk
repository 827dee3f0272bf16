import sys

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from blurflow import devices, pipeline, schema

try:  # the schema beside the library, which reads its defaults there too
    validate(config, str(schema.SCHEMA_FILE))
except WorkflowError:
    sys.exit(f"blurflow: {schema.schema_error(config)}")
if workflow.is_main_process:  # once, before any job; jobs re-read the Snakefile
    try:
        for warning in pipeline.check(config):
            print(f"blurflow: warning: {warning}", file=sys.stderr)
    except ValueError as exc:
        sys.exit(f"blurflow: config error: {exc}")


onstart:
    # before any job, where the jobs run on this machine: the device a training job asks for
    training = {"train", "study_train"} & {
        j.rule.name for j in workflow.dag.needrun_jobs()
    }
    if workflow.local_exec and training:
        try:
            devices.pick_device(config["train"]["device"])
        except ValueError as exc:
            sys.exit(f"blurflow: config error: train.device: {exc}")


TESTSETS = list(schema.TESTSETS)  # every test set; below, those each rule takes
TEXTURE_SETS = [n for n, kind in schema.TESTSETS.items() if kind == "per_pixel"]
FITTED_SETS = [
    n for n, kind in schema.TESTSETS.items() if kind in ("per_case", "per_bead")
]
BEAD_SETS = [n for n, kind in schema.TESTSETS.items() if kind == "per_bead"]
MODEL = "results/model/model.pt"
TRAINING_LOG = "results/model/training_log.csv"
CONDA_ENV = "../../envs/blurflow.yaml"
GPU_REQUEST = pipeline.gpu_request(config)
GPU_CONDA_ENV = (
    "../../envs/blurflow-cuda.yaml"
    if config["conda"]["gpu_env"] == "cuda"
    else CONDA_ENV
)


def train_inputs(split):
    """What training reads for a split: its shards, or its sources file (train.data online)."""
    if config["train"]["data"] == "online":
        return [f"results/sources/{split}.h5"]
    return shard_paths(split)


def shard_paths(split):
    """All synthesis shards of a split ('train' or 'val')."""
    n = config["synthesis"]["shards"][split]
    return [f"results/shards/{split}/shard-{i:04d}.h5" for i in range(n)]
