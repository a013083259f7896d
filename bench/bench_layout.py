"""Benchmark of the input memory order: evaluation time on contiguous (NCHW) against channels-last
(NHWC) inputs, and what the scan's timed trial (``channels_last_wins``) chooses, per model.

Models: the CIFAR ResNet-20 of examples/ (32x32 inputs, 2,000 images in batches of 500) and
torchvision CNNs with random weights and 10 outputs (64x64 or 96x96 inputs, 4 batches), in eval
mode. Each layout is timed ``--repeats`` times, interleaved; the median times and their ratio are
printed, with the trial's choice and the largest output difference between the orders.

    python bench/bench_layout.py [--models resnet20,mobilenet_v2,...] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ROOT  # noqa: E402

#: name -> (image size, batch size)
MODELS = {"resnet20": (32, 500), "resnet18": (64, 64), "mobilenet_v2": (64, 64), "mobilenet_v3_small": (96, 64),
          "efficientnet_b0": (64, 32), "densenet121": (64, 32), "shufflenet_v2_x0_5": (96, 64),
          "regnet_x_400mf": (64, 64), "squeezenet1_0": (96, 64), "convnext_tiny": (64, 16)}


def build(name: str) -> torch.nn.Module:
    if name == "resnet20":
        sys.path.insert(0, str(ROOT / "examples"))
        from cifar_resnet import resnet20

        return resnet20()
    import torchvision.models as tvm

    return getattr(tvm, name)(num_classes=10)


def main() -> int:
    from sensplan.sensitivity import channels_last_wins

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<20} {'input':>9} {'contiguous s':>13} {'channels-last s':>16} {'speed-up':>9} "
          f"{'trial picks':>12} {'max |diff|':>11}")
    for name in args.models.split(","):
        size, batch = MODELS[name]
        torch.manual_seed(0)
        model = build(name).eval()
        n = 2000 if name == "resnet20" else 4 * batch
        x = torch.randn(n, 3, size, size)
        layouts = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        times: dict[str, list[float]] = {k: [] for k in layouts}
        with torch.inference_mode():
            for v in layouts.values():  # warm-up
                model(v[:batch])
            for _ in range(args.repeats):
                for k, v in layouts.items():
                    t = time.perf_counter()
                    for i in range(0, n, batch):
                        model(v[i:i + batch])
                    times[k].append(time.perf_counter() - t)
            diff = float((model(x[:batch]) - model(layouts["channels_last"][:batch])).abs().max())
        a, b = statistics.median(times["contiguous"]), statistics.median(times["channels_last"])
        pick = "channels-last" if channels_last_wins(model, x, batch) else "contiguous"
        print(f"{name:<20} {f'{size}x{size}':>9} {a:>13.3f} {b:>16.3f} {a / b:>8.2f}x {pick:>12} {diff:>11.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
