"""The online training step (synthesis on the training device + network): static shapes, nothing
read back to the host, a renderer that compiles as one graph, small draws (issue: a GPU at full
speed). Measured on the CPU; benchmarks/gpu_step.py prints the same numbers on any device."""

import collections
import pickle

import pytest
import torch

from blurflow import sources, synthesis, train
from blurflow.data import OnlineData
from blurflow.optics import MotionScales, Optics
from blurflow.synthesis import Setup

SETUP = Setup(Optics(), MotionScales(6, 10), 16, synthesis.SynthesisConfig(image_px=32, regions=(1, 3), source_zoom=(1, 2), smooth_flow=0.3), seed=2)
CFG = train.TrainConfig(encoder_depth=3, decoder_channels=(16, 8, 4))


@pytest.fixture(scope="module")
def source_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "train.h5"
    sources.write_sources(sources.phantom_images(2, 96, seed=0), path, 48, "phantom")
    return path


def ops(p: torch.profiler.profile) -> dict[str, int]:
    """Counts of the aten operators that Python or autograd dispatched in a profile (not those an
    operator calls inside itself: how a CPU kernel splits its work is its own affair), and of
    ``_local_scalar_dense`` wherever it runs (a value read back to the host)."""
    counts = collections.Counter()
    for e in p.events():
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::") or e.name == "aten::_local_scalar_dense"):
            counts[e.name] += 1
    return dict(counts)


def profiled_step(source_file, batch: int) -> list[dict[str, int]]:
    """aten op counts of the parts of one training step after a warm-up step: the synthesis of
    the batch, forward + loss + backward, the optimiser's step."""
    data = OnlineData(source_file, source_file, SETUP, batch, batch, val_samples=(1, 4))
    device = torch.device("cpu")
    model = CFG.build_model()
    opt = train.make_optimizer(model, CFG, device)
    train.train_step(model, opt, data.render(data.renderer, data.draws(0)), CFG, device)  # the optimiser's state exists after it
    step = opt.step
    with torch.profiler.profile() as synthesis_prof:
        batch = data.render(data.renderer, data.draws(1))
    with torch.profiler.profile() as network_prof:
        opt.step = lambda: None  # counted apart below
        train.train_step(model, opt, batch, CFG, device)
    with torch.profiler.profile() as opt_prof:
        step()
    return [ops(synthesis_prof), ops(network_prof), ops(opt_prof)]


def test_a_training_step_dispatches_the_same_ops_for_any_batch_and_reads_nothing_back(source_file):
    """Ops per step independent of the batch (64, 256, 1024 images: static shapes, no per-image
    loop), part by part; no value read back to the host by the synthesis or the network."""
    steps = {b: profiled_step(source_file, b) for b in (64, 256, 1024)}
    for b, (synthesis_ops, network_ops, optimiser_ops) in steps.items():
        assert synthesis_ops == steps[64][0] and network_ops == steps[64][1] and optimiser_ops == steps[64][2], b
        for name in ("aten::_local_scalar_dense", "aten::item"):
            assert name not in synthesis_ops and name not in network_ops, (b, name)
    assert "aten::convolution_backward" in steps[64][1] and "aten::fft_irfft2" in steps[64][0]  # the profiles saw the step, backward included


def test_the_optimiser_keeps_its_state_on_a_cuda_device():
    """On the CPU RAdam counts its steps on the host (read each step: no device to wait for);
    on CUDA training makes it capturable, so its step reads nothing back."""
    model = CFG.build_model()
    assert train.make_optimizer(model, CFG, torch.device("cuda")).defaults["capturable"] is True
    assert train.make_optimizer(model, CFG, torch.device("cpu")).defaults["capturable"] is False


def test_the_renderer_compiles_as_one_graph(source_file):
    syn = synthesis.Synthesizer(source_file, SETUP, static=True)
    explained = torch._dynamo.explain(syn.renderer)(syn.tensors(syn.draws.step(4, (0,))))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_a_draw_is_numbers_of_under_a_kilobyte_per_image(source_file):
    syn = synthesis.Synthesizer(source_file, SETUP.with_synthesis(smooth_flow=0.5, smooth_flow_bands=16))
    draws = syn.draws.step(64, (0,))
    assert len(pickle.dumps(draws)) / 64 <= 1024
    assert all(v.dtype.kind in "biuf" for v in draws.values())
