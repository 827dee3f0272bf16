"""The network: a U-Net with a ResNet encoder (segmentation-models-pytorch), its output encoding,
input normalisation and losses. The model file and the encoder weights: blurflow.modelfile.

Outputs per pixel (5 channels):

- encoding ``doubled_angle`` (default): (rho cos 2theta, rho sin 2theta, v3, z0, validity logit)
  with rho = |(v1, v2)| and theta its angle. Lateral motion is an orientation (a streak does not
  show its direction), and doubling the angle makes (v1, v2) and (-v1, -v2) the same point.
- encoding ``paper``: (v1, v2, v3, z0, validity logit), trained with paper Eq. 6 on |v|.

Input normalisation: camera counts c -> Anscombe 2 sqrt(c + 3/8) (Poisson noise of unit variance),
then standardised per image (zero mean, unit standard deviation), so the network does not depend on
the photon level or the camera offset.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from blurflow.optics import canonical_sign

RESNETS = ("resnet18", "resnet34", "resnet50")
ENCODERS = (*RESNETS, "efficientnet-b0")  # smp encoder names
ENCODINGS = ("doubled_angle", "paper")
LOSSES = ("ours", "paper")
PAPER_DECODER = (256, 128, 64, 32, 16)
RESNET_STAGES = (
    "layer2",
    "layer3",
    "layer4",
)  # stages 3-5 of an smp ResNet encoder (depth 3-5 runs up to stage `depth`)  # smp's default U-Net decoder, encoder depth 5


def check_architecture(depth: int, decoder_channels: Sequence[int]) -> None:
    """``ValueError`` unless 3 <= depth <= 5 with one decoder channel count per encoder stage."""
    if not 3 <= depth <= 5 or len(decoder_channels) != depth:
        raise ValueError(
            f"encoder depth (train.encoder_depth) must be 3..5 with one decoder channel count per stage "
            f"(train.decoder_channels), got {depth} and {list(decoder_channels)}"
        )


def check_stem_stride(encoder: str, stem_stride: int) -> None:
    """``ValueError`` unless the stem stride is 1 or 2, and 1 only for a ResNet (whose ``conv1`` it sets)."""
    if stem_stride not in (1, 2):
        raise ValueError(f"stem stride (train.stem_stride) must be 1 or 2, got {stem_stride!r}")
    if stem_stride == 1 and encoder not in RESNETS:
        raise ValueError(f"train.stem_stride 1 needs a ResNet encoder ({', '.join(RESNETS)}), got {encoder!r}")


def normalise(counts: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) camera counts -> Anscombe-transformed, per-image standardised input."""
    a = 2 * torch.sqrt(counts.clamp(min=0) + 0.375)
    mean = a.mean(dim=(-2, -1), keepdim=True)
    std = a.std(dim=(-2, -1), keepdim=True)
    return (a - mean) / (std + 1e-3)


def encode(target: torch.Tensor, encoding: str) -> torch.Tensor:
    """(B, 4, H, W) canonical (v1, v2, v3, z0) -> the 4 regression channels of ``encoding``."""
    if encoding == "paper":
        return target
    v1, v2 = target[:, 0], target[:, 1]
    rho = torch.hypot(v1, v2)
    safe = torch.where(rho > 0, rho, torch.ones_like(rho))
    c2 = torch.where(rho > 0, (v1 * v1 - v2 * v2) / safe, torch.zeros_like(rho))
    s2 = torch.where(rho > 0, 2 * v1 * v2 / safe, torch.zeros_like(rho))
    return torch.stack([c2, s2, target[:, 2], target[:, 3]], dim=1)


def decode(output: torch.Tensor, encoding: str) -> torch.Tensor:
    """(B, 5, H, W) network output -> (B, 5, H, W) canonical (v1, v2, v3, z0, w in [0, 1])."""
    w = torch.sigmoid(output[:, 4:5])
    if encoding == "paper":
        v = output[:, :4]
    else:
        c2, s2 = output[:, 0], output[:, 1]
        rho = torch.hypot(c2, s2)
        theta = torch.atan2(s2, c2) / 2
        v = torch.stack([rho * torch.cos(theta), rho * torch.sin(theta), output[:, 2], output[:, 3]], dim=1)
    v = canonical_sign(v.movedim(1, -1)).movedim(-1, 1)
    return torch.cat([v, w], dim=1)


EDGE_SIMILARITY = 0.2  # edge-preserving smoothing: scale of output differences (raw units) that still average
EDGE_ITERATIONS = 3  # and its passes
_EPS = 1e-4  # weight of a pixel's own value in both smoothings: where no valid pixel is within reach, it keeps its value


def smoothing_reach(sigma_px: float, edges: bool = False) -> int:
    """Pixels of context on each side that :func:`smooth_outputs` reads (0 without smoothing)."""
    if sigma_px <= 0:
        return 0
    return EDGE_ITERATIONS * _edge_offsets(sigma_px)[0] if edges else max(1, round(3 * sigma_px))


def _edge_offsets(sigma_px: float) -> tuple[int, int]:
    """(reach, stride) px of one edge-preserving pass: offsets up to 2 sigma, about 9 per axis
    (13 read the validation sets within 0.001 at twice the time)."""
    stride = max(1, round(sigma_px / 2))
    return stride * math.ceil(2 * sigma_px / stride), stride


def smooth_outputs(output: torch.Tensor, sigma_px: float, edges: bool = False) -> torch.Tensor:
    """Raw outputs (B, 5, H, W) with the 4 regression channels smoothed over ``sigma_px`` pixels,
    weighted by the predicted validity (weakly textured pixels, whose estimates are noisy, count
    less); the doubled-angle channels average orientations correctly.

    ``edges`` False: a Gaussian of ``sigma_px`` (normalised convolution). ``edges`` True: edge
    preserving, for flows that change abruptly between regions: :data:`EDGE_ITERATIONS` passes of
    a bilateral filter whose weights also fall with the difference of the outputs,
    exp(-|o(x) - o(x')|^2 / (2 :data:`EDGE_SIMILARITY`^2)), so that neighbours of another motion
    hardly count. A pixel with no valid pixel within reach keeps its value; ``sigma_px`` 0
    returns the input."""
    if sigma_px <= 0:
        return output
    w = torch.sigmoid(output[:, 4:5])
    values = output[:, :4]
    if edges:
        return torch.cat([_edge_preserving(values, w, sigma_px), output[:, 4:5]], dim=1)
    r = max(1, round(3 * sigma_px))
    t = torch.arange(-r, r + 1, dtype=output.dtype, device=output.device)
    g = torch.exp(-(t**2) / (2 * sigma_px**2))
    g = g / g.sum()

    def blur(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    return torch.cat([(blur(values * w) + _EPS * values) / (blur(w) + _EPS), output[:, 4:5]], dim=1)


def _edge_preserving(values: torch.Tensor, w: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """:func:`smooth_outputs` with ``edges``: values (B, 4, H, W), validity weights w (B, 1, H, W);
    the spatial Gaussian sampled on a grid of offsets (:func:`_edge_offsets`)."""
    r, stride = _edge_offsets(sigma_px)
    h, wd = values.shape[-2:]
    pw = F.pad(w, (r, r, r, r), mode="replicate")
    for _ in range(EDGE_ITERATIONS):
        pv = F.pad(values, (r, r, r, r), mode="replicate")
        num, den = _EPS * values, torch.full_like(w, _EPS)
        for dy in range(-r, r + 1, stride):
            for dx in range(-r, r + 1, stride):  # in place: a band's temporaries stay few (memory of large images)
                v = pv[..., r + dy : r + dy + h, r + dx : r + dx + wd]
                k = (v - values).square_().sum(1, keepdim=True)
                k.mul_(-1 / (2 * EDGE_SIMILARITY**2)).sub_((dy * dy + dx * dx) / (2 * sigma_px**2)).exp_()
                k.mul_(pw[..., r + dy : r + dy + h, r + dx : r + dx + wd])
                num.addcmul_(k, v)
                den.add_(k)
        values = num.div_(den)
    return values


def dihedral_outputs(model: torch.nn.Module, counts: torch.Tensor) -> torch.Tensor:
    """Raw outputs (B, 5, H, W) of ``model`` averaged over the 8 rotations and reflections of the
    image (test-time augmentation): the outputs of each transformed image are mapped back, pixels
    and channels ((v1, v2) as a vector: a reflection of x negates v1, a transpose swaps v1 and v2;
    in the doubled-angle encoding these negate sin 2theta and cos 2theta), then averaged. The
    training data do not change under these transforms (circular PSF, directions drawn
    uniformly), so the mean is over 8 estimates of the same maps; it costs 8 forward passes."""
    encoding = getattr(model, "encoding", "doubled_angle")
    total = torch.zeros((), device=counts.device)
    for transpose in (False, True):
        image = counts.transpose(-1, -2) if transpose else counts
        for flips in ((), (-1,), (-2,), (-1, -2)):
            out = model(image.flip(flips) if flips else image).float()
            out = out.flip(flips) if flips else out
            if encoding == "paper":  # (v1, v2) of the transformed frame: reflect, then swap back
                sign = (-1.0 if -1 in flips else 1.0, -1.0 if -2 in flips else 1.0, 1.0, 1.0, 1.0)
                channels = [1, 0, 2, 3, 4] if transpose else [0, 1, 2, 3, 4]
            else:  # (rho cos 2theta, rho sin 2theta)
                sign, channels = (-1.0 if transpose else 1.0, (-1.0) ** len(flips), 1.0, 1.0, 1.0), [0, 1, 2, 3, 4]
            out = (out * torch.tensor(sign, device=out.device)[:, None, None])[:, channels]
            total = total + (out.transpose(-1, -2) if transpose else out)
    return total / 8


def raw_outputs(model: torch.nn.Module, counts: torch.Tensor, dihedral: bool = False) -> torch.Tensor:
    """Raw outputs (B, 5, H, W) float32: one forward pass, or :func:`dihedral_outputs`."""
    return dihedral_outputs(model, counts) if dihedral else model(counts).float()


def loss_fn(
    output: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, loss: str, encoding: str, gamma: float = 1.0,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:  # fmt: skip
    """Training loss (scalar).

    ``ours``: gamma * BCE(validity logit, w) + mean over pixels with w = 1 of the squared error of
    the 4 regression channels in ``encoding``, averaged with ``weights`` (one per channel).
    ``paper`` (Eq. 6, with w = 1 marking legitimate pixels as docs/design.md says): per pixel
    gamma (w - sigmoid(logit))^2 + w / (U + 1) [sum_u (|v_u| - |v~_u|)^2 + (z0 - z0~)^2] with
    U = 3, averaged over all pixels; the velocity channels are the network's (v1, v2, v3).
    """
    w = valid[:, 0]
    logit = output[:, 4]
    if loss == "paper":
        if encoding != "paper":
            raise ValueError("loss 'paper' needs encoding 'paper' (Eq. 6 is on the velocity components)")
        err = (output[:, :3].abs() - target[:, :3].abs()) ** 2
        reg = (err.sum(1) + (output[:, 3] - target[:, 3]) ** 2) / 4
        return (gamma * (w - torch.sigmoid(logit)) ** 2 + w * reg).mean()
    if loss != "ours":
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    w_c = torch.as_tensor(weights, dtype=output.dtype, device=output.device)[None, :, None, None]
    reg = (((output[:, :4] - encode(target, encoding)) ** 2) * w_c).sum(1) / w_c.sum()
    return gamma * F.binary_cross_entropy_with_logits(logit, w) + (w * reg).sum() / w.sum().clamp(min=1)


class FlowNet(torch.nn.Module):
    """U-Net (ResNet encoder) from camera counts (B, 1, H, W) to raw outputs (B, 5, H, W).

    ``depth`` encoder stages (3-5; each halves the resolution) and ``decoder_channels`` (one per
    stage, coarse to fine). ``stem_stride`` 1 runs the encoder's first convolution at full
    resolution instead of the ResNet's stride 2 (every later stage then works at twice the
    resolution: finer blur is seen, at about 4x the cost). ``unshuffle`` 2 rearranges every 2 x 2
    pixels into 4 channels (lossless) and runs the U-Net at half the resolution, at about 1/4 the
    cost (with ``stem_stride`` 1 the stages keep their usual resolutions); the output is
    interpolated back. Any H, W: the input is reflect-padded to a multiple of
    ``unshuffle * 2**depth`` and the output cropped back.
    """

    def __init__(
        self,
        encoder: str = "resnet18",
        encoding: str = "doubled_angle",
        depth: int = 5,
        decoder_channels: Sequence[int] = PAPER_DECODER,
        stem_stride: int = 2,
        unshuffle: int = 1,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {ENCODERS}")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
        check_architecture(depth, decoder_channels)
        self.encoder_name, self.encoding = encoder, encoding
        self.depth, self.decoder_channels = depth, [int(c) for c in decoder_channels]
        check_stem_stride(encoder, stem_stride)
        if unshuffle not in (1, 2):
            raise ValueError(f"input unshuffle (train.unshuffle) must be 1 or 2, got {unshuffle!r}")
        self.stem_stride, self.unshuffle = stem_stride, unshuffle
        self.unet = smp.Unet(
            encoder_name=encoder, encoder_weights=None, in_channels=unshuffle**2, classes=5, encoder_depth=depth, decoder_channels=self.decoder_channels
        )
        for stage in self.unused_stages():  # never run at this depth: not built, not stored (10.5M of ResNet-18's 11.2M at depth 3)
            delattr(self.unet.encoder, stage)
        if stem_stride == 1:
            self.unet.encoder.conv1.stride = (1, 1)

    def unused_stages(self) -> tuple[str, ...]:
        """The ResNet stages an encoder of this depth never runs (smp keeps them)."""
        return RESNET_STAGES[self.depth - 2 :] if self.encoder_name in RESNETS else ()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state dict, dropping the unused stages that files written before they were
        removed still hold; any other mismatch is an error (``RuntimeError``)."""
        unused = tuple(f"unet.encoder.{stage}." for stage in self.unused_stages())
        self.load_state_dict({k: v for k, v in state.items() if not k.startswith(unused) or not unused})

    def deeper_architecture(self) -> tuple[int, list[int]]:
        """Depth and decoder channels of this network deepened by one stage (:func:`deepen`): the new
        first decoder block has the channels of the present deepest stage."""
        return self.depth + 1, [self.unet.encoder.out_channels[-1], *self.decoder_channels]

    def unet_input(self, counts: torch.Tensor) -> torch.Tensor:
        """The U-Net's input: normalised counts, padded to a multiple of ``unshuffle * 2**depth`` and unshuffled."""
        h, w = counts.shape[-2:]
        multiple = self.unshuffle * 2**self.depth
        ph, pw = -h % multiple, -w % multiple
        x = normalise(counts)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        return x if self.unshuffle == 1 else F.pixel_unshuffle(x, self.unshuffle)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        h, w = counts.shape[-2:]
        out = self.unet(self.unet_input(counts))
        if self.unshuffle == 1:
            return out[..., :h, :w]
        return F.interpolate(out, scale_factor=self.unshuffle, mode="bilinear", align_corners=False)[..., :h, :w]

    def predict(self, counts: torch.Tensor) -> torch.Tensor:
        """Canonical (v1, v2, v3, z0, w) maps (B, 5, H, W), normalised units."""
        return decode(self(counts), self.encoding)

    def load_encoder_weights(self, path: str | Path) -> None:
        """ImageNet weights for the encoder from a local file (a torchvision/timm ResNet state dict).

        The 3-channel first convolution is summed over colour channels for the 1-channel input.
        A missing file or a state dict that does not match the encoder is a ``ValueError``.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"pretrained encoder weights {path} not found (train.pretrained_weights)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        if "conv1.weight" in state and state["conv1.weight"].shape[1] == 3:  # grey, shared by the unshuffled channels
            channels = self.unshuffle**2
            state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True).repeat(1, channels, 1, 1) / channels
        own = self.unet.encoder.state_dict()
        missing = sorted(set(own) - set(state))
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or shapes:
            raise ValueError(
                f"{path} does not match encoder {self.encoder_name}: "
                f"{len(missing)} missing tensors (e.g. {missing[:2]}), {len(shapes)} of other shapes (e.g. {shapes[:2]})"
            )
        self.unet.encoder.load_state_dict({k: state[k] for k in own})


def deepen(start: FlowNet, channels: int, counts: torch.Tensor) -> FlowNet:
    """``start`` grown by one encoder stage (random weights) and a first decoder block of
    ``channels`` (which must be the former deepest stage's channels) that passes the former deepest
    features through, so the grown network computes what ``start`` does: exactly in eval mode, and
    in training mode for the batch ``counts`` (camera counts, (B, 1, H, W)) and nearly for batches
    like it. Every other weight is ``start``'s; training then teaches the new stage."""
    depth, decoder = start.deeper_architecture()
    if channels != decoder[0]:
        raise ValueError(f"deepening {start.encoder_name} of depth {start.depth}: the new first decoder block needs {decoder[0]} channels, got {channels}")
    grown = FlowNet(start.encoder_name, start.encoding, depth, decoder, start.stem_stride, start.unshuffle)
    state = grown.state_dict()
    for key, value in start.state_dict().items():
        block = re.fullmatch(r"unet\.decoder\.blocks\.(\d+)\.(.+)", key)
        state[f"unet.decoder.blocks.{int(block[1]) + 1}.{block[2]}" if block else key] = value
    with torch.no_grad():
        features = copy.deepcopy(start).train().unet.encoder(start.unet_input(counts))[-1]  # as training sees them; start's statistics untouched
        mean, var = features.mean((0, 2, 3)), features.var((0, 2, 3), unbiased=False)
        deep = grown.unet.encoder.out_channels[-1]
        for name, offset in (("conv1", deep), ("conv2", 0)):  # conv1 sees (new stage, former deepest stage), in that order
            conv, bn = f"unet.decoder.blocks.0.{name}.0.weight", f"unet.decoder.blocks.0.{name}.1"
            state[conv] = torch.zeros_like(state[conv])
            state[conv][torch.arange(channels), offset + torch.arange(channels), 1, 1] = 1  # identity (features are >= 0: ReLU passes them)
            eps = getattr(grown.unet.decoder.blocks[0], name)[1].eps
            state[f"{bn}.running_mean"], state[f"{bn}.running_var"] = mean, var
            state[f"{bn}.weight"], state[f"{bn}.bias"] = torch.sqrt(var + eps), mean  # batch norm undone
    grown.load_state_dict(state)
    return grown
