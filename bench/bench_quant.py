"""Per-channel weight quantization: the blocked clipping search against the whole-tensor search.

Both search the same 33 clipping ratios per output channel; the blocked one runs over blocks of rows
in one reused buffer with in-place ops. Prints, per weight shape and bit width, the median of
``--repeats`` timings of each on this machine, their ratio, and checks that codes and scales are
bit-identical. Run: ``python bench/bench_quant.py [--threads 1] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sensplan.sensitivity._quant import _CLIP_GRID, qmax, quantize_per_channel

SHAPES = {  # a ResNet-20 conv, a ResNet-50 conv, a ViT-B MLP weight, a square FC, VGG's first FC
    "64x64x3x3": (64, 64, 3, 3), "512x512x3x3": (512, 512, 3, 3), "3072x768": (3072, 768),
    "4096x4096": (4096, 4096), "4096x25088": (4096, 25088)}


@torch.no_grad()
def whole_tensor(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The search as it was written before: a fresh tensor of the weight's size per op and ratio."""
    wf = w.detach().float().reshape(w.shape[0], -1)
    m = qmax(bits)
    amax = wf.abs().amax(dim=1).clamp_min(1e-12)
    best_err, best_scale = torch.full_like(amax, float("inf")), amax / m
    for ratio in _CLIP_GRID:
        s = (amax * ratio / m).unsqueeze(1)
        err = ((torch.clamp(torch.round(wf / s), -m, m) * s - wf) ** 2).sum(dim=1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, s.squeeze(1), best_scale)
    q = torch.clamp(torch.round(wf / best_scale.unsqueeze(1)), -m, m).to(torch.int8)
    return q.reshape(w.shape), best_scale


def median_seconds(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bits", default="4,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'weight':>12} {'bits':>4} {'whole s':>9} {'blocked s':>9} {'speed-up':>8}  identical")
    ratios = []
    for name, shape in SHAPES.items():
        w = torch.randn(*shape, generator=g) * 0.05
        for bits in (int(b) for b in args.bits.split(",")):
            q0, s0 = whole_tensor(w, bits)
            q1, s1 = quantize_per_channel(w, bits)
            same = torch.equal(q0, q1) and torch.equal(s0, s1)
            a = median_seconds(lambda: whole_tensor(w, bits), args.repeats)  # noqa: B023
            b = median_seconds(lambda: quantize_per_channel(w, bits), args.repeats)  # noqa: B023
            ratios.append(a / b)
            print(f"{name:>12} {bits:>4} {a:9.3f} {b:9.3f} {a / b:7.1f}x  {same}")
    print(f"median speed-up {statistics.median(ratios):.1f}x (min {min(ratios):.1f}x, max {max(ratios):.1f}x)")


if __name__ == "__main__":
    main()
