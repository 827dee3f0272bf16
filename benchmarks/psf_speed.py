"""Motion PSFs per second: blurflow.optics.MotionPSF against a naive per-slice reference.

The naive reference does what a straightforward implementation would: for every time step one
pupil FFT at that depth, the intensity, a Fourier shift of the slice to its lateral position,
accumulate, then pixel integration and decimation. Both use the same time steps.

    python benchmarks/psf_speed.py [--size 64] [--batch 2048] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from blurflow.optics import MotionPSF, MotionScales, Optics


def naive_motion_psf(optics: Optics, scales: MotionScales, params: torch.Tensor, size: int, steps: torch.Tensor):
    """One pupil FFT per time step, shifted and accumulated (float64, one kernel at a time)."""
    sub = optics.min_oversample
    m = size * sub
    pitch = optics.pixel_um / sub
    f = torch.fft.fftfreq(m, d=pitch, dtype=torch.float64)
    ky, kx = torch.meshgrid(f, f, indexing="ij")
    kn = optics.n / optics.wavelength_um
    kz = torch.sqrt(torch.clamp(kn**2 - kx**2 - ky**2, min=0)) - kn
    pupil = (torch.hypot(kx, ky) <= optics.cutoff).to(torch.complex128)
    box = torch.sinc(kx * optics.pixel_um) * torch.sinc(ky * optics.pixel_um)
    out = []
    for (v1, v2, v3, z0), k in zip(params.double().tolist(), steps.tolist()):
        acc = torch.zeros(m, m, dtype=torch.float64)
        for i in range(k):
            t = (i + 0.5) / k
            z = (z0 + v3 * t) * scales.axial_scale_um
            field = torch.fft.ifft2(pupil * torch.exp(2j * math.pi * z * kz))
            shift_um = torch.tensor([v1, v2]) * scales.lateral_scale_px * optics.pixel_um * (t - 0.5)
            ramp = torch.exp(-2j * math.pi * (kx * shift_um[0] + ky * shift_um[1]))
            acc += torch.fft.ifft2(torch.fft.fft2(field.abs() ** 2) * ramp).real
        otf = torch.fft.fft2(acc) * box
        coarse = torch.fft.ifft2(otf.reshape(sub, size, sub, size).sum((0, 2))).real
        out.append(torch.fft.fftshift(coarse / coarse.sum()))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="kernel size (camera pixels)")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--naive-batch", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    optics, scales = Optics(), MotionScales()
    g = torch.Generator().manual_seed(0)
    params = torch.cat([torch.rand(args.batch, 2, generator=g) * 2 - 1, torch.rand(args.batch, 2, generator=g)], 1)

    t0 = time.perf_counter()
    motion = MotionPSF(optics, scales, size=args.size, device=args.device)
    table_s = time.perf_counter() - t0
    motion(params[:64].to(args.device))  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fast = motion(params.to(args.device))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    fast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    motion(params.to(args.device), step_factor=2)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    doubled_s = time.perf_counter() - t0
    steps = motion.n_steps(params)

    nb = args.naive_batch
    t0 = time.perf_counter()
    naive = naive_motion_psf(optics, scales, params[:nb], args.size, steps[:nb])
    naive_s = time.perf_counter() - t0
    diff = (fast[:nb].cpu().double() - naive).abs().amax((1, 2)) / naive.amax((1, 2))

    result = {
        "device": args.device,
        "threads": args.threads,
        "kernel_px": args.size,
        "batch": args.batch,
        "table_build_s": round(table_s, 3),
        "table_shape": list(motion._table.shape),
        "steps_mean": round(float(steps.float().mean()), 2),
        "steps_max": int(steps.max()),
        "fast_psf_per_s": round(args.batch / fast_s, 1),
        "fast_psf_per_s_doubled_steps": round(args.batch / doubled_s, 1),
        "naive_psf_per_s": round(nb / naive_s, 2),
        "speedup": round((args.batch / fast_s) / (nb / naive_s), 1),
        "max_rel_diff_fast_vs_naive": float(diff.max()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
