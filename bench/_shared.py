"""What the ResNet-20 benchmarks share: their flags and the files they need from ../shared."""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    """--shared, --samples (the scan's sample) and --calib-samples (BatchNorm calibration)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--calib-samples", type=int, default=500)
    return ap


def resnet20_files(shared: str) -> tuple[Path, Path] | None:
    """The fine-tuned ResNet-20 weights and the CIFAR-10 JPEG test folder, or None (said so) when
    ``shared`` lacks them."""
    weights = Path(shared) / "models" / "cifar10" / "resnet20_jpeg.pt"
    test_dir = Path(shared) / "data" / "cifar10-jpg" / "test"
    if not weights.is_file() or not test_dir.is_dir():
        print(f"skipped: {shared} has no ResNet-20 weights or CIFAR-10 JPEG test set")
        return None
    return weights, test_dir
