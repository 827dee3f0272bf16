"""Torch dataset over HDF5 shards (format: DESIGN.md, writer: blurflow.synthesis).

Files are opened lazily in the process that reads them (each DataLoader worker opens its own
handles after fork); dense label maps are built from ``region`` + ``params`` on the fly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch


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
        image = f["image"][local].astype(np.float32)
        region = f["region"][local].astype(np.int64)
        params = f["params"][local]  # (N_max, 4), NaN for unused regions
        target = params[region]  # (H, W, 4)
        known = np.isfinite(target).all(-1)
        valid = f["valid"][local].astype(np.float32) * known
        return {
            "image": torch.from_numpy(image)[None],
            "target": torch.from_numpy(np.nan_to_num(target).transpose(2, 0, 1).copy()),
            "valid": torch.from_numpy(valid)[None],
            "region": torch.from_numpy(region),
            "index": index,
        }


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
