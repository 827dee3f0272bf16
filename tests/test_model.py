"""Network, output encodings, losses, metrics, training and the model file."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from blurflow import data, sources, synthesis, train
from blurflow.evaluate import FlowMetrics
from blurflow.model import FlowNet, decode, deepen, encode, loss_fn, normalise
from blurflow.modelfile import load_model, save_model
from blurflow.optics import MotionScales, Optics, canonical_sign
from blurflow.schema import load
from blurflow.synthesis import Setup
from blurflow.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def canonical_labels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.cat([torch.rand(n, 2, generator=g) * 2 - 1, torch.rand(n, 2, generator=g)], 1)
    return canonical_sign(p)


def as_maps(labels: torch.Tensor) -> torch.Tensor:
    """(N, 4) -> (1, 4, 1, N)."""
    return labels.T[None, :, None, :]


@pytest.mark.parametrize("encoding", ["doubled_angle", "paper"])
def test_output_conversion_round_trips_canonical_labels(encoding):
    labels = torch.cat([canonical_labels(200), torch.tensor([[0.0, 0.0, 0.3, 0.1], [0.5, 0.0, 0.0, 0.0]])])
    target = as_maps(labels)
    logits = torch.full((1, 1, 1, labels.shape[0]), 3.0)
    out = decode(torch.cat([encode(target, encoding), logits], 1), encoding)
    assert torch.allclose(out[:, :4], target, atol=1e-5)
    assert torch.allclose(out[:, 4], torch.sigmoid(logits[:, 0]))


def test_doubled_angle_identifies_opposite_directions():
    v = torch.tensor([[0.3, -0.4, 0.5, 0.2]])
    flipped = torch.tensor([[-0.3, 0.4, 0.5, 0.2]])
    assert torch.allclose(encode(as_maps(v), "doubled_angle"), encode(as_maps(flipped), "doubled_angle"))
    rho_cos, rho_sin = encode(as_maps(v), "doubled_angle")[0, :2, 0, 0].tolist()
    assert rho_cos == pytest.approx((0.09 - 0.16) / 0.5) and rho_sin == pytest.approx(2 * 0.3 * -0.4 / 0.5)


def test_our_loss_on_a_hand_computed_example():
    target = torch.tensor([[0.6, 0.8, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0]]).T[None, :, None, :]  # 2 pixels
    valid = torch.tensor([[[[1.0, 0.0]]]])
    out = torch.zeros(1, 5, 1, 2)
    out[0, :4, 0, 0] = torch.tensor([-0.28, 0.96, 0.5, 0.2]) + torch.tensor([0.1, 0.0, -0.2, 0.0])
    # pixel 0 target encodes to rho (cos, sin) 2theta = ((0.36 - 0.64) / 1, 2 * 0.48 / 1) = (-0.28, 0.96)
    # squared errors 0.01, 0, 0.04, 0 -> mean 0.0125 on the one valid pixel; pixel 1 is invalid
    bce = math.log(2)  # logits 0: -log(sigmoid(0)) for w = 1 and -log(1 - sigmoid(0)) for w = 0
    assert float(loss_fn(out, target, valid, "ours", "doubled_angle", gamma=2.0)) == pytest.approx(2 * bce + 0.0125, rel=1e-5)


def test_paper_loss_on_a_hand_computed_example():
    target = torch.tensor([[-0.3, 0.6, 0.8, 0.1], [0.5, 0.5, 0.5, 0.5]]).T[None, :, None, :]
    valid = torch.tensor([[[[1.0, 0.0]]]])
    out = torch.zeros(1, 5, 1, 2)
    out[0, :4, 0, 0] = torch.tensor([0.3, 0.5, 0.8, 0.3])  # |v1| matches: Eq. 6 compares |v|
    out[0, 4] = torch.tensor([0.0, 0.0])
    # pixel 0: gamma (1 - 0.5)^2 + (0 + 0.01 + 0 + 0.04) / 4; pixel 1: gamma (0 - 0.5)^2, velocity ignored
    expected = ((0.25 + 0.05 / 4) + 0.25) / 2
    assert float(loss_fn(out, target, valid, "paper", "paper", gamma=1.0)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="encoding 'paper'"):
        loss_fn(out, target, valid, "paper", "doubled_angle")


def test_normalisation_standardises_and_stabilises_poisson_variance():
    counts = torch.poisson(torch.full((1, 1, 64, 64), 400.0, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    x = normalise(counts)
    assert abs(float(x.mean())) < 1e-6 and float(x.std()) == pytest.approx(1, rel=2e-3)  # std + 1e-3 in the denominator
    # Anscombe: Poisson noise becomes unit variance before standardisation
    a = 2 * torch.sqrt(counts + 0.375)
    assert float(a.var()) == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize(
    "encoder, depth, decoder, stem, unshuffle",
    [
        ("resnet18", 5, (256, 128, 64, 32, 16), 2, 1),
        ("resnet18", 4, (128, 64, 32, 16), 2, 1),
        ("resnet18", 3, (64, 32, 16), 1, 1),
        ("resnet18", 4, (128, 64, 32, 16), 2, 2),
        ("resnet18", 3, (64, 32, 16), 1, 2),
        ("efficientnet-b0", 3, (64, 32, 16), 2, 2),
        ("efficientnet-b0", 5, (256, 128, 64, 32, 16), 2, 1),
    ],
)
def test_flownet_keeps_any_image_size(encoder, depth, decoder, stem, unshuffle):
    model = FlowNet(encoder, depth=depth, decoder_channels=decoder, stem_stride=stem, unshuffle=unshuffle).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 50, 70) * 100).shape == (2, 5, 50, 70)
        assert model.predict(torch.rand(1, 1, 64, 64) * 100).shape == (1, 5, 64, 64)


def test_unshuffled_input_keeps_every_pixel():
    model = FlowNet("resnet18", depth=3, decoder_channels=(64, 32, 16), unshuffle=2).eval()
    x = torch.rand(1, 1, 64, 64) * 100
    y = x.clone()
    y[0, 0, 1, 1] += 50  # one pixel of a 2 x 2 block changes one input channel, so the output
    with torch.no_grad():
        assert not torch.equal(model(x), model(y))
    assert model.unet.encoder.conv1.in_channels == 4


def test_bad_model_choices_raise():
    with pytest.raises(ValueError, match="encoder"):
        FlowNet("vgg16")
    with pytest.raises(ValueError, match="one decoder channel count per stage"):
        FlowNet("resnet18", depth=4, decoder_channels=(256, 128, 64, 32, 16))
    with pytest.raises(ValueError, match="one decoder channel count per stage"):
        train.TrainConfig.from_config({"encoder_depth": 3, "decoder_channels": [128, 64, 32, 16]})
    with pytest.raises(ValueError, match="train.encoder"):
        train.TrainConfig.from_config({"encoder": "vgg16"})
    with pytest.raises(ValueError, match="train.stem_stride 1 needs a ResNet encoder"):
        FlowNet("efficientnet-b0", depth=3, decoder_channels=(64, 32, 16), stem_stride=1)
    with pytest.raises(ValueError, match="train.stem_stride 1 needs a ResNet encoder"):
        train.TrainConfig.from_config({"encoder": "efficientnet-b0", "stem_stride": 1})
    with pytest.raises(ValueError, match="needs train.encoding 'paper'"):
        train.TrainConfig.from_config({"loss": "paper"})


def test_pearson_r2_matches_numpy_over_batches():
    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.random((3, 4, 8, 8)))
    pred = target + torch.from_numpy(rng.normal(0, 0.2, (3, 4, 8, 8)))
    valid = torch.from_numpy((rng.random((3, 1, 8, 8)) > 0.3).astype(np.float64))
    acc = FlowMetrics()
    for i in range(3):
        acc.update(pred[i : i + 1], target[i : i + 1], valid[i : i + 1])
    r2 = acc.r2()
    m = valid[:, 0].numpy() > 0.5
    for k, comp in enumerate(("v1", "v2", "v3", "z0")):
        x, y = pred[:, k].numpy()[m], target[:, k].numpy()[m]
        if k < 2:  # lateral components are compared as |v1|, |v2|
            x, y = np.abs(x), np.abs(y)
        assert r2[comp] == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2, rel=1e-9)
    assert r2["mean"] == pytest.approx(np.mean([r2[c] for c in ("v1", "v2", "v3", "z0")]))


def test_the_r2_interval_covers_the_spread_of_new_test_sets():
    """Images whose prediction quality varies from image to image (each its own noise level): the
    bootstrap's 95 % interval over 64 images holds the R² of 64 images, about as wide as the R² of
    independent sets of 64 spread (+-1.96 std within a factor 1.5), narrower for 256 images (about
    half), and the same for the same seed."""
    rng = np.random.default_rng(0)

    def images(n: int) -> FlowMetrics:
        acc = FlowMetrics()
        target = torch.from_numpy(rng.random((n, 4, 8, 8)))
        noise = torch.from_numpy(rng.uniform(0.05, 0.6, (n, 1, 1, 1)) * rng.normal(0, 1, (n, 4, 8, 8)))
        acc.update(target + noise, target, torch.ones(n, 1, 8, 8))
        return acc

    spread = np.std([images(64).r2()["mean"] for _ in range(200)])
    acc = images(64)
    lo, hi = acc.r2_interval()["mean"]
    assert lo < acc.r2()["mean"] < hi and 1 / 1.5 < (hi - lo) / (2 * 1.96 * spread) < 1.5, (hi - lo, spread)
    assert acc.r2_interval() == acc.r2_interval()
    lo4, hi4 = images(256).r2_interval()["mean"]
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.7


# --- pretrained encoder weights from a local file ----------------------------------------------


def test_encoder_weights_load_from_a_local_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    model = FlowNet("resnet18")
    model.load_encoder_weights(path)
    expected = torch.load(path)["conv1.weight"].sum(1, keepdim=True)
    assert torch.equal(model.unet.encoder.conv1.weight, expected)
    unshuffled = FlowNet("resnet18", unshuffle=2)
    unshuffled.load_encoder_weights(path)  # the grey filter, shared by the 4 channels of a 2 x 2 block
    assert torch.allclose(unshuffled.unet.encoder.conv1.weight, expected.repeat(1, 4, 1, 1) / 4)


def test_missing_or_mismatched_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        FlowNet("resnet18").load_encoder_weights(tmp_path / "nope.pth")
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not match encoder resnet18"):
        FlowNet("resnet18").load_encoder_weights(path)


# --- training ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    src = d / "src.h5"
    sources.write_sources(sources.phantom_images(2, 64, seed=0), src, 64, "phantom")
    cfg = synthesis.SynthesisConfig(image_px=32, regions=(1, 2))
    paths = []
    for split, shard in (("train", 0), ("val", 0)):
        p = d / f"{split}.h5"
        synthesis.write_shard(p, src, Setup(Optics(), MotionScales(8, 10), 16, cfg, seed=0), split=split, shard=shard, samples=16, progress=False)
        paths.append(p)
    return paths


def run(tmp, shards, stop=None, **kw):
    cfg = train.TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-3, "schedule": "constant", **kw})
    batches = data.ShardData([shards[0]], [shards[1]], cfg.batch_size, cfg.seed)
    return train.train(batches, tmp / "model.pt", tmp / "log.csv", tmp / "ck.pt", cfg, {"scales": {"a": 1}}, stop_after_epochs=stop, progress=False)


def test_tiny_training_lowers_the_loss(tiny_shards, tmp_path):
    torch.set_num_threads(2)
    rows = run(tmp_path, tiny_shards, epochs=8)
    assert rows[-1]["train_loss"] < 0.85 * rows[0]["train_loss"]
    text = (tmp_path / "log.csv").read_text().splitlines()
    assert text[0].startswith("epoch,samples,train_loss,val_loss,val_r2_v1") and len(text) == 9
    assert [r["samples"] for r in rows] == [16 * (e + 1) for e in range(8)]


def test_interrupted_training_resumes_to_the_same_model(tiny_shards, tmp_path):
    straight, interrupted = tmp_path / "a", tmp_path / "b"
    straight.mkdir(), interrupted.mkdir()
    run(straight, tiny_shards)
    first = run(interrupted, tiny_shards, stop=1)
    assert len(first) == 1 and not (interrupted / "model.pt").exists() and (interrupted / "ck.pt").exists()
    rows = run(interrupted, tiny_shards)
    assert [r["epoch"] for r in rows] == [1, 2]
    a, _ = load_model(straight / "model.pt")
    b, meta = load_model(interrupted / "model.pt")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert meta["epochs_trained"] == 2 and meta["scales"] == {"a": 1} and meta["encoder"] == "resnet18"


def test_model_file_loads_back_to_identical_outputs(tmp_path):
    model = FlowNet("resnet18", "paper", depth=3, decoder_channels=(64, 32, 16), stem_stride=1, unshuffle=2).eval()
    save_model(model, tmp_path / "m.pt", {"optics": Optics().to_dict(), "config_hash": "abc"})
    loaded, meta = load_model(tmp_path / "m.pt")
    x = torch.rand(2, 1, 64, 64) * 500
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    effnet = FlowNet("efficientnet-b0", depth=3, decoder_channels=(64, 32, 16), unshuffle=2).eval()
    save_model(effnet, tmp_path / "e.pt", {})
    loaded_effnet, meta_effnet = load_model(tmp_path / "e.pt")
    with torch.no_grad():
        assert torch.equal(effnet(x), loaded_effnet(x))
    assert meta_effnet["encoder"] == "efficientnet-b0"
    assert meta["encoding"] == "paper" and meta["optics"]["na"] == 0.3 and "blurflow_version" in meta
    assert (loaded.depth, loaded.decoder_channels, loaded.stem_stride, loaded.unshuffle) == (3, [64, 32, 16], 1, 2)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not found"):
        load_model(tmp_path / "none.pt")


def test_online_training_resumes_to_the_same_model(tmp_path):
    src = tmp_path / "src.h5"
    sources.write_sources(sources.phantom_images(2, 64, seed=0), src, 64, "phantom")
    cfg = train.TrainConfig(epochs=2, batch_size=4, lr=3e-3, data="online")

    def fit(folder, stop=None):
        batches = data.OnlineData(src, src, Setup(Optics(), MotionScales(8, 10), 16, synthesis.SynthesisConfig(image_px=32), seed=0), 4, 8, val_samples=(1, 4))
        return train.train(batches, folder / "m.pt", folder / "log.csv", folder / "ck.pt", cfg, {}, stop_after_epochs=stop, progress=False)

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    fit(tmp_path / "a")
    fit(tmp_path / "b", stop=1)
    rows = fit(tmp_path / "b")
    assert [r["samples"] for r in rows] == [8, 16]
    a, _ = load_model(tmp_path / "a/m.pt")
    b, _ = load_model(tmp_path / "b/m.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_max_minutes_cuts_training_and_says_so(tiny_shards, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        rows = run(tmp_path, tiny_shards, epochs=50, max_minutes=1e-4)
    assert len(rows) == 1 and rows[0]["samples"] < 16  # stopped within the first epoch
    _, meta = load_model(tmp_path / "model.pt")
    assert "train.max_minutes (0.0001) reached" in meta["stopped_early"] and meta["train"]["max_minutes"] == 1e-4
    assert "training stopped early: train.max_minutes" in caplog.text
    assert run(tmp_path, tiny_shards, epochs=50, max_minutes=1e-4) == rows  # a rerun finds it finished
    with pytest.raises(ValueError, match="train.max_minutes"):
        train.TrainConfig.from_config({"max_minutes": 0})


def test_without_max_minutes_the_model_file_is_reproducible_to_the_byte(tiny_shards, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run(tmp_path / name, tiny_shards, epochs=1)
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()  # timings live in the log only
    _, meta = load_model(tmp_path / "a/model.pt")
    assert meta["stopped_early"] is None and meta["samples_trained"] == 16
    assert "minutes" not in meta["final"] and "val_r2_mean" in meta["final"]


def test_a_finished_run_started_again_writes_its_model_and_log(tiny_shards, tmp_path):
    """As snakemake does when a finished rule is forced to run again: outputs deleted, checkpoint kept."""
    run(tmp_path, tiny_shards)
    model, log_text = (tmp_path / "model.pt").read_bytes(), (tmp_path / "log.csv").read_text()
    (tmp_path / "model.pt").unlink(), (tmp_path / "log.csv").unlink()
    rows = run(tmp_path, tiny_shards)
    assert len(rows) == 2 and (tmp_path / "model.pt").read_bytes() == model and (tmp_path / "log.csv").read_text() == log_text


def test_a_checkpoint_of_other_data_is_not_resumed(tiny_shards, tmp_path, caplog):
    cfg = train.TrainConfig(epochs=1, batch_size=8, schedule="constant")
    batches = data.ShardData([tiny_shards[0]], [tiny_shards[1]], 8, 0)
    for key in ("optics A", "optics B"):
        with caplog.at_level("WARNING"):
            rows = train.train(batches, tmp_path / "m.pt", tmp_path / "log.csv", tmp_path / "ck.pt", cfg, {"data_key": key}, progress=False)
        assert len(rows) == 1
    assert "is from another configuration; starting over" in caplog.text


def test_training_starts_from_a_model_file_of_the_same_architecture(tiny_shards, tmp_path):
    for name in ("start", "scratch", "tuned"):
        (tmp_path / name).mkdir()
    run(tmp_path / "start", tiny_shards, epochs=8)
    start = tmp_path / "start/model.pt"
    batches = data.ShardData([tiny_shards[0]], [tiny_shards[1]], 8, 0)
    first, _, before = train._build(train.TrainConfig(init_model=str(start)), torch.device("cpu"), batches)
    assert before == 8 * 16
    trained, _ = load_model(start)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), trained.state_dict().values()))
    scratch = run(tmp_path / "scratch", tiny_shards, epochs=1)
    tuned = run(tmp_path / "tuned", tiny_shards, epochs=1, init_model=str(start))
    assert tuned[0]["train_loss"] < 0.9 * scratch[0]["train_loss"]  # it goes on from where the 8 epochs ended
    _, meta = load_model(tmp_path / "tuned/model.pt")
    before = load_model(start)[1]
    assert meta["train"]["init_model"] == str(start) and meta["samples_trained"] == 16
    assert before["samples_trained_total"] == before["samples_trained"] == 8 * 16
    assert meta["samples_trained_total"] == 9 * 16  # the starting model's images count too

    with pytest.raises(ValueError, match=r"train.init_model: .* has another architecture than the config: encoding 'doubled_angle' \(config: 'paper'\)"):
        train._build(train.TrainConfig(init_model=str(start), encoding="paper"), torch.device("cpu"), batches)
    with pytest.raises(ValueError, match="not found"):
        train._build(train.TrainConfig(init_model=str(tmp_path / "none.pt")), torch.device("cpu"), batches)

    # one encoder stage deeper: the file's network grown (model.deepen), computing what it computed
    deeper, _, _ = train._build(train.TrainConfig(init_model=str(start), encoder_depth=4, decoder_channels=(128, 64, 32, 16)), torch.device("cpu"), batches)
    counts = next(iter(batches.validation()))["image"].float()
    with torch.no_grad():
        assert deeper.depth == 4 and torch.allclose(deeper.eval()(counts), trained.eval()(counts), atol=1e-4)
    with pytest.raises(
        ValueError, match=r"another architecture .* \(a model one stage shallower is deepened: encoder_depth 4, decoder_channels \[128, 64, 32, 16\]\)"
    ):
        train._build(train.TrainConfig(init_model=str(start), encoder_depth=4, decoder_channels=(64, 64, 32, 16)), torch.device("cpu"), batches)
    with pytest.raises(ValueError, match="pretrained_weights and train.init_model both set"):
        train.TrainConfig.from_config({"init_model": str(start), "pretrained_weights": "w.pth"})


def test_a_checkpoint_is_resumed_only_from_the_same_starting_weights(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights a")
    key = train.TrainConfig(init_model=str(a)).resume_key()
    assert train.TrainConfig(init_model=str(b)).resume_key() == key  # the contents count, not the path
    b.write_bytes(b"weights b")
    assert train.TrainConfig(init_model=str(b)).resume_key() != key
    assert train.TrainConfig().resume_key() != key


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_learning_rate_schedules(schedule):
    cfg = train.TrainConfig(schedule=schedule, warmup_fraction=0.2)
    f = [train.lr_factor(p, cfg) for p in (0.0, 0.2, 0.6, 1.0)]
    if schedule == "onecycle":  # as torch's OneCycleLR: 1/25 -> 1 at the end of warm-up -> 1/25e4
        assert f[0] == pytest.approx(1 / 25) and f[1] == pytest.approx(1) and f[3] == pytest.approx(1 / 25e4)
        assert f[2] == pytest.approx((1 + 1 / 25e4) / 2, rel=1e-3)
    elif schedule == "cosine":
        assert f == pytest.approx([1, (1 + math.cos(0.2 * math.pi)) / 2, (1 + math.cos(0.6 * math.pi)) / 2, 0])
    else:
        assert f == [1, 1, 1, 1]


@pytest.fixture()
def weights_server(serve, tmp_path):
    """ResNet-18 weights (a torchvision state dict) served on 127.0.0.1 under any name."""
    buffer = tmp_path / "served.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), buffer)
    url, _ = serve(buffer.read_bytes())
    return url + "models/", buffer.read_bytes()


def test_imagenet_weights_download_is_verified_and_loads(weights_server, tmp_path, monkeypatch):
    import hashlib

    from blurflow import modelfile

    url, payload = weights_server
    good = hashlib.sha256(payload).hexdigest()[:8]
    monkeypatch.setitem(modelfile.IMAGENET_WEIGHTS, "resnet18", f"resnet18-{good}.pth")
    dest = tmp_path / "resources/weights/resnet18-imagenet.pth"
    assert modelfile.fetch_encoder_weights("resnet18", dest, url) == dest
    assert dest.read_bytes() == payload and [p.name for p in dest.parent.iterdir()] == [dest.name]
    FlowNet("resnet18").load_encoder_weights(dest)  # a torchvision state dict the encoder takes
    bad = tmp_path / "bad/resnet18-imagenet.pth"
    monkeypatch.setitem(modelfile.IMAGENET_WEIGHTS, "resnet18", "resnet18-00000000.pth")
    with pytest.raises(ValueError, match="does not start with 00000000"):
        modelfile.fetch_encoder_weights("resnet18", bad, url)
    assert list(bad.parent.iterdir()) == []  # nothing half-written, no temporary folder


def test_imagenet_weight_urls_are_torchvisions():
    from blurflow.modelfile import IMAGENET_WEIGHTS, TORCHVISION_URL

    models = torchvision.models
    for encoder, weights in (("resnet18", models.ResNet18_Weights), ("resnet34", models.ResNet34_Weights), ("resnet50", models.ResNet50_Weights)):
        assert TORCHVISION_URL + IMAGENET_WEIGHTS[encoder] == weights.IMAGENET1K_V1.url


def test_output_smoothing_averages_valid_pixels_and_keeps_constants():
    from blurflow.model import smooth_outputs

    out = torch.zeros(1, 5, 32, 32)
    out[:, :4, :, :16], out[:, :4, :, 16:] = 1.0, 5.0
    out[:, 4, :, :16], out[:, 4, :, 16:] = 20.0, -20.0  # left half valid, right half not
    assert torch.equal(smooth_outputs(out, 0), out)
    smoothed = smooth_outputs(out, 4.0)
    assert torch.allclose(smoothed[:, :4, :, :16], torch.ones(1, 4, 32, 16), atol=1e-3)  # invalid pixels do not leak in
    assert torch.allclose(smoothed[:, :4, :, 16:20], torch.ones(1, 4, 32, 4), atol=1e-2)  # they take their valid neighbours'
    assert torch.allclose(smoothed[:, :4, :, 29:], torch.full((1, 4, 32, 3), 5.0))  # none within reach (3 sigma)
    assert torch.equal(smoothed[:, 4], out[:, 4])
    noisy = torch.randn(1, 5, 64, 64, generator=torch.Generator().manual_seed(0))
    assert smooth_outputs(noisy, 4.0)[:, :4].std() < 0.3 * noisy[:, :4].std()


def test_edge_preserving_smoothing_keeps_a_step_that_the_gaussian_blurs():
    """Two regions of different outputs plus noise: the edge-preserving smoothing removes the noise
    as the Gaussian does, but leaves the step sharp; constants stay, invalid pixels do not leak in."""
    from blurflow.model import smooth_outputs, smoothing_reach

    step = torch.zeros(1, 5, 64, 64)
    step[:, :4, :, 32:] = 1.0
    step[:, 4] = 20.0
    noisy = step.clone()
    noisy[:, :4] += 0.05 * torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    edges, gauss = smooth_outputs(noisy, 6.0, edges=True), smooth_outputs(noisy, 6.0)
    err_edges, err_gauss, err_raw = ((x[:, :4] - step[:, :4]).abs() for x in (edges, gauss, noisy))
    assert err_edges[..., 30:34].max() < 0.2 and err_gauss[..., 30:34].max() > 0.4  # at the step
    assert err_edges[..., :24].std() < 0.3 * err_raw[..., :24].std()  # within a region: as smooth
    assert torch.equal(edges[:, 4], noisy[:, 4])
    assert torch.equal(smooth_outputs(noisy, 0, edges=True), noisy)
    assert torch.allclose(smooth_outputs(torch.full((1, 5, 16, 16), 0.3), 4.0, edges=True), torch.full((1, 5, 16, 16), 0.3))
    half = step.clone()
    half[:, 4, :, 32:] = -20.0  # the right half invalid: the left keeps its value
    assert torch.allclose(smooth_outputs(half, 6.0, edges=True)[:, :4, :, :32], torch.zeros(1, 4, 64, 32), atol=1e-3)
    assert smoothing_reach(6.0, edges=True) == 3 * 12 and smoothing_reach(6.0) == 18 and smoothing_reach(0, edges=True) == 0


def test_training_chooses_the_readout_on_validation(tiny_shards, tmp_path):
    run(tmp_path, tiny_shards, epochs=1)
    _, meta = load_model(tmp_path / "model.pt")
    plain, dihedral = meta["val_r2_by_smoothing_px"], meta["val_r2_by_smoothing_px_dihedral"]
    assert set(dihedral) == {train.smoothing_label(s, e) for s, e in train.SMOOTHINGS} and len(dihedral) == 9
    assert set(plain) == {train.smoothing_label(s, False) for s in train.SMOOTHING_PX} and len(plain) == 6
    assert (meta["output_smoothing_px"], meta["output_smoothing_edges"]) in train.SMOOTHINGS
    assert plain["0"]["mean"] == meta["final"]["val_r2_mean"]  # the per-epoch score is the plain one
    assert plain["0"] != dihedral["0"]
    best = max([*plain.values(), *dihedral.values()], key=lambda r: r["mean"])
    chosen = (dihedral if meta["dihedral_mean"] else plain)[train.smoothing_label(meta["output_smoothing_px"], meta["output_smoothing_edges"])]
    assert chosen["mean"] == best["mean"]


def test_choose_readout_restores_what_training_chose(tiny_shards, tmp_path):
    """tools/choose_readout.py on a model file whose readout was wiped: the same choice and scores
    as training's, the same weights."""
    import pathlib
    import subprocess
    import sys

    run(tmp_path, tiny_shards, epochs=1)
    trained, meta = load_model(tmp_path / "model.pt")
    keys = ("output_smoothing_px", "output_smoothing_edges", "dihedral_mean", "val_r2_by_smoothing_px", "val_r2_by_smoothing_px_dihedral")
    save_model(trained, tmp_path / "wiped.pt", {k: v for k, v in meta.items() if k not in keys})
    (tmp_path / "c.yaml").write_text("train:\n  data: shards\n  batch_size: 8\n")
    tool = pathlib.Path(__file__).parents[1] / "tools" / "choose_readout.py"
    args = ["--config", tmp_path / "c.yaml", "--train", tiny_shards[0], "--val", tiny_shards[1], "--threads", "1"]
    subprocess.run([sys.executable, tool, tmp_path / "wiped.pt", *args], check=True, capture_output=True)
    chosen, again = load_model(tmp_path / "wiped.pt")
    for k in keys[3:]:  # the same scores up to float rounding (thread count)
        assert {label: pytest.approx(r["mean"], rel=1e-4) for label, r in meta[k].items()} == {label: r["mean"] for label, r in again[k].items()}
    table = again[keys[4] if again["dihedral_mean"] else keys[3]]
    best = max(r["mean"] for k in keys[3:] for r in meta[k].values())
    assert table[train.smoothing_label(again["output_smoothing_px"], again["output_smoothing_edges"])]["mean"] == pytest.approx(best, rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("encoding", ["doubled_angle", "paper"])
def test_the_dihedral_mean_turns_with_the_image(encoding):
    """Rotating or reflecting the image rotates or reflects the averaged flow maps: v1 and v2 move
    with the pixels as a vector (up to the canonical sign), v3, z0 and w as scalars."""
    from blurflow.model import dihedral_outputs

    torch.manual_seed(0)
    model = FlowNet("resnet18", encoding, depth=3, decoder_channels=(32, 16, 8)).eval()
    counts = torch.poisson(torch.rand(1, 1, 32, 48) * 50)  # not square: a transpose changes the shape

    def maps(image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return decode(dihedral_outputs(model, image), encoding)

    base = maps(counts)
    plain = decode(model(counts).detach(), encoding)
    assert not torch.allclose(
        decode(model(counts.flip(-1)).detach(), encoding)[:, :4].flip(-1).abs(), plain[:, :4].abs(), atol=1e-3
    )  # one pass is not symmetric
    for transform, vector in (
        (lambda x: x.flip(-1), lambda v: v * torch.tensor([-1.0, 1.0])[:, None, None]),  # x reflected: v1 -> -v1
        (lambda x: x.flip(-2), lambda v: v * torch.tensor([1.0, -1.0])[:, None, None]),  # y reflected: v2 -> -v2
        (lambda x: x.transpose(-1, -2), lambda v: v[:, [1, 0]]),  # transposed: v1 <-> v2
        (lambda x: x.transpose(-1, -2).flip(-1), lambda v: v[:, [1, 0]] * torch.tensor([-1.0, 1.0])[:, None, None]),  # turned by 90 degrees
    ):
        turned = maps(transform(counts))
        expected = transform(base).clone()
        expected[:, :2] = vector(expected[:, :2])
        expected = canonical_sign(expected[:, :4].movedim(1, -1)).movedim(-1, 1)
        assert turned.shape[-2:] == transform(counts).shape[-2:]
        assert torch.allclose(turned[:, :4], expected, atol=1e-4)
        assert torch.allclose(turned[:, 4], transform(base)[:, 4], atol=1e-5)


def test_the_model_stores_only_the_stages_it_runs_and_old_files_still_load(tmp_path):
    import segmentation_models_pytorch as smp

    model = FlowNet("resnet18", depth=3, decoder_channels=(64, 32, 16), unshuffle=2).eval()
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # ResNet-18 keeps 11.2M, 10.5M of them in layer3/layer4
    assert not any(k.startswith(("unet.encoder.layer3", "unet.encoder.layer4")) for k in model.state_dict())
    save_model(model, tmp_path / "new.pt", {})
    assert (tmp_path / "new.pt").stat().st_size < 5_000_000
    # a file written before: smp's whole encoder, layer3 and layer4 included
    full = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=4, classes=5, encoder_depth=3, decoder_channels=[64, 32, 16])
    blob = torch.load(tmp_path / "new.pt", weights_only=True)
    torch.save({**blob, "state_dict": {"unet." + k: v for k, v in full.state_dict().items()}}, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    x = torch.rand(2, 1, 64, 64) * 500
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(
            full.eval()(torch.nn.functional.pixel_unshuffle(normalise(x), 2)), scale_factor=2, mode="bilinear", align_corners=False
        )
        assert torch.equal(old(x), expected)
    damaged = {k: v for k, v in blob["state_dict"].items() if "decoder" not in k}
    torch.save({**blob, "state_dict": damaged}, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match="damaged blurflow model file"):
        load_model(tmp_path / "damaged.pt")


def test_a_deepened_network_computes_what_it_grew_from_and_its_new_stage_learns():
    torch.manual_seed(1)
    start = FlowNet("resnet18", depth=3, decoder_channels=(64, 32, 16), unshuffle=2)
    counts = torch.rand(6, 1, 64, 64) * 500
    with torch.no_grad():
        start.train()(counts)  # batch-norm statistics of its own, away from the defaults
        grown = deepen(start, 128, counts)
        assert grown.depth == 4 and grown.decoder_channels == [128, 64, 32, 16]
        other = torch.rand(6, 1, 64, 64) * 2000
        assert (start.eval()(other) - grown.eval()(other)).abs().max() < 1e-4  # eval mode, any input
        assert (start.train()(counts) - grown.train()(counts)).abs().max() < 1e-4  # training mode, on the batch it was grown with
        start.eval()
        assert start.training is False and any(k.startswith("unet.encoder.layer3") for k in grown.state_dict())
    loss = grown.train()(counts).square().mean()
    loss.backward()
    assert grown.unet.decoder.blocks[0].conv1[0].weight.grad[:, :256].abs().sum() > 0  # the new stage's path is not cut off
    with pytest.raises(ValueError, match="needs 128 channels, got 64"):
        deepen(start, 64, counts)


def test_the_paper_preset_builds_the_papers_network():
    """workflow/presets/paper.yaml over config.yaml: the ResNet-34 U-Net of depth 5 on the full
    image, the paper's encoding, Eq. 6 with gamma 1; 35.5 GFLOP per 224 px image forward and
    backward (FlopCounterMode; the default run's 2 x 2 unshuffle would make it about a third)."""
    config = load([ROOT / "config.yaml", ROOT / "workflow/presets/paper.yaml"])
    cfg = TrainConfig.from_config(config["train"], seed=config["seed"])
    assert (cfg.encoder, cfg.encoder_depth, cfg.decoder_channels, cfg.stem_stride, cfg.unshuffle) == ("resnet34", 5, (256, 128, 64, 32, 16), 2, 1)
    assert (cfg.encoding, cfg.loss, cfg.gamma, cfg.data, cfg.epochs) == ("paper", "paper", 1.0, "shards", 50)
    model = cfg.build_model()
    assert model.unet.encoder.conv1.in_channels == 1 and model.unet.encoder.conv1.stride == (2, 2)
    image = torch.rand(1, 1, 224, 224) * 100
    with FlopCounterMode(display=False) as flops:
        out = model(image)
        loss_fn(out, torch.rand(1, 4, 224, 224), torch.ones(1, 1, 224, 224), cfg.loss, cfg.encoding, cfg.gamma).backward()
    assert out.shape == (1, 5, 224, 224)
    assert flops.get_total_flops() / 1e9 == pytest.approx(35.5, rel=0.03)
