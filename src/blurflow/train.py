"""Training (paper Section 2.3): RAdam, learning-rate schedule, checkpoint every epoch, resume.

Each epoch's shuffling is seeded by (seed, epoch) and the checkpoint holds the model, optimiser,
schedule and log, so a run that is interrupted and started again continues from the last finished
epoch and ends where an uninterrupted run would (bitwise on the CPU). Channels-last memory layout
(8 % faster on the CPU too); on a CUDA device bfloat16 autocast.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from blurflow.data import ShardDataset
from blurflow.evaluate import COMPONENTS, FlowMetrics
from blurflow.files import atomic_path
from blurflow.model import ENCODERS, ENCODINGS, LOSSES, FlowNet, check_architecture, decode, loss_fn, save_model
from blurflow.synthesis import config_hash, dataclass_values

log = logging.getLogger(__name__)
LOG_COLUMNS = ["epoch", "train_loss", "val_loss", *(f"val_r2_{c}" for c in COMPONENTS), "val_r2_mean", "images_per_s", "lr", "minutes"]


@dataclass(frozen=True)
class TrainConfig:
    encoder: str = "resnet18"
    encoder_depth: int = 4
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16)
    encoding: str = "doubled_angle"
    loss: str = "ours"
    gamma: float = 0.5
    epochs: int = 4
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # onecycle | cosine | constant
    warmup_fraction: float = 0.1
    workers: int = 0
    pretrained_weights: str | None = None
    device: str = "auto"
    amp: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping, seed: int = 0) -> TrainConfig:
        out = cls(**dataclass_values(cls, cfg), seed=seed)
        for name, allowed in (("encoder", ENCODERS), ("encoding", ENCODINGS), ("loss", LOSSES), ("schedule", ("onecycle", "cosine", "constant"))):
            if getattr(out, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {allowed}, got {getattr(out, name)!r}")
        check_architecture(out.encoder_depth, out.decoder_channels)
        if out.loss == "paper" and out.encoding != "paper":
            raise ValueError("train.loss 'paper' (Eq. 6) needs train.encoding 'paper'")
        return out

    def resume_key(self) -> str:
        """Hash of what must not change for a checkpoint to be resumed."""
        return config_hash({k: v for k, v in asdict(self).items() if k not in ("workers", "device")})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _write_log(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def evaluate_loss(model: FlowNet, loader, cfg: TrainConfig, device: torch.device) -> tuple[float, dict]:
    """Mean loss and R^2 of the model over a loader."""
    model.eval()
    metrics, total, count = FlowMetrics(), 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        for batch in loader:
            image, target, valid = (batch[k].to(device) for k in ("image", "target", "valid"))
            out = model(image).float()
            total += float(loss_fn(out, target, valid, cfg.loss, cfg.encoding, cfg.gamma)) * len(image)
            count += len(image)
            metrics.update(decode(out, cfg.encoding), target, valid)
    return total / max(count, 1), metrics.r2()


def train(
    train_shards: Sequence[str | Path],
    val_shards: Sequence[str | Path],
    model_path: str | Path,
    log_path: str | Path,
    checkpoint_path: str | Path,
    cfg: TrainConfig,
    meta: Mapping,
    stop_after_epochs: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train, logging every epoch to ``log_path`` (CSV) and ``checkpoint_path``; write the model.

    ``stop_after_epochs`` ends this run early, as an interruption would (for time-limited jobs);
    calling again resumes. Returns the log rows.
    """
    model_path, log_path, checkpoint_path = Path(model_path), Path(log_path), Path(checkpoint_path)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    train_ds, val_ds = ShardDataset(train_shards), ShardDataset(val_shards)
    model = FlowNet(cfg.encoder, cfg.encoding, cfg.encoder_depth, cfg.decoder_channels)
    if cfg.pretrained_weights:
        model.load_encoder_weights(cfg.pretrained_weights)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.RAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(train_ds) // cfg.batch_size)
    sched = make_scheduler(opt, cfg, cfg.epochs * steps_per_epoch)
    rows: list[dict] = []
    start, minutes = 0, 0.0
    if checkpoint_path.exists():
        ck = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if ck["resume_key"] == cfg.resume_key():
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            rows, start = ck["rows"], ck["epoch"] + 1
            minutes = rows[-1]["minutes"] if rows else 0.0
            log.info("resuming from %s after epoch %d", checkpoint_path, ck["epoch"] + 1)
        else:
            log.warning("checkpoint %s is from another configuration; starting over", checkpoint_path)

    loader_kw = {"batch_size": cfg.batch_size, "num_workers": cfg.workers, "persistent_workers": cfg.workers > 0, "pin_memory": device.type == "cuda"}
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)
    amp = cfg.amp and device.type == "cuda"
    run_epochs = 0
    for epoch in range(start, cfg.epochs):
        if stop_after_epochs is not None and run_epochs >= stop_after_epochs:
            break
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(train_ds, shuffle=True, drop_last=True, generator=g, **loader_kw)
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not progress, leave=False, mininterval=5)
        for batch in bar:
            image, target, valid = (batch[k].to(device, non_blocking=True) for k in ("image", "target", "valid"))
            image = image.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out = model(image)
            loss = loss_fn(out.float(), target, valid, cfg.loss, cfg.encoding, cfg.gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(image)
            seen += len(image)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = time.perf_counter() - t0
        val_loss, r2 = evaluate_loss(model, val_loader, cfg, device)
        minutes += (time.perf_counter() - t0) / 60
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(seen, 1),
            "val_loss": val_loss,
            **{f"val_r2_{c}": r2[c] for c in COMPONENTS},
            "val_r2_mean": r2["mean"],
            "images_per_s": seen / elapsed,
            "lr": opt.param_groups[0]["lr"],
            "minutes": minutes,
        }
        rows.append(row)
        log.info("epoch %d: train %.4f val %.4f R2 %.3f (%.0f img/s)", epoch + 1, row["train_loss"], val_loss, r2["mean"], row["images_per_s"])
        _write_log(rows, log_path)
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "rows": rows, "resume_key": cfg.resume_key()}
        with atomic_path(checkpoint_path) as tmp:
            torch.save(state, tmp)
        run_epochs += 1
    if len(rows) == cfg.epochs:
        save_model(model.cpu(), model_path, {**meta, "train": asdict(cfg), "epochs_trained": len(rows), "final": rows[-1] if rows else {}})
    return rows

