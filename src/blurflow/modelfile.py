"""The files of a model: the self-describing model file (weights and everything needed to use
them, JSON metadata; byte-identical for the same weights and metadata), the model shipped in the
repository, and the ImageNet encoder weights (downloaded on request only, checked by SHA-256)."""

from __future__ import annotations

import importlib.resources
import json
import os
import tempfile
from pathlib import Path

import pooch
import torch

from blurflow import __version__, logs
from blurflow.files import atomic_path
from blurflow.model import FlowNet


def _shipped_model() -> Path:
    """The shipped model (docs/model.md): package data ``blurflow.models`` (models/ of the
    repository, installed with the package, editable or not), or models/ beside src/ where the
    package runs from a checkout without being installed."""
    try:
        return Path(str(importlib.resources.files("blurflow.models") / "blurflow.pt"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "models" / "blurflow.pt"


SHIPPED_MODEL = _shipped_model()
TORCHVISION_URL = "https://download.pytorch.org/models/"
IMAGENET_WEIGHTS = {  # torchvision's ImageNet-1k ResNet weights; the 8 hex digits of a name begin its SHA-256
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}


def fetch_encoder_weights(encoder: str, dest: str | Path, base_url: str = TORCHVISION_URL) -> Path:
    """Download torchvision's ImageNet weights of ``encoder`` (pooch, progress bar on a terminal)
    and move them to ``dest`` once their SHA-256 matches the digits in the file name; a mismatch
    is a ``ValueError`` and leaves nothing behind."""
    if encoder not in IMAGENET_WEIGHTS:
        raise ValueError(f"no ImageNet weights known for encoder {encoder!r}; known: {', '.join(IMAGENET_WEIGHTS)}")
    name = IMAGENET_WEIGHTS[encoder]
    prefix = name.rsplit("-", 1)[1].removesuffix(".pth")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        bar = logs.progress(total=1, unit="B", unit_scale=True, desc=name)  # pooch sets the total
        downloader = pooch.HTTPDownloader(progressbar=bar, timeout=60)
        path = pooch.retrieve(base_url.rstrip("/") + "/" + name, known_hash=None, fname=name, path=tmp, downloader=downloader)
        digest = pooch.file_hash(path, alg="sha256")
        if not digest.startswith(prefix):
            raise ValueError(f"{name} from {base_url}: SHA-256 {digest[:16]}... does not start with {prefix}; the download is corrupt or not these weights")
        os.replace(path, dest)
    return dest


def save_model(model: FlowNet, path: str | Path, meta: dict) -> None:
    """Model file: weights plus everything needed to use them (architecture, encoding, optics,
    scales, normalisation, version, config hash, ...) as JSON values. Written atomically; the same
    weights and metadata give the same bytes."""
    info = {
        "encoder": model.encoder_name,
        "encoding": model.encoding,
        "encoder_depth": model.depth,
        "decoder_channels": model.decoder_channels,
        "stem_stride": model.stem_stride,
        "unshuffle": model.unshuffle,
        "input_normalisation": "anscombe + per-image standardisation",
        "outputs": "v1,v2,v3,z0,w (canonical; normalised units, see scales)",
        "blurflow_version": __version__,
        **meta,
    }
    info = json.loads(json.dumps(info, default=str))  # plain JSON values, no shared objects: the same meta pickles to the same bytes
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), "meta": info}, tmp)


def readout(meta: dict) -> dict:
    """How a model file's validation set chose to read its outputs, as keyword arguments of
    :func:`blurflow.evaluate.predict`: ``smooth_px`` (px), ``edges`` (edge-preserving smoothing) and
    ``dihedral`` (none where the file does not say)."""
    return {"smooth_px": meta.get("output_smoothing_px", 0.0), "edges": meta.get("output_smoothing_edges", False), "dihedral": meta.get("dihedral_mean", False)}


def images_trained(meta: dict) -> int:
    """Images a model file's network was trained on, its starting model's included (0 where the
    file does not say)."""
    return meta.get("samples_trained_total", meta.get("samples_trained", 0))


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[FlowNet, dict]:
    """(model in eval mode, metadata) from a model file written by :func:`save_model`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a model file (give the model.pt inside it)")
    if not path.is_file():
        raise ValueError(f"model file {path} not found")
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - torch's own message would advise unsafe loading
        raise ValueError(f"{path} is not a blurflow model file: not a readable PyTorch file (corrupt, truncated or another format)") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict) or "state_dict" not in blob:
        raise ValueError(f"{path} is not a blurflow model file: it has no blurflow metadata (use the model.pt that training writes)")
    meta = blob["meta"]
    try:
        model = FlowNet(
            meta["encoder"], meta["encoding"], meta["encoder_depth"], meta["decoder_channels"], meta.get("stem_stride", 2), meta.get("unshuffle", 1)
        )
        model.load_weights(blob["state_dict"])
    except (KeyError, ValueError, RuntimeError):
        raise ValueError(f"{path} is a damaged blurflow model file: its weights do not match the architecture it records") from None
    return model.to(device).eval(), meta
