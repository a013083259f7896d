"""What the ResNet-20 benchmarks share: their flags and the files they need from ../shared."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def cifar_test_dir(shared: str | Path) -> Path | None:
    """The CIFAR-10 JPEG test folder in ``shared``, or None (said so)."""
    test_dir = Path(shared) / "data" / "cifar10-jpg" / "test"
    if not test_dir.is_dir():
        print(f"skipped: {shared} has no CIFAR-10 JPEG test set")
        return None
    return test_dir


#: weight_quant's default settings, and the finer family of bench_formats.py and bench_verify.py's
#: --formats finer: those plus 5 bits, zero points (4a, 3a, 2a) and group-wise scales of 64 values
DEFAULT_FORMATS = ("8", "6", "4", "3", "2")
FINER_FORMATS = (*DEFAULT_FORMATS, "5", "4a", "3a", "2a", "4g64", "3g64", "2ag64")


def cifar_resnets(shared: str | Path, names: str) -> Iterator[tuple[str, Path, Any, Any]]:
    """Each CIFAR ResNet of ``names`` (``"resnet20,resnet56"``) that ``shared`` has: (name, weights
    file, spec, model); one it lacks is said so and skipped."""
    from sensplan.sensitivity import ModelSpec, load_model

    for name in names.split(","):
        weights = Path(shared) / "models" / "cifar10" / f"{name}_jpeg.pt"
        if not weights.is_file():
            print(f"\n{name}: skipped, no {weights}")
            continue
        spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:{name}")
        yield name, weights, spec, load_model(spec, weights)


def cifar_splits(test_dir: Path, samples: int = 2000, calib_samples: int = 500) -> tuple[Any, Any, Any, Any]:
    """The CIFAR-10 test folder split, stratified and seeded, into the scan's sample, BatchNorm
    calibration, a held-out split of 2,500 and the test split (the rest: 5,000 at the defaults),
    each disjoint from the ones before; printed."""
    import numpy as np

    from sensplan.sensitivity import DataSpec, load_eval_set
    from sensplan.sensitivity._data import load_calibration_set

    spec = DataSpec.parse(str(test_dir))
    sample = load_eval_set(spec, samples, seed=0)
    calib = load_calibration_set(sample, calib_samples, seed=0)
    used = np.concatenate([sample.indices, calib.indices])
    held = load_eval_set(spec, 2500, seed=2, exclude=used)
    test = load_eval_set(spec, None, seed=3, exclude=np.concatenate([used, held.indices]))
    print(f"splits: sample {len(sample)}, calibration {len(calib)}, held-out {len(held)}, test {len(test)}")
    return sample, calib, held, test


def load_resnet20(weights: Path) -> tuple[Any, Any]:
    """The ResNet-20 of examples/cifar_resnet.py with ``weights``: (its spec, the model)."""
    from sensplan.sensitivity import ModelSpec, load_model

    spec = ModelSpec(f"{ROOT / 'examples' / 'cifar_resnet.py'}:resnet20")
    return spec, load_model(spec, weights)


def best_uniform(judge: Any, table: Any, budget: list[Any], plan_data: Any) -> tuple[float, str]:
    """The best uniform plan in hindsight: every uniform candidate at ``budget`` measured by
    ``judge`` (a Verifier whose held-out split is the test split); (its top-1, its label)."""
    from sensplan.planner import Costs, uniform_candidates
    from sensplan.planner._plan import uniform_allocation
    from sensplan.planner._solver import uniform_label

    cm = Costs(table, signal="drop")
    best, label = float("nan"), "-"
    for u in uniform_candidates(cm, budget):
        _, m = judge.measure(plan_data, uniform_allocation(cm, u, table), held=True, sample=False)
        if m is not None and not m.score <= best:
            best, label = m.score, uniform_label(cm, u)
    return best, label


def resnet20_bench(doc: str | None, budgets: str) -> tuple[Any, Path, Any, Any, tuple[Any, Any, Any, Any]] | None:
    """What a ResNet-20 planning bench starts with: its flags (``parser``'s plus ``--budgets`` and
    ``--cache``), then ``(args, weights, spec, model, (sample, calibration, held-out, test))``, or
    None (said so) when ../shared lacks the files."""
    import torch

    ap = parser(doc)
    ap.add_argument("--budgets", default=budgets)
    ap.add_argument("--cache", help="keep the scans' journals here and reuse them")
    args = ap.parse_args()
    files = resnet20_files(args.shared)
    if files is None:
        return None
    weights, test_dir = files
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    splits = cifar_splits(test_dir, args.samples, args.calib_samples)
    spec, model = load_resnet20(weights)
    return args, weights, spec, model, splits
