"""Synthesis of blurred noisy images with labels: shard format, determinism, physics, statistics."""

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from blurflow import camera, data, sources, synthesis, testsets
from blurflow.camera import CameraNoise
from blurflow.data import ShardDataset
from blurflow.optics import MotionScales, Optics
from blurflow.synthesis import Setup

OPTICS, SCALES = Optics(), MotionScales(8, 10)
CFG = synthesis.SynthesisConfig(image_px=64, regions=(1, 3))
SETUP = Setup(OPTICS, SCALES, 32, CFG, seed=3)  # 32 px kernels


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "train.h5"
    sources.write_sources(sources.phantom_images(3, 128, seed=0), path, 128, "phantom")
    return path


@pytest.fixture(scope="module")
def shard(source_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "shard-0000.h5"
    synthesis.write_shard(path, source_file, SETUP, split="train", shard=0, samples=12, progress=False)
    return path


def flat_sources(path, value: float, size: int = 128):
    with h5py.File(path, "w") as f:
        f["images"] = np.full((1, size, size), round(value * 65535), np.uint16)
        f["source"] = np.zeros(1, np.int32)
    return path


def test_shard_schema_and_dtypes(shard):
    with h5py.File(shard) as f:
        assert f["image"].dtype == np.uint16 and f["image"].shape == (12, 64, 64)
        assert f["region"].dtype == np.uint8 and f["valid"].dtype == np.uint8
        assert f["params"].dtype == np.float32 and f["params"].shape == (12, 3, 4)
        for name in ("image", "region", "valid"):
            assert f[name].chunks == (1, 64, 64) and f[name].compression is not None
        attrs = dict(f.attrs)
    for key in ("optics", "scales", "synthesis", "seed", "shard", "blurflow_version", "config_hash"):
        assert key in attrs
    assert json.loads(attrs["optics"])["na"] == OPTICS.na
    assert json.loads(attrs["scales"])["axial_scale_um"] == SCALES.axial_scale_um
    assert attrs["seed"] == 3 and attrs["shard"] == 0


def assert_labels_consistent_and_canonical(shard) -> np.ndarray:
    """Every region of every sample has a label (the unused label slots are NaN), each label is
    canonical (v2 > 0, or v2 = 0 and v1 >= 0) and in range; returns the region maps."""
    with h5py.File(shard) as f:
        region, params = f["region"][()], f["params"][()]
    for r, p in zip(region, params):
        used = np.isfinite(p).all(1)
        assert used[: used.sum()].all()  # regions 0..n-1 have labels, the rest are NaN
        assert np.isin(np.unique(r), np.flatnonzero(used)).all()
        p = p[used]
        assert np.all((p[:, 1] > 0) | ((p[:, 1] == 0) & (p[:, 0] >= 0)))
        assert np.all(np.abs(p[:, :2]) <= 1) and np.all((p[:, 2:] >= 0) & (p[:, 2:] <= 1))
    return region


def test_labels_are_consistent_with_regions_and_canonical(shard):
    region = assert_labels_consistent_and_canonical(shard)
    assert len({int(r.max()) for r in region}) > 1  # region counts vary between samples


def test_same_seed_gives_the_same_bytes(source_file, shard, tmp_path):
    again = tmp_path / "again.h5"
    synthesis.write_shard(again, source_file, SETUP, split="train", shard=0, samples=12, progress=False)
    assert again.read_bytes() == shard.read_bytes()
    other = tmp_path / "other.h5"
    synthesis.write_shard(other, source_file, SETUP, split="train", shard=1, samples=12, progress=False)
    with h5py.File(other) as a, h5py.File(shard) as b:
        assert not np.array_equal(a["image"][()], b["image"][()])


def cells(size: int, counts: list[int], seed: int) -> torch.Tensor:
    """(len(counts), size, size) warped Voronoi labels with counts[i] cells, from random coefficients."""
    g = torch.Generator().manual_seed(seed)
    b, r = len(counts), max(counts)
    shape = (b, 2, 2 * synthesis.FIELD_RANK, synthesis.FIELD_MODES)
    return synthesis.voronoi(
        torch.rand(b, r, 2, generator=g) * size, torch.tensor(counts), torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 6.3, size
    )


def test_blur_matches_direct_convolution_per_region():
    rng = np.random.default_rng(0)
    canvas = rng.random((1, 40, 40)).astype(np.float32)
    regions = cells(40, [2], seed=0)
    kernels = torch.from_numpy(rng.random((1, 2, 8, 8)).astype(np.float32))
    out = synthesis.blur(torch.from_numpy(canvas), regions, kernels)[0].numpy()
    expected = np.zeros((40, 40))
    for n in range(2):  # out(y, x) = sum_ij k_n[i, j] * (m_n o)(y - (i - 4), x - (j - 4)), periodic
        masked = canvas[0] * (regions[0] == n).numpy()
        for i in range(8):
            for j in range(8):
                expected += kernels[0, n, i, j].item() * np.roll(masked, (i - 4, j - 4), axis=(0, 1))
    assert len(np.unique(regions)) == 2
    assert np.abs(out - expected).max() < 1e-4 * expected.max()


def test_blur_conserves_total_flux():
    canvas = torch.from_numpy(np.random.default_rng(1).random((2, 48, 48)).astype(np.float32))
    kernels = torch.from_numpy(np.random.default_rng(2).random((2, 3, 16, 16)).astype(np.float32))
    kernels /= kernels.sum((-2, -1), keepdim=True)
    out = synthesis.blur(canvas, cells(48, [3, 3], seed=1), kernels)
    assert torch.allclose(out.double().sum((1, 2)), canvas.double().sum((1, 2)), rtol=1e-5)


def test_an_image_blurs_the_same_alone_and_beside_images_of_more_regions():
    """Images of 1, 4 and 2 regions in one batch of 4 kernel slots each (the unused ones zero):
    each as it is alone with only its own regions' kernels."""
    counts = [1, 4, 2]
    canvas = torch.from_numpy(np.random.default_rng(2).random((3, 48, 48)).astype(np.float32))
    regions = cells(48, counts, seed=2)
    kernels = torch.from_numpy(np.random.default_rng(3).random((3, 4, 16, 16)).astype(np.float32))
    for i, n in enumerate(counts):
        kernels[i, n:] = 0
    out = synthesis.blur(canvas, regions, kernels)
    for i, n in enumerate(counts):
        alone = synthesis.blur(canvas[i : i + 1], regions[i : i + 1], kernels[i : i + 1, :n])
        assert torch.allclose(out[i], alone[0], rtol=0, atol=1e-5 * float(alone.abs().max()))


def test_kernel_spectra_are_the_padded_centred_kernels_transform():
    kernels = torch.from_numpy(np.random.default_rng(4).random((2, 3, 10, 10)).astype(np.float32))
    padded = torch.zeros(2, 3, 45, 45)
    padded[..., :10, :10] = kernels
    expected = torch.fft.rfft2(torch.roll(padded, (-5, -5), (-2, -1)))
    assert torch.allclose(synthesis.kernel_spectra(kernels, 45), expected, atol=1e-5)


def test_renderer_matches_the_per_image_renderer_of_ec4be71(source_file):
    """The batched renderer against blurred images the per-image renderer of commit ec4be71 made
    from the same crops, region maps and motions (the whole chain but the noise): within 1e-5 of
    the image range (float32 FFTs in another order)."""
    ref = np.load(Path(__file__).parent / "data" / "render_reference.npz")
    syn = synthesis.Synthesizer(source_file, SETUP)
    draws = {k: ref[k] for k in ref.files if k not in ("sharp", "regions", "blurred")}
    out = syn.renderer(syn.tensors(draws), torch.from_numpy(ref["sharp"]), torch.from_numpy(ref["regions"]).long())
    assert np.abs(out["blurred"].numpy() - ref["blurred"]).max() < 1e-5


def test_one_region_keeps_a_flat_source_flat(tmp_path):
    syn = synthesis.Synthesizer(flat_sources(tmp_path / "flat.h5", 0.5), SETUP.with_synthesis(regions=(1, 1)))
    blurred = syn.renderer(syn.tensors(syn.draws.step(4, (0,))))["blurred"]
    assert torch.allclose(blurred, torch.full_like(blurred, 0.5), atol=1e-4)


def counts(signal: float, photons: float, qe: float, sigma: float, key: int, shape=(2, 256, 256)) -> torch.Tensor:
    b = shape[0]
    return CameraNoise()(torch.full(shape, signal), *(torch.full((b,), v) for v in (photons, qe, sigma)), camera.generator(key))


def test_poisson_statistics_match_quantum_efficiency_and_photons():
    c = counts(0.5, 400.0, 0.6, 0.0, key=0).double().numpy()
    expected = 0.6 * 400 * 0.5
    assert c.mean() == pytest.approx(expected, rel=0.01)
    assert c.var() == pytest.approx(expected, rel=0.03)  # Poisson: variance = mean


def test_background_is_half_normal():
    c = counts(0.0, 1.0, 1.0, 20.0, key=1).double().numpy()
    assert c.min() >= 0
    assert c.mean() == pytest.approx(20 * np.sqrt(2 / np.pi), rel=0.02)
    assert c.var() == pytest.approx(20**2 * (1 - 2 / np.pi), rel=0.05)


def test_noise_depends_only_on_the_key():
    first, again, other = counts(0.5, 100.0, 1.0, 3.0, 7), counts(0.5, 100.0, 1.0, 3.0, 7), counts(0.5, 100.0, 1.0, 3.0, 8)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])  # one draw for the batch, not one seed per image


def test_validity_is_zero_on_flat_and_one_on_texture():
    flat = torch.full((1, 32, 32), 0.4)
    texture = torch.from_numpy(np.random.default_rng(0).random((1, 32, 32)).astype(np.float32))
    assert synthesis.validity(flat, 7, 0.02).sum() == 0
    assert synthesis.validity(texture, 7, 0.02).all()
    half = flat.clone()
    half[:, :, 16:] = texture[:, :, 16:]
    w = synthesis.validity(half, 7, 0.02)[0]
    assert w[:, :12].sum() == 0 and w[:, 20:].all()


def test_voronoi_cells_are_the_nearest_centre_of_the_warped_grid():
    """Against the direct computation: warp fields as sums of outer products of the cosine
    series, squared distances to every used centre, the nearest (first on ties)."""
    g = torch.Generator().manual_seed(5)
    b, r, size = 3, 4, 80
    shape = (b, 2, 2 * synthesis.FIELD_RANK, synthesis.FIELD_MODES)
    centres, amp, phase = torch.rand(b, r, 2, generator=g) * size, torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 6.3
    count = torch.tensor([4, 3, 2])
    t = torch.arange(size, dtype=torch.float64) * (np.pi / size)
    m = torch.arange(1, synthesis.FIELD_MODES + 1, dtype=torch.float64)
    series = (amp.double()[..., None] * torch.cos(m[:, None] * t + phase.double()[..., None])).sum(-2)
    fields = sum(series[:, :, i, :, None] * series[:, :, synthesis.FIELD_RANK + i, None, :] for i in range(synthesis.FIELD_RANK)) * (size / 6)
    y = torch.arange(size)[:, None] + fields[:, 0]
    x = torch.arange(size)[None, :] + fields[:, 1]
    d = (y[:, None] - centres[:, :, 0, None, None].double()) ** 2 + (x[:, None] - centres[:, :, 1, None, None].double()) ** 2
    expected = torch.where(torch.arange(r)[None, :, None, None] < count[:, None, None, None], d, np.inf).argmin(1)
    labels = synthesis.voronoi(centres, count, amp, phase, size)
    assert (labels != expected).float().mean() < 1e-3  # float32 against float64: a pixel on a boundary may go either way
    assert all(set(labels[i].unique().tolist()) == set(range(count[i])) for i in range(b))


def test_voronoi_labels():
    labels = cells(96, [4, 1, 2], seed=3)
    assert labels.dtype == torch.int64 and labels.shape == (3, 96, 96)
    assert set(labels[0].unique().tolist()) <= {0, 1, 2, 3} and len(labels[0].unique()) >= 2
    assert not labels[1].any() and set(labels[2].unique().tolist()) <= {0, 1}
    assert torch.equal(labels, cells(96, [4, 1, 2], seed=3))


def test_crops_are_the_tiles_pixels_turned_and_mirrored(source_file):
    """Without magnification a crop is the tile's pixels exactly (np.rot90, then mirrored columns)."""
    syn = synthesis.Synthesizer(source_file, SETUP.with_synthesis(stretch_crops=False))
    draws = syn.draws.step(16, (1, 2))
    crops = syn.renderer.crop(syn.tensors(draws)).numpy()
    with h5py.File(source_file) as f:
        tiles = f["images"][()]
    assert set(draws["rot"]) == {0, 1, 2, 3} and 0 < draws["flip"].sum() < 16
    for i, crop in enumerate(crops):
        y, x = draws["y0"][i], draws["x0"][i]
        expected = np.rot90(tiles[draws["tile"][i], y : y + 64, x : x + 64], draws["rot"][i])
        expected = expected[:, ::-1] if draws["flip"][i] else expected
        assert np.array_equal(crop, expected.astype(np.float32) / 65535)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"v3": [1, 0]}, "synthesis.v3"),
        ({"regions": [0, 2]}, "synthesis.regions"),
        ({"quantum_efficiency": [0.5, 1.5]}, "quantum_efficiency"),
        ({"source_zoom": [0.5, 2]}, "source_zoom must be >= 1"),
        ({"source_zoom": [3, 2]}, "synthesis.source_zoom"),
        ({"smooth_flow": 1.5}, "synthesis.smooth_flow must be a share"),
        ({"smooth_flow_bands": 1}, "synthesis.smooth_flow_bands"),
    ],
)
def test_bad_synthesis_config_is_rejected(cfg, match):
    with pytest.raises(ValueError, match=match):
        synthesis.SynthesisConfig.from_config(cfg)


@pytest.mark.parametrize("angle, axis, flip", [(0, 1, False), (np.pi / 2, 0, False), (np.pi, 1, True), (3 * np.pi / 2, 0, True)])
def test_band_map_cuts_equal_bands_along_its_direction(angle, axis, flip):
    """Bands of 64 / 8 = 8 px across the central image (the cylinder's rows at pi/2), clamped in the padding."""
    labels = synthesis.band_map(96, 64, 8, torch.tensor([angle], dtype=torch.float64))[0].numpy()
    assert labels.shape == (96, 96)
    profile = labels.take(0, axis=1 - axis)  # along the direction's axis
    assert (labels == (profile[:, None] if axis == 0 else profile[None, :])).all()  # constant across it
    inner = profile[16:80][::-1] if flip else profile[16:80]
    assert np.array_equal(inner, np.repeat(np.arange(8), 8))
    assert (profile[:16] == profile[16]).all() and (profile[80:] == profile[79]).all()
    if angle == np.pi / 2:
        assert np.array_equal(labels, testsets.row_regions(96, 64, 8))


def test_band_map_on_a_diagonal_is_constant_along_the_other_diagonal():
    labels = synthesis.band_map(64, 64, 4, torch.tensor([np.pi / 4], dtype=torch.float64))[0].numpy()
    assert all(len(set(np.diag(np.fliplr(labels), k))) == 1 for k in range(-63, 64, 9))
    assert labels[0, 0] == 0 and labels[-1, -1] == 3


def test_a_ramp_is_linear_across_its_bands_and_within_the_ranges(source_file):
    syn = synthesis.Synthesizer(source_file, SETUP.with_synthesis(smooth_flow=1.0, smooth_flow_bands=6))
    draws = syn.draws.step(5, (1,))
    params = draws["params"]
    assert params.shape == (5, 6, 4) and draws["ramp"].all() and (draws["regions"] == 6).all()
    np.testing.assert_allclose(np.diff(params, 2, axis=1), 0, atol=1e-6)  # second differences vanish
    cfg = syn.cfg
    for j, (lo, hi) in enumerate((cfg.v_lateral, cfg.v_lateral, cfg.v3, cfg.z0)):
        assert (params[..., j] >= lo).all() and (params[..., j] <= hi).all()
    regions = syn.renderer.regions(syn.tensors(draws))
    assert all(set(r.unique().tolist()) <= set(range(6)) for r in regions)


def test_smooth_flow_shares_and_shards(source_file, tmp_path):
    """smooth_flow 1: every sample a ramp, its labels canonical per band; 0: the draws are those of
    a config without the keys (nothing is taken from the generator)."""
    ramps = SETUP.with_synthesis(smooth_flow=1.0, smooth_flow_bands=5)
    assert ramps.synthesis.max_regions == 5 and SETUP.synthesis.max_regions == 3
    path = tmp_path / "shard-0000.h5"
    synthesis.write_shard(path, source_file, ramps, split="train", shard=0, samples=3, progress=False)
    with h5py.File(path) as f:
        assert f["params"].shape == (3, 5, 4) and np.isfinite(f["params"][()]).all()
    assert all(len(np.unique(r)) >= 4 for r in assert_labels_consistent_and_canonical(path))
    off = SETUP.with_synthesis(smooth_flow=0.0, smooth_flow_bands=40)
    a = synthesis.Synthesizer(source_file, SETUP).draws.step(4, (5,))
    b = synthesis.Synthesizer(source_file, off).draws.step(4, (5,))
    assert all(np.array_equal(a[k], b[k], equal_nan=k == "params") for k in a)
    assert off.synthesis.max_regions == 3


def test_source_zoom_magnifies_the_texture_by_its_factor(tmp_path):
    """A grid of period 4 px seen at zoom 2 has period 8 px: 8 cycles across a 64 px crop, not 16."""
    y, x = np.mgrid[0:128, 0:128]
    grid = 0.5 + 0.25 * (np.cos(2 * np.pi * x / 4) + np.cos(2 * np.pi * y / 4))
    path = tmp_path / "grid.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.round(grid * 65535).astype(np.uint16)[None]
        f["source"] = np.zeros(1, np.int32)
    for zoom, cycles in ((1, 16), (2, 8)):
        syn = synthesis.Synthesizer(path, SETUP.with_synthesis(source_zoom=(zoom, zoom)))
        crop = syn.renderer.crop(syn.tensors(syn.draws.step(1, (0,))))[0].numpy()
        spectrum = np.abs(np.fft.rfft(crop - crop.mean(1, keepdims=True), axis=1)).mean(0)
        assert crop.shape == (64, 64) and int(np.argmax(spectrum)) == cycles


def test_test_sets_ignore_the_training_source_zoom(source_file, tmp_path):
    """Every model meets the same test images: a training config's source_zoom does not reach them."""
    paths = [tmp_path / f"two_zone_{z}.h5" for z in (1, 3)]
    for z, path in zip((1, 3), paths):
        testsets.write_two_zone(path, source_file, SETUP.with_synthesis(source_zoom=(z, z)), 64, 2, progress=False)
    with h5py.File(paths[0]) as a, h5py.File(paths[1]) as b:
        assert np.array_equal(a["image"][()], b["image"][()])


def test_tiles_smaller_than_the_image_are_rejected(source_file):
    with pytest.raises(ValueError, match="smaller than synthesis.image_px"):
        synthesis.Synthesizer(source_file, SETUP.with_synthesis(image_px=256))


# --- dataset -----------------------------------------------------------------------------------


def test_dataset_builds_dense_targets(shard):
    ds = ShardDataset([shard, shard])
    assert len(ds) == 24
    item = ds[13]
    with h5py.File(shard) as f:
        params, region, valid = f["params"][1], f["region"][1], f["valid"][1]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert torch.equal(item["target"], torch.from_numpy(params[region].transpose(2, 0, 1)))
    assert torch.equal(item["valid"][0], torch.from_numpy(valid.astype(np.float32)))
    assert ds.attrs["scales"]["lateral_scale_px"] == SCALES.lateral_scale_px
    with pytest.raises(IndexError):
        ds[24]


def test_dataset_works_with_worker_processes(shard):
    ds = ShardDataset([shard])
    serial = [b["image"] for b in torch.utils.data.DataLoader(ds, batch_size=4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    parallel = [b["image"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


# --- online synthesis --------------------------------------------------------------------------


def online(source_file, seed=3, batch_size=4, **kw):
    return data.OnlineData(source_file, source_file, replace(SETUP, seed=seed), batch_size=batch_size, samples_per_epoch=8, **kw)


def test_an_online_batch_is_the_shard_sample_of_the_same_draw(source_file, tmp_path):
    path = tmp_path / "shard-0005.h5"
    synthesis.write_shard(path, source_file, SETUP, split="train", shard=5, samples=20, progress=False)
    shard = ShardDataset([path])
    batch = next(online(source_file, batch_size=synthesis.RENDER_BATCH).steps([5]))  # the shard writer's first batch
    assert batch["image"].shape == (16, 1, 64, 64) and batch["target"].shape == (16, 4, 64, 64)
    for i in range(16):
        for key in ("image", "target", "valid"):
            assert torch.equal(batch[key][i], shard[i][key]), (i, key)


def test_online_validation_is_the_validation_shard(source_file, tmp_path):
    path = tmp_path / "val.h5"
    synthesis.write_shard(path, source_file, SETUP, split="val", shard=0, samples=20, progress=False)
    shard = ShardDataset([path])
    batches = online(source_file, val_samples=(1, 20)).validation()
    assert [len(b["image"]) for b in batches] == [16, 4]  # the writer's batches (16), not the training batch (4)
    images = torch.cat([b["image"] for b in batches])
    assert torch.equal(images, torch.stack([shard[i]["image"] for i in range(20)]))


def test_online_steps_are_fixed_by_the_step_not_the_run(source_file):
    data_ = online(source_file)
    epoch1 = [b["image"] for b in data_.epoch(1)]
    assert len(epoch1) == 2  # samples_per_epoch 8 / batch 4
    again = [b["image"] for b in online(source_file).steps([2, 3])]
    assert all(torch.equal(a, b) for a, b in zip(epoch1, again))  # epoch 1 is steps 2 and 3
    assert not torch.equal(epoch1[0], next(data_.steps([4]))["image"])
