"""Resolve a data spec to evaluation tensors (a stratified, seeded sample) or a training data set.

Data specs:

- ``digits`` or ``digits:test`` / ``digits:train``: scikit-learn's bundled 8x8 handwritten digits
  (1,797 images, 1 channel), split 70/30 stratified with a fixed seed; ships with scikit-learn, so
  it works offline;
- ``imagefolder:DIR`` or just ``DIR``: a torchvision ``ImageFolder`` tree (``DIR/<class>/<image>``);
- ``cifar10:ROOT`` or ``cifar10:ROOT:train``: torchvision's CIFAR-10 folder format
  (``ROOT/cifar-10-batches-py``), test split by default; never downloaded.

Preprocessing (:class:`Preprocess`): optional resize and center crop, then ``(x - mean) / std`` on
[0, 1] pixels. Images default to the ImageNet mean/std; digits to mean 0.5, std 0.5.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sensplan._errors import DataSpecError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DIGITS_SPLIT_SEED = 0  # fixed, so digits:train and digits:test never overlap across runs


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: ``resize`` (shorter side, pixels), ``crop`` (center, pixels), mean/std.

    ``mean``/``std`` of ``None`` mean "the data kind's default" (ImageNet for images, 0.5/0.5 digits).
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise DataSpecError(f"The {name!r} parameter of Preprocess must be a positive integer "
                                    f"number of pixels or None. Got {v!r} instead.")
        if (self.mean is None) != (self.std is None):
            raise DataSpecError("Give both mean and std (e.g. --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25), "
                                "or neither for the defaults.")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise DataSpecError(f"mean has {len(self.mean)} values but std has {len(self.std)}; "
                                    f"give one per input channel.")
            if any(s <= 0 for s in self.std):
                raise DataSpecError(f"Every std value must be > 0. Got {self.std} instead.")

    def to_dict(self) -> dict[str, Any]:
        return {"resize": self.resize, "crop": self.crop,
                "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(resize=d.get("resize"), crop=d.get("crop"),
                   mean=tuple(d["mean"]) if d.get("mean") else None,
                   std=tuple(d["std"]) if d.get("std") else None)


@dataclass(frozen=True)
class DataSpec:
    """A data source: ``kind`` ('digits', 'imagefolder', 'cifar10'), its ``root``, ``split``."""

    kind: str
    root: str = ""
    split: str = "test"
    preprocess: Preprocess = field(default_factory=Preprocess)

    @classmethod
    def parse(cls, text: str, preprocess: Preprocess | None = None) -> DataSpec:
        """Parse ``digits[:split]``, ``cifar10:ROOT[:split]``, ``imagefolder:DIR`` or a bare ``DIR``."""
        pp = preprocess or Preprocess()
        if not isinstance(text, str) or not text:
            raise DataSpecError("The data spec is empty. Use 'digits', 'imagefolder:DIR', a directory, "
                                "or 'cifar10:ROOT'.")
        head, _, rest = text.partition(":")
        if head == "digits":
            split = rest or "test"
            if split not in ("train", "test"):
                raise DataSpecError(f"The digits split must be 'train' or 'test'. Got {split!r} instead.")
            return cls("digits", "", split, pp)
        if head == "cifar10":
            root, split = rest, "test"
            if root.endswith((":train", ":test")):
                root, _, split = root.rpartition(":")
            return cls("cifar10", root, split, pp)
        if head == "imagefolder":
            return cls("imagefolder", rest, "", pp)
        if os.path.isdir(text):
            return cls("imagefolder", text, "", pp)
        raise DataSpecError(f"The data spec {text!r} is neither an existing directory nor one of "
                            f"'digits[:train|test]', 'imagefolder:DIR', 'cifar10:ROOT[:train|test]'.")

    def __str__(self) -> str:
        if self.kind == "digits":
            return f"digits:{self.split}"
        if self.kind == "cifar10":
            return f"cifar10:{self.root}:{self.split}"
        return f"imagefolder:{self.root}"

    def to_dict(self) -> dict[str, Any]:
        return {"spec": str(self), "kind": self.kind, "root": self.root, "split": self.split,
                "preprocess": self.preprocess.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(d["kind"], d.get("root", ""), d.get("split", ""),
                   Preprocess.from_dict(d.get("preprocess", {})))


def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y,
                                          random_state=_DIGITS_SPLIT_SEED)
    return (xtr, ytr) if split == "train" else (xte, yte)


def _image_transform(pp: Preprocess, augment: bool) -> Any:
    from torchvision import transforms as T

    ops: list[Any] = []
    if pp.resize:
        ops.append(T.Resize(pp.resize))
    if pp.crop:
        ops.append(T.CenterCrop(pp.crop))
    if augment:
        size = pp.crop or pp.resize
        if size:
            ops.append(T.RandomCrop(size, padding=max(1, size // 8)))
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(pp.mean or IMAGENET_MEAN, pp.std or IMAGENET_STD)]
    return T.Compose(ops)


class _Normalized(Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, x: np.ndarray, y: np.ndarray, pp: Preprocess) -> None:
        mean = torch.tensor(pp.mean or (0.5,) * x.shape[1]).view(-1, 1, 1)
        std = torch.tensor(pp.std or (0.5,) * x.shape[1]).view(-1, 1, 1)
        if mean.numel() != x.shape[1]:
            raise DataSpecError(f"The digits have 1 channel, but mean has {mean.numel()} values.")
        self.x = (torch.from_numpy(x) - mean) / std
        self.y = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def open_dataset(spec: DataSpec, *, augment: bool = False) -> tuple[Dataset[Any], np.ndarray, list[str]]:
    """The dataset a spec names, its integer labels (for stratification) and class names."""
    if spec.kind == "digits":
        x, y = _digits_arrays(spec.split)
        return _Normalized(x, y, spec.preprocess), y, [str(i) for i in range(10)]
    from torchvision import datasets

    tf = _image_transform(spec.preprocess, augment)
    if spec.kind == "cifar10":
        base = Path(spec.root)
        if not (base / "cifar-10-batches-py").is_dir():
            raise DataSpecError(f"{spec.root!r} has no cifar-10-batches-py folder (torchvision's CIFAR-10 "
                                f"format); sensplan does not download it. For a folder of class "
                                f"subfolders use 'imagefolder:DIR'.")
        ds = datasets.CIFAR10(spec.root, train=spec.split == "train", transform=tf, download=False)
        return ds, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
    root = Path(spec.root)
    if not root.is_dir():
        raise DataSpecError(f"The image folder {spec.root!r} does not exist. Give a directory that "
                            f"holds one subfolder per class.")
    try:
        ds = datasets.ImageFolder(str(root), transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataSpecError(f"{spec.root!r} is not an ImageFolder tree ({e}). It needs one subfolder "
                            f"per class with images inside, e.g. {spec.root}/cat/0001.jpg.") from None
    return ds, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def stratified_indices(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` indices with each class in proportion (all indices if ``n`` is None
    or at least the data size), by largest remainder: a class gets ``floor(n * share)`` samples plus
    one if its remainder is among the largest. A class whose share of ``n`` is below one sample can
    get none (e.g. 10 classes and ``n=5``).

    Example: 10 classes of 1,000 and ``n=1000`` give 100 of each class, in a seeded random order.
    """
    total = len(labels)
    rng = np.random.default_rng(seed)
    if n is None or n >= total:
        return rng.permutation(total)
    if n <= 0:
        raise DataSpecError(f"The number of evaluation samples must be positive. Got {n} instead.")
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / total * n).astype(int)
    # hand out the remainder to the classes with the largest fractional parts (largest remainder)
    rest = n - quota.sum()
    frac = counts / total * n - quota
    for i in np.argsort(-frac, kind="stable")[:rest]:
        quota[i] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
              for c, q in zip(classes, quota, strict=True) if q > 0]
    return rng.permutation(np.concatenate(picked))


@dataclass
class EvalSet:
    """Evaluation data held in memory: ``x`` (N, C, H, W) float32 and ``y`` (N,) int64 labels."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    description: dict[str, Any]
    indices: np.ndarray | None = None  # positions in the source data set

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    @property
    def example_input(self) -> torch.Tensor:
        return self.x[:1].clone()

    def to(self, device: torch.device | str) -> EvalSet:
        """The same data with its tensors on ``device`` (itself when already there)."""
        dev = torch.device(device)
        if self.x.device == dev:
            return self
        return EvalSet(self.x.to(dev), self.y.to(dev), self.classes, self.description, self.indices)


def load_eval_set(spec: DataSpec, n: int | None = 2000, seed: int = 0, workers: int = 2,
                  exclude: np.ndarray | None = None) -> EvalSet:
    """Decode a stratified, seeded sample of ``n`` items once and keep it in memory as tensors.

    Keeping the decoded tensors makes the hundreds of evaluations of a scan cost only the forward
    passes, not JPEG decoding. ``exclude`` removes positions from the candidates (e.g. to draw
    calibration data disjoint from the evaluation sample).
    """
    ds, labels, classes = open_dataset(spec)
    candidates = np.arange(len(labels))
    if exclude is not None and len(exclude):
        candidates = np.setdiff1d(candidates, exclude)
    if len(candidates) == 0:
        where = " outside the evaluation sample." if exclude is not None else "."
        raise DataSpecError(f"The data {spec} holds no samples{where}")
    idx = candidates[stratified_indices(labels[candidates], n, seed)]
    if isinstance(ds, _Normalized):
        x, y = ds.x[torch.from_numpy(idx)], ds.y[torch.from_numpy(idx)]
    else:
        loader = DataLoader(Subset(ds, idx.tolist()), batch_size=256, shuffle=False,
                            num_workers=_workers(workers, len(idx)), collate_fn=_collate)
        xs, ys = [], []
        for xb, yb in loader:
            xs.append(xb)
            ys.append(yb)
        x, y = torch.cat(xs), torch.cat(ys)
    counts = np.bincount(y.numpy(), minlength=len(classes)).tolist()
    desc = {**spec.to_dict(), "n_available": int(len(candidates)), "n": int(len(y)), "seed": seed,
            "per_class": counts, "input_shape": list(x.shape[1:]),
            "indices_sha256": _digest(idx)}
    return EvalSet(x.contiguous(), y, classes, desc, idx)


def load_calibration_set(eval_set: EvalSet, n: int, seed: int, source: DataSpec | None = None) -> EvalSet:
    """Calibration data for BatchNorm adaptation: ``n`` stratified samples from ``source`` (e.g. the
    training data) or, without one, from the evaluation data's source outside the evaluation sample.
    Falls back to the evaluation sample itself when nothing else is left (recorded in the description).
    """
    if source is not None:
        cal = load_eval_set(source, n, seed)
        cal.description["role"] = "calibration"
        return cal
    spec = DataSpec.from_dict(eval_set.description)
    try:
        cal = load_eval_set(spec, n, seed + 1, exclude=eval_set.indices)
        cal.description["role"] = "calibration (disjoint from the evaluation sample)"
    except DataSpecError:
        k = min(n, len(eval_set))
        cal = EvalSet(eval_set.x[:k], eval_set.y[:k], eval_set.classes,
                      {**eval_set.description, "n": k,
                       "role": "calibration (the evaluation sample itself: no other data was left)"},
                      None if eval_set.indices is None else eval_set.indices[:k])
    return cal


def _digest(idx: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def _workers(workers: int, n: int) -> int:
    return 0 if n < 512 else max(0, min(workers, os.cpu_count() or 1))


def _collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(b[0].shape) for b in batch}
    if len(shapes) > 1:
        raise DataSpecError(f"The images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}), "
                            f"so they cannot be batched. Pass --resize N and --crop N.")
    return torch.stack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch])


def train_loader(spec: DataSpec, batch_size: int, seed: int, *, augment: bool = False,
                 n: int | None = None, workers: int = 2) -> DataLoader[Any]:
    """A shuffled, seeded loader over the training data (optionally a stratified subset of ``n``)."""
    ds, labels, _ = open_dataset(spec, augment=augment)
    if n is not None and n < len(labels):
        ds = Subset(ds, stratified_indices(labels, n, seed).tolist())
    g = torch.Generator().manual_seed(seed)
    if isinstance(ds, _Normalized):
        ds = TensorDataset(ds.x, ds.y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=False,
                      num_workers=_workers(workers, len(labels)), collate_fn=_collate,
                      persistent_workers=False)
