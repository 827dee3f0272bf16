"""Training (paper Section 2.3): RAdam, learning-rate schedule, checkpoint every epoch, resume.

Training data come from shard files (``train.data: shards``) or are synthesised on the training
device (``online``, blurflow.data.OnlineData). Each epoch's order is seeded by (seed, epoch) and the
checkpoint holds the model, optimiser and log, so a run that is interrupted and started again
continues from the last finished epoch and ends where an uninterrupted run would (bitwise on the
CPU). ``train.max_minutes`` caps the training time: the learning-rate schedule then runs against
whichever ends first, the planned steps or the clock, so a run cut by time still ends annealed (such
a run is not reproducible; the model file and the log say so). Channels-last memory layout (8 %
faster on the CPU too); on a CUDA device bfloat16 autocast.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import pooch
import torch

from blurflow import data, logs
from blurflow.devices import compile_enabled, pick_device
from blurflow.evaluate import FlowMetrics
from blurflow.files import atomic_path
from blurflow.model import (
    ENCODERS,
    ENCODINGS,
    LOSSES,
    FlowNet,
    check_architecture,
    check_stem_stride,
    decode,
    deepen,
    dihedral_outputs,
    loss_fn,
    smooth_outputs,
)
from blurflow.modelfile import images_trained, load_model, save_model
from blurflow.optics import COMPONENTS
from blurflow.schema import RUNTIME_KEYS, config_hash, dataclass_values, defaults

log = logging.getLogger(__name__)
LOG_COLUMNS = ["epoch", "samples", "train_loss", "val_loss", *(f"val_r2_{c}" for c in COMPONENTS), "val_r2_mean", "images_per_s", "lr", "minutes"]
SCHEDULES = ("onecycle", "cosine", "constant")
DATA = ("shards", "online")
TIMING_COLUMNS = ("images_per_s", "minutes")  # log columns that vary from run to run
_TRAIN = defaults("train")  # the schema holds the defaults
SMOOTHING_PX = (0.0, 2.0, 4.0, 8.0, 12.0, 16.0)  # Gaussian output smoothing widths tried on the validation set after training
EDGE_SMOOTHING_PX = (8.0, 16.0, 24.0)  # edge-preserving smoothing widths tried too (blurflow.model.smooth_outputs)
SMOOTHINGS = (*((s, False) for s in SMOOTHING_PX), *((s, True) for s in EDGE_SMOOTHING_PX))  # (px, edge-preserving)
# (dihedral mean, px, edge-preserving) tried after training; edge-preserving only on the dihedral mean, which has won in every run, to halve its cost
READOUTS = (*((False, s, False) for s in SMOOTHING_PX), *((True, s, edges) for s, edges in SMOOTHINGS))
PLAIN = ((False, 0.0, False),)  # the readout scored after every epoch
ARCHITECTURE = (
    "encoder",
    "encoding",
    "encoder_depth",
    "decoder_channels",
    "stem_stride",
    "unshuffle",
)  # what a model file and the config must share to start training from it


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` section (defaults: the schema's) and the master seed."""

    encoder: str = _TRAIN["encoder"]
    encoder_depth: int = _TRAIN["encoder_depth"]
    decoder_channels: tuple[int, ...] = tuple(_TRAIN["decoder_channels"])
    stem_stride: int = _TRAIN["stem_stride"]
    unshuffle: int = _TRAIN["unshuffle"]
    encoding: str = _TRAIN["encoding"]
    loss: str = _TRAIN["loss"]
    gamma: float = _TRAIN["gamma"]
    component_weights: tuple[float, ...] = tuple(_TRAIN["component_weights"])
    data: str = _TRAIN["data"]
    epochs: int = _TRAIN["epochs"]
    max_minutes: float | None = _TRAIN["max_minutes"]
    batch_size: int = _TRAIN["batch_size"]
    lr: float = _TRAIN["lr"]
    weight_decay: float = _TRAIN["weight_decay"]
    schedule: str = _TRAIN["schedule"]
    warmup_fraction: float = _TRAIN["warmup_fraction"]
    workers: int = _TRAIN["workers"]
    pretrained_weights: str | None = _TRAIN["pretrained_weights"]
    init_model: str | None = _TRAIN["init_model"]
    device: str = _TRAIN["device"]
    amp: bool = _TRAIN["amp"]
    compile: str | bool = _TRAIN["compile"]
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping, seed: int = 0) -> TrainConfig:
        out = cls(**dataclass_values(cls, "train", cfg), seed=seed)
        choices = (
            ("encoder", ENCODERS),
            ("encoding", ENCODINGS),
            ("loss", LOSSES),
            ("schedule", SCHEDULES),
            ("data", DATA),
            ("stem_stride", (1, 2)),
            ("unshuffle", (1, 2)),
        )
        for name, allowed in choices:
            if getattr(out, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {allowed}, got {getattr(out, name)!r}")
        check_architecture(out.encoder_depth, out.decoder_channels)
        check_stem_stride(out.encoder, out.stem_stride)
        if out.loss == "paper" and out.encoding != "paper":
            raise ValueError("train.loss 'paper' (Eq. 6) needs train.encoding 'paper'")
        if len(out.component_weights) != 4 or min(out.component_weights) < 0 or not sum(out.component_weights) > 0:
            raise ValueError(f"train.component_weights must be 4 non-negative weights, not all 0, got {list(out.component_weights)}")
        if out.pretrained_weights and out.init_model:
            raise ValueError("train.pretrained_weights and train.init_model both set: give one (init_model's weights would replace the encoder weights)")
        if out.max_minutes is not None and not out.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be a positive number of minutes or null, got {out.max_minutes!r}")
        return out

    def resume_key(self) -> str:
        """Hash of what must not change for a checkpoint to be resumed: the settings and the starting
        weights' file contents. (init_model unset keeps the key that runs had before the key existed.)"""
        key = {k: v for k, v in asdict(self).items() if k not in ("workers", "device", "max_minutes", "init_model", "compile")}
        if self.init_model:
            key["init_model"] = pooch.file_hash(self.init_model, alg="sha256")
        return config_hash(key)

    def build_model(self) -> FlowNet:
        return FlowNet(self.encoder, self.encoding, self.encoder_depth, self.decoder_channels, self.stem_stride, self.unshuffle)


class TrainData(Protocol):
    """Where batches come from (blurflow.data.ShardData or OnlineData)."""

    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterable[dict]: ...

    def validation(self) -> Iterable[dict]: ...


def lr_factor(progress: float, cfg: TrainConfig) -> float:
    """Learning rate over ``cfg.lr`` at ``progress`` in [0, 1] of training. ``onecycle``: cosine
    warm-up from 1/25 over ``warmup_fraction``, then cosine annealing to 1/25e4 (as
    torch.optim.lr_scheduler.OneCycleLR); ``cosine``: cosine annealing to 0; ``constant``: 1."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    start, end, w = 1 / 25, 1 / 25e4, cfg.warmup_fraction
    if p < w:
        return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * p / w))
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * (p - w) / max(1 - w, 1e-9)))


def _write_log(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def evaluate_loss(
    model: FlowNet, batches: Iterable[dict], cfg: TrainConfig, device: torch.device, readouts: Sequence[tuple[bool, float, bool]] = PLAIN,
) -> tuple[float, dict[tuple[bool, float, bool], dict]]:  # fmt: skip
    """Mean loss of the model over batches, and its R^2 with each readout (whether the outputs
    are the mean over the 8 rotations and reflections of the image, output smoothing width in px,
    whether the smoothing preserves edges)."""
    model.eval()
    metrics, total, count = {r: FlowMetrics() for r in readouts}, 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        for batch in batches:
            image, target, valid = (batch[k].to(device) for k in ("image", "target", "valid"))
            out = {False: model(image).float()}
            total += float(loss_fn(out[False], target, valid, cfg.loss, cfg.encoding, cfg.gamma, cfg.component_weights)) * len(image)
            count += len(image)
            if any(dihedral for dihedral, _, _ in readouts):
                out[True] = dihedral_outputs(model, image)
            for (dihedral, sigma, edges), m in metrics.items():
                m.update(decode(smooth_outputs(out[dihedral], sigma, edges), cfg.encoding), target, valid)
    return total / max(count, 1), {r: m.r2() for r, m in metrics.items()}


def _resume(checkpoint_path: Path, key: str, model: FlowNet, opt: torch.optim.Optimizer, device: torch.device) -> tuple[list[dict], int, str | None]:
    """Load an interrupted run's checkpoint into ``model`` and ``opt`` when its key is ``key``;
    returns (log rows, next epoch, why it stopped early or None)."""
    if not checkpoint_path.exists():
        return [], 0, None
    ck = torch.load(checkpoint_path, map_location=device, weights_only=True)
    if ck["resume_key"] != key:
        log.warning("checkpoint %s is from another configuration; starting over", checkpoint_path)
        return [], 0, None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    log.info("resuming from %s after epoch %d", checkpoint_path, ck["epoch"] + 1)
    return ck["rows"], ck["epoch"] + 1, ck.get("stopped")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor], cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    """One optimiser step on a batch; returns the loss as a tensor on ``device`` (nothing is
    read back to the host: the caller reads it when it logs)."""
    image, target, valid = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "valid"))
    image = image.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        out = model(image)
    loss = loss_fn(out.float(), target, valid, cfg.loss, cfg.encoding, cfg.gamma, cfg.component_weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable[dict],
    epoch: int,
    cfg: TrainConfig,
    device: torch.device,
    minutes: float,
    per_epoch: int,
    progress: bool,
) -> tuple[float, int, str | None]:
    """One epoch of optimiser steps; returns (mean training loss, images seen, why training
    stopped early or None). ``minutes`` of training before this epoch count against max_minutes.
    The loss is summed on the device and read each quarter epoch (the progress bar's and the log's)."""
    model.train()
    total_steps = cfg.epochs * per_epoch
    t0, total, seen, stopped = time.perf_counter(), torch.zeros((), device=device), 0, None
    bar = logs.progress(total=per_epoch, enabled=progress, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
    for i, batch in enumerate(batches):
        elapsed = minutes + (time.perf_counter() - t0) / 60
        if cfg.max_minutes and elapsed >= cfg.max_minutes:
            stopped = f"train.max_minutes ({cfg.max_minutes:g}) reached after {epoch * per_epoch + i} of {total_steps} steps"
            break
        step = epoch * per_epoch + i
        progress_done = max(step / total_steps, elapsed / cfg.max_minutes if cfg.max_minutes else 0.0)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(progress_done, cfg)
        n = len(batch["image"])
        total += train_step(model, opt, batch, cfg, device) * n
        seen += n
        bar.update()
        if 4 * (i + 1) // per_epoch > 4 * i // per_epoch and i + 1 < per_epoch:  # a quarter epoch: the loss is read
            mean = float(total) / seen
            bar.set_postfix(loss=f"{mean:.4f}")
            if bar.disable:  # no terminal: a line per quarter
                log.info(
                    "epoch %d/%d: %d%%, training loss %.4f, %.0f images/s",
                    epoch + 1,
                    cfg.epochs,
                    100 * (i + 1) // per_epoch,
                    mean,
                    seen / (time.perf_counter() - t0),
                )
    bar.close()
    return float(total) / max(seen, 1), seen, stopped


def _save_final(
    model: FlowNet, rows: list[dict], scores: dict[tuple[bool, float, bool], dict], cfg: TrainConfig, stopped: str | None, model_path: Path,
    meta: Mapping, images_before: int,
) -> None:  # fmt: skip
    """The model file, with the readout (:func:`readout_meta`) chosen on the validation ``scores``;
    ``images_before``: images the starting model was trained on. It holds no timings (those are
    in the training log), so the same configuration gives the same bytes."""
    info = {
        "train": asdict(cfg), "epochs_trained": len(rows), "samples_trained": rows[-1]["samples"],
        "samples_trained_total": images_before + rows[-1]["samples"], "stopped_early": stopped,
        "final": {k: v for k, v in rows[-1].items() if k not in TIMING_COLUMNS},
        **readout_meta(scores),
    }  # fmt: skip
    save_model(model.cpu(), model_path, {**meta, **info})


def smoothing_label(sigma_px: float, edges: bool) -> str:
    """A smoothing's key in a model file's validation scores: "8" (Gaussian), "8 edges"."""
    return f"{sigma_px:g}{' edges' if edges else ''}"


def readout_meta(scores: Mapping[tuple[bool, float, bool], dict]) -> dict:
    """The model file's readout entries: the best of :data:`READOUTS` by validation R^2
    (``scores``, as :func:`evaluate_loss` gives them) and every readout's scores."""
    dihedral, best, edges = max(READOUTS, key=lambda r: scores[r]["mean"])
    for d in (False, True):
        log.info(
            "validation R2%s: %s",
            " (mean over 8 rotations and reflections)" if d else "",
            ", ".join(f"{s:g} px{' edges' * e} {scores[d, s, e]['mean']:.3f}" for s, e in SMOOTHINGS if (d, s, e) in scores),
        )
    log.info(
        "chosen: output smoothing %g px%s, %s", best, ", edge-preserving" if edges else "", "mean over 8 rotations and reflections" if dihedral else "one pass"
    )
    return {
        "output_smoothing_px": best, "output_smoothing_edges": edges, "dihedral_mean": dihedral,
        "val_r2_by_smoothing_px": {smoothing_label(s, False): scores[False, s, False] for s in SMOOTHING_PX},
        "val_r2_by_smoothing_px_dihedral": {smoothing_label(s, e): scores[True, s, e] for s, e in SMOOTHINGS},
    }  # fmt: skip


def train(
    data: TrainData,
    model_path: str | Path,
    log_path: str | Path,
    checkpoint_path: str | Path,
    cfg: TrainConfig,
    meta: Mapping,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train, logging every epoch to ``log_path`` (CSV) and ``checkpoint_path``; write the model
    and the log when all epochs are done or ``cfg.max_minutes`` is reached.

    A checkpoint resumes when it was written for the same ``cfg`` and data (``meta['data_key']``,
    a hash of what the training data depend on); a finished run's checkpoint writes its model and
    log again without training. ``stop_after_epochs`` ends this run early, as an interruption
    would (for time-limited jobs); calling again resumes. Returns the log rows.
    """
    model_path, log_path, checkpoint_path = Path(model_path), Path(log_path), Path(checkpoint_path)
    device = pick_device(cfg.device)
    model, opt, before = _build(cfg, device, data)
    key = config_hash(cfg.resume_key(), meta.get("data_key"))
    rows, start, stopped = _resume(checkpoint_path, key, model, opt, device)
    stepper = torch.compile(model) if compile_enabled(cfg.compile, device) else model  # the same weights
    log.info("training %s on %s: %d epochs of %d steps of %d images (%s data)", cfg.encoder, device, cfg.epochs, data.steps_per_epoch, cfg.batch_size, cfg.data)
    final_scores = None
    for run_epochs, epoch in enumerate(range(start, cfg.epochs)):
        if stopped or (stop_after_epochs is not None and run_epochs >= stop_after_epochs):
            break
        row, stopped, final_scores = _run_epoch(model, stepper, opt, data, epoch, cfg, device, rows, progress)
        rows.append(row)
        _write_log(rows, log_path)
        _save_checkpoint(
            checkpoint_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "rows": rows, "stopped": stopped, "resume_key": key}
        )
    if len(rows) == cfg.epochs or stopped:
        scores = final_scores or evaluate_loss(model, data.validation(), cfg, device, READOUTS)[1]  # resumed after the last epoch
        _write_log(rows, log_path)
        _save_final(model, rows, scores, cfg, stopped, model_path, meta, before)
    return rows


def run_config(
    depends: Mapping, runtime: Mapping, train_files: Sequence[str | Path], val_files: Sequence[str | Path],
    model_path: str | Path, log_path: str | Path, checkpoint_path: str | Path,
) -> list[dict]:
    """Train as the workflow's rule ``train`` does: ``depends`` is what the model depends on
    (blurflow.pipeline.for_training), ``runtime`` the speed-only ``train`` keys (RUNTIME_KEYS),
    ``train_files``/``val_files`` the shard files or the sources file of each split. Returns the log rows."""
    c = {**depends, "train": {**depends["train"], **{k: runtime[k] for k in RUNTIME_KEYS}}}
    cfg = TrainConfig.from_config(c["train"], seed=c["seed"])
    device = pick_device(cfg.device)
    meta = {
        "optics": c["optics"],
        "scales": {k: c["motion"][k] for k in ("lateral_scale_px", "axial_scale_um")},
        "image_px": c["synthesis"]["image_px"],
        "config_hash": config_hash(depends),
        "data_key": config_hash(c["optics"], c["motion"], c["synthesis"], c["sources"], c["seed"]),
    }
    batches = data.from_config(c, train_files, val_files, device)
    return train(batches, model_path, log_path, checkpoint_path, cfg, meta)


def _build(cfg: TrainConfig, device: torch.device, data: TrainData) -> tuple[FlowNet, torch.optim.Optimizer, int]:
    """The network (seeded; ImageNet encoder weights or ``cfg.init_model``'s where configured, a
    model one stage shallower deepened with the statistics of ``data``'s first validation batch)
    on ``device``, its optimiser, and the images its starting weights were trained on."""
    torch.manual_seed(cfg.seed)
    model = cfg.build_model()
    if cfg.pretrained_weights:
        model.load_encoder_weights(cfg.pretrained_weights)
    before = 0
    if cfg.init_model:
        start, before = init_weights(cfg)
        if start.depth < model.depth:
            start = deepen(start, model.decoder_channels[0], next(iter(data.validation()))["image"].float().cpu())
        model.load_state_dict(start.state_dict())
    model = model.to(device, memory_format=torch.channels_last)
    return model, make_optimizer(model, cfg, device), before


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """RAdam at the schedule's first learning rate; on CUDA its state and step count live on the
    device (capturable), so its step reads nothing back to the host."""
    return torch.optim.RAdam(model.parameters(), lr=cfg.lr * lr_factor(0, cfg), weight_decay=cfg.weight_decay, capturable=device.type == "cuda")


def init_weights(cfg: TrainConfig) -> tuple[FlowNet, int]:
    """The model file ``cfg.init_model`` and the images it was trained on (its own starting
    model's included); refused unless its architecture is the config's, or the config's one
    encoder stage shallower (``model.deepen``: the config's first decoder block must have the
    channels of the file's deepest stage and the rest must be the file's)."""
    try:
        start, meta = load_model(cfg.init_model)
    except ValueError as exc:
        raise ValueError(f"train.init_model: {exc}") from None
    want = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k in ARCHITECTURE}
    depth, decoder = start.deeper_architecture()
    grown = {**meta, "encoder_depth": depth, "decoder_channels": decoder}
    differ = [f"{k} {meta.get(k)!r} (config: {v!r})" for k, v in want.items() if meta.get(k) != v]
    if differ and any(grown.get(k) != v for k, v in want.items()):
        raise ValueError(
            f"train.init_model: {cfg.init_model} has another architecture than the config: {', '.join(differ)} "
            f"(a model one stage shallower is deepened: encoder_depth {grown['encoder_depth']}, decoder_channels {grown['decoder_channels']})"
        )
    images = images_trained(meta)
    log.info("starting from the weights of %s (%d images trained%s)", cfg.init_model, images, ", deepened by one stage" if differ else "")
    return start, images


def _run_epoch(
    model: FlowNet, stepper: torch.nn.Module, opt: torch.optim.Optimizer, data: TrainData, epoch: int, cfg: TrainConfig, device: torch.device,
    rows: list[dict], progress: bool,
) -> tuple[dict, str | None, dict | None]:  # fmt: skip
    """Train one epoch (``stepper``: the model, or its compiled form) and validate: its log row,
    why training stopped (or None) and, after the last epoch, the validation scores of every
    readout (READOUTS)."""
    minutes = rows[-1]["minutes"] if rows else 0.0
    t0 = time.perf_counter()
    train_loss, seen, stopped = _train_epoch(stepper, opt, data.epoch(epoch), epoch, cfg, device, minutes, data.steps_per_epoch, progress)
    elapsed = time.perf_counter() - t0
    last = epoch + 1 == cfg.epochs or stopped  # the last epoch also scores every readout
    val_loss, scores = evaluate_loss(model, data.validation(), cfg, device, READOUTS if last else PLAIN)
    r2 = scores[PLAIN[0]]
    minutes += (time.perf_counter() - t0) / 60
    row = {
        "epoch": epoch + 1, "samples": (rows[-1]["samples"] if rows else 0) + seen, "train_loss": train_loss, "val_loss": val_loss,
        **{f"val_r2_{c}": r2[c] for c in COMPONENTS}, "val_r2_mean": r2["mean"], "images_per_s": seen / elapsed,
        "lr": opt.param_groups[0]["lr"], "minutes": minutes,
    }  # fmt: skip
    log.info(
        "epoch %d/%d: %d images, train loss %.4f, val loss %.4f, val R2 %.3f (%s), %.0f images/s, %.1f min",
        epoch + 1, cfg.epochs, row["samples"], row["train_loss"], val_loss, r2["mean"],
        " ".join(f"{c} {r2[c]:.2f}" for c in COMPONENTS), row["images_per_s"], minutes,
    )  # fmt: skip
    if stopped:
        log.warning("training stopped early: %s", stopped)
    return row, stopped, scores if last else None


def _save_checkpoint(path: Path, state: dict) -> None:
    """The resumable state after an epoch (model, optimiser, log rows, resume key), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
