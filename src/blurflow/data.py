"""Training and validation batches: from HDF5 shards, or synthesised on the fly on the training device.

Shards (format: docs/design.md, writer: blurflow.synthesis) are opened lazily in the process that reads
them (each DataLoader worker opens its own handles after fork); dense label maps are built from
``region`` + ``params`` when a sample is read.

Online (``train.data: online``): training step ``s`` draws its batch as numbers (blurflow.synthesis.SampleDraws,
seed key ``(seed, train, s, 0)``: the first batch a shard ``s`` would hold) in the training process and
renders it on the training device, so a resumed run continues with the very batches an uninterrupted
one would see, and nothing but a few hundred bytes per image crosses from the host.

A batch is a dict with ``image`` (B, 1, H, W) float32 camera counts, ``target`` (B, 4, H, W) float32
canonical (v1, v2, v3, z0) and ``valid`` (B, 1, H, W) float32 validity w (0 where the label is unknown).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from blurflow.devices import compile_enabled
from blurflow.synthesis import RENDER_BATCH, Setup, Synthesizer, batch_key


def label_maps(region: torch.Tensor, params: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense targets (B, 4, H, W) and validity (B, 1, H, W), both float32, from region indices
    (B, H, W), per-region labels (B, N, 4) with NaN for unused regions, and w (B, H, W)."""
    b = torch.arange(region.shape[0], device=region.device)[:, None, None]
    target = params[b, region.long()]  # (B, H, W, 4)
    known = torch.isfinite(target).all(-1)
    return torch.nan_to_num(target).permute(0, 3, 1, 2).contiguous(), (valid.float() * known)[:, None]


class ShardDataset(torch.utils.data.Dataset):
    """Samples of a list of shards.

    Item ``i``: dict with ``image`` (1, H, W) float32 camera counts, ``target`` (4, H, W) float32
    canonical (v1, v2, v3, z0), ``valid`` (1, H, W) float32 validity w (0 where the label is
    unknown), ``region`` (H, W) int64 region index, ``index`` int.
    """

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise ValueError("ShardDataset needs at least one shard")
        self.paths = [str(p) for p in paths]
        lengths = []
        for p in self.paths:  # opened and closed here: no handle survives into forked workers
            with h5py.File(p, "r") as f:
                lengths.append(f["image"].shape[0])
                if not lengths[1:]:
                    self.attrs = {k: _decode(v) for k, v in f.attrs.items()}
        self.offsets = np.cumsum([0, *lengths])
        self._files: dict[str, h5py.File] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _file(self, path: str) -> h5py.File:
        if self._pid != os.getpid():  # new worker process: never reuse a parent's handles
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        return self._files[path]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        local = index - int(self.offsets[shard])
        f = self._file(self.paths[shard])
        region = torch.from_numpy(f["region"][local].astype(np.int64))
        target, valid = label_maps(region[None], torch.from_numpy(f["params"][local])[None], torch.from_numpy(f["valid"][local])[None])
        return {
            "image": torch.from_numpy(f["image"][local].astype(np.float32))[None],
            "target": target[0],
            "valid": valid[0],
            "region": region,
            "index": index,
        }


class ShardData:
    """Training and validation batches from shard files. Training epoch ``e`` is shuffled by a
    generator seeded with (seed, e) and drops the last partial batch; validation is in order."""

    def __init__(self, train: Sequence[str | Path], val: Sequence[str | Path], batch_size: int, seed: int, workers: int = 0, pin_memory: bool = False):
        self.train, self.val = ShardDataset(train), ShardDataset(val)
        self.seed, self.kw = seed, {"batch_size": batch_size, "num_workers": workers, "pin_memory": pin_memory}
        self.steps_per_epoch = max(1, len(self.train) // batch_size)

    def epoch(self, epoch: int) -> Iterable[dict]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.utils.data.DataLoader(self.train, shuffle=True, drop_last=True, generator=g, **self.kw)

    def validation(self) -> Iterable[dict]:
        return torch.utils.data.DataLoader(self.val, shuffle=False, **self.kw)


class OnlineData:
    """Batches synthesised on the fly: drawn on the host as numbers, rendered on ``device``.

    Training epoch ``e`` is steps ``e * steps_per_epoch ...``; every step is new data. Validation
    is the validation shards (``val_samples``: shards, samples per shard) as the shard path writes
    them (the writer's batches and keys, so on the CPU they are the same bytes), rendered once and
    kept on the device. Training batches are rendered with static shapes and no host reads
    (blurflow.synthesis.Synthesizer ``static``); ``compile``: through ``torch.compile(fullgraph=True)``.
    """

    def __init__(
        self,
        train_sources: str | Path,
        val_sources: str | Path,
        setup: Setup,
        batch_size: int,
        samples_per_epoch: int,
        val_samples: tuple[int, int] = (1, 1250),
        device: torch.device | str = "cpu",
        compile: bool = False,
    ):
        self.renderer = Synthesizer(train_sources, setup, device=device, compile=compile, static=True)
        self.val_renderer = Synthesizer(val_sources, setup, device=device)  # rendered once: as the shard writer does
        self.seed, self.batch_size = setup.seed, batch_size
        self.steps_per_epoch = max(1, samples_per_epoch // batch_size)
        self.val_samples = val_samples
        self._val: list[dict] | None = None

    @staticmethod
    def render(syn: Synthesizer, draws: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A batch (module docstring) from its draws."""
        out = syn.batch(draws)
        target, valid = label_maps(out["region"], out["params"], out["valid"])
        return {"image": out["image"][:, None], "target": target, "valid": valid}

    def draws(self, step: int) -> dict[str, np.ndarray]:
        """The draws of training step ``step``: the first ``batch_size`` samples of shard ``step``'s key."""
        return self.renderer.draws.step(self.batch_size, batch_key(self.seed, "train", step))

    def steps(self, steps: Iterable[int]) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches of the given steps."""
        return (self.render(self.renderer, self.draws(s)) for s in steps)

    def epoch(self, epoch: int) -> Iterable[dict]:
        return self.steps(range(epoch * self.steps_per_epoch, (epoch + 1) * self.steps_per_epoch))

    def validation(self) -> list[dict[str, torch.Tensor]]:
        if self._val is None:
            shards, per_shard = self.val_samples
            syn, n = self.val_renderer, RENDER_BATCH  # the shard writer's batches and keys: the same bytes
            self._val = [
                self.render(syn, syn.draws.step(min(n, per_shard - start), batch_key(self.seed, "val", s, b)))
                for s in range(shards) for b, start in enumerate(range(0, per_shard, n))
            ]  # fmt: skip
        return self._val


def from_config(config: Mapping, train: Sequence[str | Path], val: Sequence[str | Path], device: torch.device) -> ShardData | OnlineData:
    """The training data of a workflow config: ``train`` and ``val`` are the shard files
    (``train.data: shards``) or the one sources file of each split (``online``)."""
    t, s = config["train"], config["synthesis"]
    if t["data"] == "online":
        return OnlineData(
            train[0], val[0], Setup.from_config(config), batch_size=t["batch_size"],
            samples_per_epoch=s["samples_per_shard"] * s["shards"]["train"], val_samples=(s["shards"]["val"], s["samples_per_shard"]),
            device=device, compile=compile_enabled(t["compile"], device),
        )  # fmt: skip
    return ShardData(train, val, t["batch_size"], config["seed"], t["workers"], pin_memory=device.type == "cuda")


def _decode(value):
    """HDF5 attribute -> Python (JSON strings are parsed)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value
