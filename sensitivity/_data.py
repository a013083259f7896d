"""Resolve a data spec to evaluation tensors (a stratified, seeded sample) or a training data set.

Data specs:

- ``digits`` or ``digits:test`` / ``digits:train``: scikit-learn's bundled 8x8 handwritten digits
  (1,797 images, 1 channel), split 70/30 stratified with a fixed seed; ships with scikit-learn, so
  it works offline;
- ``imagefolder:DIR`` or just ``DIR``: a torchvision ``ImageFolder`` tree (``DIR/<class>/<image>``);
- ``cifar10:ROOT`` or ``cifar10:ROOT:train``: torchvision's CIFAR-10 folder format
  (``ROOT/cifar-10-batches-py``), test split by default; never downloaded;
- ``text:FILE``: a plain text file cut into windows of ``seq_len`` tokens (language models);
- ``jsonl:FILE:FIELD[:LABEL]`` and ``csv:FILE:FIELD[:LABEL]``: one text per record, with an optional
  label field. Text is tokenized with the tokenizer saved beside the model (``tokenizer``: a
  Hugging Face model folder, see :mod:`sensplan.sensitivity._hf`) into (batch, 2, tokens) int64
  inputs: the token ids and the attention mask;
- ``datasets:DIR:FIELD[:LABEL]``: the same from a Hugging Face ``datasets`` folder written by
  ``Dataset.save_to_disk`` (one split: ``DIR/test`` of a ``DatasetDict``), read with
  ``datasets.load_from_disk`` (the optional ``datasets`` package). A ``ClassLabel`` label column
  gives its integer ids and its class names.

Preprocessing (:class:`Preprocess`): optional resize and center crop, then ``(x - mean) / std`` on
[0, 1] pixels. Images default to the ImageNet mean/std; digits to mean 0.5, std 0.5.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from sensplan._errors import DataSpecError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_KINDS = ("text", "jsonl", "csv", "datasets")
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
    """A data source: ``kind`` ('digits', 'imagefolder', 'cifar10', or one of :data:`TEXT_KINDS`),
    its ``root`` (a folder or file), ``split``.

    ``class_map`` ((class name, output index) pairs, see :func:`load_class_map`) gives each class
    of the data the model's output index; without it, classes are numbered in sorted order from 0.
    With ``skip_unreadable``, images that cannot be decoded are left out and counted instead of
    being an error.
    """

    kind: str
    root: str = ""
    split: str = "test"
    preprocess: Preprocess = field(default_factory=Preprocess)
    class_map: tuple[tuple[str, int], ...] | None = None
    skip_unreadable: bool = False
    #: text data: the record fields (jsonl, csv, datasets), the tokenizer's folder and the window length
    text_field: str = ""
    label_field: str = ""
    tokenizer: str = ""
    seq_len: int = 0

    @classmethod
    def parse(cls, text: str, preprocess: Preprocess | None = None) -> DataSpec:
        """Parse ``digits[:split]``, ``cifar10:ROOT[:split]``, ``imagefolder:DIR``, a bare ``DIR``,
        ``text:FILE``, ``jsonl:FILE:FIELD[:LABEL]``, ``csv:...`` or ``datasets:DIR:FIELD[:LABEL]``."""
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
        if head == "text":
            if not rest:
                raise DataSpecError("text: needs a file, e.g. --data text:corpus.txt.")
            return cls("text", rest, "", pp)
        if head in ("jsonl", "csv", "datasets"):
            parts = rest.split(":")
            if len(parts) not in (2, 3) or not all(parts):
                where, example = ("DIR", "reviews/test") if head == "datasets" else ("FILE", f"reviews.{head}")
                raise DataSpecError(f"Use {head}:{where}:TEXT_FIELD or {head}:{where}:TEXT_FIELD:LABEL_FIELD, "
                                    f"e.g. {head}:{example}:text:label. Got {text!r}.")
            return cls(head, parts[0], "", pp, text_field=parts[1],
                       label_field=parts[2] if len(parts) == 3 else "")
        if os.path.isdir(text):
            return cls("imagefolder", text, "", pp)
        raise DataSpecError(f"The data spec {text!r} is neither an existing directory nor one of "
                            f"'digits[:train|test]', 'imagefolder:DIR', 'cifar10:ROOT[:train|test]', "
                            f"'text:FILE', 'jsonl:FILE:FIELD[:LABEL]', 'csv:FILE:FIELD[:LABEL]', "
                            f"'datasets:DIR:FIELD[:LABEL]'.")

    @property
    def is_text(self) -> bool:
        return self.kind in TEXT_KINDS

    def __str__(self) -> str:
        if self.kind == "digits":
            return f"digits:{self.split}"
        if self.kind == "cifar10":
            return f"cifar10:{self.root}:{self.split}"
        if self.kind == "text":
            return f"text:{self.root}"
        if self.kind in TEXT_KINDS:
            return ":".join(p for p in (self.kind, self.root, self.text_field, self.label_field) if p)
        return f"imagefolder:{self.root}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": str(self), "kind": self.kind, "root": self.root, "split": self.split,
               "preprocess": self.preprocess.to_dict()}
        if self.class_map is not None:  # only when given: older files and digests stay the same
            out["class_map"] = dict(self.class_map)
        if self.skip_unreadable:
            out["skip_unreadable"] = True
        if self.is_text:
            out.update(text_field=self.text_field, label_field=self.label_field,
                       tokenizer=self.tokenizer, seq_len=self.seq_len)
        if self.root and os.path.exists(self.root):  # found again from another working directory
            out["root_resolved"] = os.path.realpath(self.root)
        return out

    def same_source(self, other: DataSpec) -> bool:
        """Whether both read the same items: the same kind and split, and roots that are the same
        folder however they are spelled (relative or absolute, a trailing slash, a symlink)."""
        return (self.kind, self.split) == (other.kind, other.split) and (
            self.root == other.root or os.path.realpath(self.root) == os.path.realpath(other.root))

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> DataSpec:
        """The spec an artifact recorded; a relative root that does not exist from here is taken
        at the absolute path recorded beside it."""
        spec = cls.from_dict(d)
        resolved = d.get("root_resolved")
        if spec.root and not os.path.exists(spec.root) and resolved and os.path.exists(resolved):
            return dataclasses.replace(spec, root=resolved)
        return spec

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        cmap = d.get("class_map")
        return cls(d["kind"], d.get("root", ""), d.get("split", ""),
                   Preprocess.from_dict(d.get("preprocess", {})),
                   tuple((str(k), int(v)) for k, v in cmap.items()) if cmap is not None else None,
                   bool(d.get("skip_unreadable", False)), str(d.get("text_field", "")),
                   str(d.get("label_field", "")), str(d.get("tokenizer", "")), int(d.get("seq_len", 0)))


def load_class_map(path: str | os.PathLike[str]) -> tuple[tuple[str, int], ...]:
    """Read a class map (``--class-map FILE.json``): which model output each class folder is.

    Either an object ``{"cat": 3, "dog": 5}`` (class folder -> output index) or a list of class
    names in the model's output order, ``["airplane", "automobile", ...]`` (index = position).
    """
    import json

    flag = f"--class-map {path}"
    p = Path(path)
    if not p.is_file():
        raise DataSpecError(f"{flag}: the file does not exist. Give a JSON file mapping each class "
                            f"folder to the model's output index, e.g. {{\"cat\": 3, \"dog\": 5}}.")
    try:
        obj = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataSpecError(f"{flag}: not valid JSON ({e}). Write an object such as "
                            f"{{\"cat\": 3, \"dog\": 5}} or a list of class names in output "
                            f"order.") from None
    if isinstance(obj, list) and all(isinstance(v, str) for v in obj):
        dup = sorted({v for v in obj if obj.count(v) > 1})
        if dup:
            raise DataSpecError(f"{flag}: the class list names {', '.join(map(repr, dup[:3]))} "
                                f"more than once; each class needs one output index.")
        pairs = [(v, i) for i, v in enumerate(obj)]
    elif isinstance(obj, dict):
        bad = [k for k, v in obj.items()
               if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise DataSpecError(f"{flag}: the value of {bad[0]!r} is {obj[bad[0]]!r}; every value "
                                f"must be an output index, an integer >= 0.")
        pairs = [(str(k), int(v)) for k, v in obj.items()]
    else:
        raise DataSpecError(f"{flag}: expected an object {{\"folder\": index, ...}} or a list of "
                            f"class names in output order. Got a {type(obj).__name__}.")
    if not pairs:
        raise DataSpecError(f"{flag}: the map is empty. Map each class folder to an output index.")
    return tuple(pairs)


def _mapped(targets: Sequence[int] | np.ndarray, classes: list[str], spec: DataSpec) -> np.ndarray:
    """The labels under ``spec.class_map`` (the targets unchanged without one)."""
    labels = np.asarray(targets, dtype=np.int64)
    if spec.class_map is None:
        return labels
    cmap = dict(spec.class_map)
    missing = [c for c in classes if c not in cmap]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise DataSpecError(f"The --class-map lacks {len(missing)} class(es) of {spec}: "
                            f"{', '.join(map(repr, missing[:4]))}{more}. Map every class folder "
                            f"to an output index.")
    lut = np.array([cmap[c] for c in classes], dtype=np.int64)
    return lut[labels] if len(labels) else labels


def _digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y,
                                          random_state=_DIGITS_SPLIT_SEED)
    return (xtr, ytr) if split == "train" else (xte, yte)


def block_spans(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` spans of ``range(n)`` in blocks of ``size``, except that a last block of one
    item joins the one before it. A BatchNorm seeing one value per channel has no batch variance
    (torch refuses it), and torch may sum a lone long row in another order than a matrix's rows."""
    starts = list(range(0, n, max(1, size)))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True))


class _CropFits:
    """Refuse a center crop larger than the image: torchvision would zero-pad it silently."""

    def __init__(self, crop: int, resize: int | None) -> None:
        self.crop, self.resize = crop, resize

    def __call__(self, image: Any) -> Any:
        w, h = image.size
        if min(w, h) < self.crop:
            after = f" after --resize {self.resize}" if self.resize else ""
            raise DataSpecError(f"--crop {self.crop} is larger than an image ({w}x{h}{after}), which would be "
                                f"zero-padded. Pass a smaller --crop, or --resize {self.crop} to scale the "
                                f"images up first.")
        return image


def _image_transform(pp: Preprocess, augment: bool) -> Any:
    from torchvision import transforms as T

    ops: list[Any] = []
    if pp.resize:
        ops.append(T.Resize(pp.resize))
    if pp.crop:
        ops += [_CropFits(pp.crop, pp.resize), T.CenterCrop(pp.crop)]
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
            raise DataSpecError(f"The digits have 1 channel, but --mean and --std have "
                                f"{mean.numel()} values. Give one each, e.g. --mean 0.5 --std 0.5.")
        self.x = (torch.from_numpy(x) - mean) / std
        self.y = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class _Tokens(Dataset[tuple[torch.Tensor, int]]):
    """Tokenized text held in memory: ``x`` (items, 2, tokens) int64 ids and masks, ``y`` labels."""

    def __init__(self, x: torch.Tensor, y: np.ndarray) -> None:
        self.x = x
        self.y = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


#: the last text data set tokenized, keyed by its spec and its files' sizes and modification times:
#: the sample, the calibration data and the verification splits of one run read the same data
_TOKENIZED: dict[tuple[Any, ...], tuple[_Tokens, np.ndarray, list[str]]] = {}


def _version(path: str) -> tuple[Any, ...] | None:
    """What changes when the data at ``path`` changes: a file's modification time and size, or those
    of every file in a folder (a ``datasets`` folder: ``save_to_disk`` writes its state.json and
    arrow files anew). None when it cannot be read (the reader says what is wrong)."""
    try:
        st = os.stat(path)
        if not os.path.isdir(path):
            return (st.st_mtime_ns, st.st_size)
        files = [(e.name, e.stat()) for e in os.scandir(path) if e.is_file()]
        return tuple(sorted((name, f.st_mtime_ns, f.st_size) for name, f in files))
    except OSError:
        return None


def _open_text(spec: DataSpec) -> tuple[_Tokens, np.ndarray, list[str]]:
    """The tokenized records of a text spec, tokenized once per version of the data (the tensors
    are only read by the callers: they index copies out of them)."""
    version = _version(spec.root)
    key = None if version is None else (spec, version)
    if key is not None and key in _TOKENIZED:
        return _TOKENIZED[key]
    out = _tokenize(spec)
    if key is not None:
        _TOKENIZED.clear()
        _TOKENIZED[key] = out
    return out


def _tokenize(spec: DataSpec) -> tuple[_Tokens, np.ndarray, list[str]]:
    from sensplan.sensitivity import _hf

    if not spec.tokenizer:
        raise DataSpecError(f"Text data ({spec}) needs a tokenizer: give a Hugging Face model "
                            f"(--model hf:DIR, whose folder holds it) or --tokenizer DIR.")
    if spec.preprocess.resize or spec.preprocess.crop or spec.preprocess.mean:
        raise DataSpecError("--resize, --crop, --mean and --std apply to images, not text. Drop them.")
    tok = _hf.load_tokenizer(spec.tokenizer)
    seq_len = spec.seq_len or min(128, _hf.max_positions(spec.tokenizer) or 128)
    if spec.kind == "text":
        p = Path(spec.root)
        if not p.is_file():
            raise DataSpecError(f"The text file {spec.root!r} does not exist. Check --data text:FILE.")
        x = _hf.tokenize_text(p.read_text(encoding="utf-8", errors="replace"), tok, seq_len)
        y, classes = np.full(len(x), -1, dtype=np.int64), ["text"]  # -1: no labels
    else:
        names: list[str] | None = None  # a datasets ClassLabel's class names
        if spec.kind == "datasets":
            texts, labels, names = _hf.read_dataset(spec.root, spec.text_field, spec.label_field or None)
        else:
            texts, labels = _hf.read_records(spec.kind, spec.root, spec.text_field, spec.label_field or None)
        x = _hf.tokenize_records(texts, tok, seq_len)
        if spec.label_field:
            if names is not None:
                y, classes = np.asarray(labels, dtype=np.int64), names
            else:
                y, classes = _hf.label_ids(labels, spec.root)
            y = _mapped(y, classes, spec)
        else:
            y, classes = np.full(len(x), -1, dtype=np.int64), ["text"]
    return _Tokens(x, y), y, classes


class _Unreadable(NamedTuple):
    """Stands in for an image that cannot be decoded; the main process reports or skips it (an
    exception raised in a DataLoader worker would reach the user wrapped in the worker's traceback)."""

    path: str
    reason: str


class _Refused(NamedTuple):
    """Stands in for an image the preprocessing refuses (a user error, e.g. ``--crop`` too large);
    the main process raises it, as one message (see :class:`_Unreadable`)."""

    message: str


def _raise_refused(items: Sequence[Any]) -> None:
    refused = next((i for i in items if isinstance(i, _Refused)), None)
    if refused is not None:
        raise DataSpecError(refused.message)


def _reason(e: BaseException) -> str:
    first = first_line(e, 160)
    first = first.split(" <_io.")[0]  # PIL names the file object; the message names the path
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _visible_folder(base: Any) -> Any:
    """``ImageFolder`` that ignores hidden class folders (``.ipynb_checkpoints``, ``.DS_Store``
    directories, ``.git``): they are not classes, and counting one would shift every label."""

    class VisibleImageFolder(base):  # type: ignore[misc, valid-type]
        def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {c: i for i, c in enumerate(classes)}

    return VisibleImageFolder


def _visible_image(root: Path) -> Any:
    """An image file whose path below ``root`` has no hidden part (``cat/.ipynb_checkpoints/x.jpg``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    def ok(path: str) -> bool:
        parts = Path(os.path.relpath(path, root)).parts
        return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(p.startswith(".") for p in parts)
    return ok


class _Images(Dataset[Any]):
    """A torchvision ``ImageFolder`` whose undecodable images come back as :class:`_Unreadable`."""

    def __init__(self, folder: Any) -> None:
        # only what __getitem__ needs: a worker started by spawn pickles this dataset, and the
        # ImageFolder subclass made in _visible_folder cannot be pickled
        self.loader, self.transform = folder.loader, folder.transform
        self.classes: list[str] = list(folder.classes)
        self.samples: list[tuple[str, int]] = list(folder.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError ...
            return _Unreadable(path, _reason(e))
        try:
            return self.transform(image), target
        except DataSpecError as e:
            return _Refused(str(e))


def _check_channels(pp: Preprocess, channels: int, what: str) -> None:
    n = len(pp.mean) if pp.mean is not None else None
    if n is not None and n not in (1, channels):
        raise DataSpecError(f"{what} have {channels} channels, but --mean and --std have {n} values. "
                            f"Give {channels} values each, or 1 for all channels.")


def open_dataset(spec: DataSpec, *, augment: bool = False) -> tuple[Dataset[Any], np.ndarray, list[str]]:
    """The dataset a spec names, its integer labels (for stratification) and class names.

    Labels follow ``spec.class_map`` when it is given. An image folder's dataset returns an
    :class:`_Unreadable` for an image it cannot decode.
    """
    if spec.is_text:
        return _open_text(spec)
    if spec.kind == "digits":
        if spec.preprocess.resize or spec.preprocess.crop:
            raise DataSpecError("--resize and --crop apply to image folders and CIFAR-10; the digits "
                                "are always 8x8 pixels. Drop --resize and --crop.")
        x, y = _digits_arrays(spec.split)
        classes = [str(i) for i in range(10)]
        y = _mapped(y, classes, spec)
        return _Normalized(x, y, spec.preprocess), y, classes
    from torchvision import datasets

    tf = _image_transform(spec.preprocess, augment)
    if spec.kind == "cifar10":
        base = Path(spec.root)
        if not (base / "cifar-10-batches-py").is_dir():
            raise DataSpecError(f"{spec.root!r} has no cifar-10-batches-py folder (torchvision's CIFAR-10 "
                                f"format); sensplan does not download it. For a folder of class "
                                f"subfolders use 'imagefolder:DIR'.")
        _check_channels(spec.preprocess, 3, "The CIFAR-10 images")
        ds = datasets.CIFAR10(spec.root, train=spec.split == "train", transform=tf, download=False)
        labels = _mapped(ds.targets, list(ds.classes), spec)
        ds.targets = labels.tolist()
        return ds, labels, list(ds.classes)
    root = Path(spec.root)
    if not root.is_dir():
        raise DataSpecError(f"The image folder {spec.root!r} does not exist. Give a directory that "
                            f"holds one subfolder per class.")
    _check_channels(spec.preprocess, 3, "The images (read as RGB)")
    try:
        images = _Images(_visible_folder(datasets.ImageFolder)(str(root), transform=tf,
                                                              is_valid_file=_visible_image(root)))
    except (FileNotFoundError, RuntimeError) as e:
        if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
            folder = os.path.join(spec.root, "SPLIT") if (root / "dataset_dict.json").is_file() else spec.root
            raise DataSpecError(f"{spec.root!r} is a Hugging Face datasets folder (save_to_disk), not an "
                                f"image folder. Give text data as datasets:{folder}:TEXT_COLUMN"
                                f"[:LABEL_COLUMN].") from None
        raise DataSpecError(f"{spec.root!r} is not an ImageFolder tree ({e}). It needs one subfolder "
                            f"per class with images inside, e.g. {spec.root}/cat/0001.jpg.") from None
    labels = _mapped([t for _, t in images.samples], images.classes, spec)
    images.samples = [(path, int(t)) for (path, _), t in zip(images.samples, labels, strict=True)]
    return images, labels, images.classes


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
    unreadable: np.ndarray | None = None  # sampled positions left out by skip_unreadable

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    @property
    def example_input(self) -> torch.Tensor:
        return self.x[:1].clone(memory_format=torch.contiguous_format)

    def source_digest(self) -> str:
        """Which items of which data these are, read how: the spec, the positions' digest, the
        count, the preprocessing, a text set's tokenizer and window, and the class map (what the
        scan's journal and verification's memo file are keyed by)."""
        d = self.description
        text = f"{d.get('spec')}|{d.get('indices_sha256')}|{d.get('n')}|{d.get('preprocess')}"
        if d.get("tokenizer"):  # text: the same ids need the same tokenizer and window
            text += f"|{d['tokenizer']}|{d.get('seq_len')}"
        # the labels depend on a class map; without one, older journals keep matching
        return text + (f"|{d['class_map']}" if d.get("class_map") is not None else "")

    def content_digest(self) -> str:
        """A digest of the items' values and labels: other contents at the same positions (an
        edited file) give another."""
        import hashlib

        h = hashlib.sha256()
        for t in (self.x, self.y):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def split(self, n_first: int, seed: int, roles: tuple[str, str] = ("first part", "second part")
              ) -> tuple[EvalSet, EvalSet]:
        """Two disjoint parts: ``n_first`` items, stratified by label and seeded, and the rest;
        each part's description says its role and has its own index digest."""
        labels = self.y.cpu().numpy() if self.y.dim() == 1 else np.zeros(len(self))
        first = np.sort(stratified_indices(labels, n_first, seed))
        rest = np.setdiff1d(np.arange(len(self)), first)
        return self._part(first, roles[0]), self._part(rest, roles[1])

    def _part(self, pos: np.ndarray, role: str) -> EvalSet:
        sel = torch.as_tensor(pos, dtype=torch.long, device=self.x.device)
        indices = self.indices[pos] if self.indices is not None else None
        desc = {**self.description, "n": len(pos), "role": role}
        if indices is not None:
            desc["indices_sha256"] = _digest(indices)
        return EvalSet(self.x.index_select(0, sel), self.y.index_select(0, sel.to(self.y.device)), self.classes,
                       desc, indices)

    def in_layout(self, channels_last: bool) -> EvalSet:
        """The same data with 4-D inputs in channels-last memory order (``channels_last``) or
        contiguous; itself when they already are (see ``_eval.channels_last_wins``)."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if self.x.dim() != 4 or self.x.is_contiguous(memory_format=fmt):
            return self
        return dataclasses.replace(self, x=self.x.contiguous(memory_format=fmt))

    def to(self, device: torch.device | str) -> EvalSet:
        """The same data with its tensors on ``device`` (itself when already there)."""
        dev = torch.device(device)
        if self.x.device == dev:
            return self
        return EvalSet(self.x.to(dev), self.y.to(dev), self.classes, self.description, self.indices,
                       self.unreadable)


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
        raise _NoSamples(f"The data {spec} holds no samples{where}")
    idx = candidates[stratified_indices(labels[candidates], n, seed)]
    bad: list[_Unreadable] = []
    unreadable = None
    if isinstance(ds, (_Normalized, _Tokens)):
        x, y = ds.x[torch.from_numpy(idx)], ds.y[torch.from_numpy(idx)]
    else:
        # the workers only decode; batching and every error happen here, in the main process
        loader = DataLoader(Subset(ds, idx.tolist()), batch_size=256, shuffle=False,
                            num_workers=_workers(workers, len(idx)), collate_fn=_as_list)
        items: list[Any] = [item for batch in loader for item in batch]
        _raise_refused(items)
        keep = np.array([not isinstance(item, _Unreadable) for item in items], dtype=bool)
        bad = [item for item in items if isinstance(item, _Unreadable)]
        if bad and not spec.skip_unreadable:
            raise DataSpecError(unreadable_message(bad, spec))
        if not keep.any():
            # outside an evaluation sample, "nothing readable left" is "nothing left"
            error = _NoSamples if exclude is not None else DataSpecError
            raise error(f"None of the {len(items)} sampled images of {spec} can be read "
                        f"(e.g. {bad[0].path}: {bad[0].reason}).")
        unreadable = idx[~keep]
        idx = idx[keep]
        x, y = _stack([item for item in items if not isinstance(item, _Unreadable)])
    labelled = y.numpy()[y.numpy() >= 0]  # -1: an item without a label (text for a language model)
    counts = np.bincount(labelled, minlength=len(classes)).tolist()
    desc = {**spec.to_dict(), "n_available": int(len(candidates)), "n": int(len(y)), "seed": seed,
            "per_class": counts, "input_shape": list(x.shape[1:]),
            "indices_sha256": _digest(idx)}
    if bad:
        desc["unreadable_skipped"] = len(bad)
        desc["unreadable"] = [f"{b.path}: {b.reason}" for b in bad[:10]]
        desc["n_requested"] = n  # the sample drawn before the skipping: draw it again with this
    return EvalSet(x.contiguous(), y, classes, desc, idx, unreadable)


def check_classes_fit(classes: Sequence[str], spec: DataSpec | Mapping[str, Any], n_outputs: int,
                      flag: str = "--data") -> None:
    """Raise DataSpecError unless the data's labels are the model's ``n_outputs`` classes.

    Without a class map the classes are numbered in sorted order from 0, which is right only when
    they are exactly the model's classes: a different count is an error either way (more classes
    than outputs would fail in the loss; fewer would silently score against the wrong outputs).
    With a map, every mapped index must be an output of the model.
    """
    d = spec.to_dict() if isinstance(spec, DataSpec) else dict(spec)
    where, k = d.get("spec", "the data"), len(classes)
    names = ", ".join(classes[:4]) + (", ..." if k > 4 else "")
    cmap = d.get("class_map")
    if cmap is not None:
        wrong = [(c, cmap[c]) for c in classes if c in cmap and int(cmap[c]) >= n_outputs]
        if wrong:
            c, i = wrong[0]
            raise DataSpecError(f"--class-map maps {c!r} to output {i}, but the model has "
                                f"{n_outputs} outputs (0 to {n_outputs - 1}). Fix the map, or "
                                f"check --model.")
        return
    if k > n_outputs:
        raise DataSpecError(f"{flag} {where} has {k} classes ({names}) but the model has {n_outputs} "
                            f"outputs. Check {flag} and --model (e.g. --model-arg "
                            f"num_classes={k}), or map each class folder to an output with "
                            f"--class-map FILE.json.")
    if k < n_outputs:
        raise DataSpecError(f"{flag} {where} has {k} classes ({names}) but the model has {n_outputs} "
                            f"outputs: numbered 0 to {k - 1} in sorted order, the labels are right "
                            f"only if these are the model's first {k} classes. Pass --class-map "
                            f"FILE.json to map each class folder to its output index, or use "
                            f"--task agreement, which needs no labels.")


class _NoSamples(DataSpecError):
    """No candidate is left to sample (e.g. outside the evaluation sample)."""


def unreadable_message(bad: Sequence[_Unreadable], spec: DataSpec) -> str:
    """One line naming the images that cannot be read, and the two ways out."""
    first = "; ".join(f"{b.path} ({b.reason})" for b in bad[:2])
    more = f"; and {len(bad) - 2} more" if len(bad) > 2 else ""
    n = f"{len(bad)} images" if len(bad) > 1 else "An image"
    return (f"{n} of {spec} cannot be read: {first}{more}. Replace or delete "
            f"{'them' if len(bad) > 1 else 'it'}, or pass --skip-bad-images to leave unreadable "
            f"images out (they are counted and reported).")


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
        exclude = eval_set.indices
        if exclude is not None and eval_set.unreadable is not None:
            exclude = np.concatenate([exclude, eval_set.unreadable])  # known bad: not again
        cal = load_eval_set(spec, n, seed + 1, exclude=exclude)
        cal.description["role"] = "calibration (disjoint from the evaluation sample)"
    except _NoSamples:
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


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _stack(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(b[0].shape) for b in items}
    if len(shapes) > 1:
        raise DataSpecError(f"The images have different sizes ({', '.join(map(str, sorted(shapes)[:3]))}), "
                            f"so they cannot be batched. Pass --crop N to cut them to one size (with --resize N "
                            f"to scale the shorter side first).")
    return torch.stack([b[0] for b in items]), torch.tensor([int(b[1]) for b in items])


def _collate(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack a batch; an unreadable image is an error naming the file."""
    _raise_refused(batch)
    bad = [b for b in batch if isinstance(b, _Unreadable)]
    if bad:
        raise DataSpecError(f"Cannot read the image {bad[0].path} ({bad[0].reason}).")
    return _stack(batch)


class _TrainLoader(DataLoader[Any]):
    """Batches the decoded items in the main process: an unreadable image is a clean error naming
    the file (not a worker's traceback), or, with ``skip``, left out and listed in ``skipped``."""

    def __init__(self, *args: Any, spec: DataSpec, classes: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.classes = classes
        self.skipped: list[_Unreadable] = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        for items in super().__iter__():
            if not isinstance(items, list):  # tensors (digits): nothing to decode
                yield items
                continue
            _raise_refused(items)
            good = [item for item in items if not isinstance(item, _Unreadable)]
            bad = [item for item in items if isinstance(item, _Unreadable)]
            if bad and not self.spec.skip_unreadable:
                raise DataSpecError(unreadable_message(bad, self.spec))
            self.skipped += bad
            if good:
                yield _stack(good)


def train_loader(spec: DataSpec, batch_size: int, seed: int, *, augment: bool = False,
                 n: int | None = None, workers: int = 2) -> DataLoader[Any]:
    """A shuffled, seeded loader over the training data (optionally a stratified subset of ``n``).

    Unreadable images are an error naming the file, or, with ``spec.skip_unreadable``, left out
    of their batch and listed in the loader's ``skipped``.
    """
    ds, labels, classes = open_dataset(spec, augment=augment)
    if n is not None and n < len(labels):
        ds = Subset(ds, stratified_indices(labels, n, seed).tolist())
    g = torch.Generator().manual_seed(seed)
    if isinstance(ds, (_Normalized, _Tokens)):
        return _TrainLoader(TensorDataset(ds.x, ds.y), batch_size=batch_size, shuffle=True,
                            generator=g, drop_last=False, num_workers=_workers(workers, len(labels)),
                            collate_fn=_collate, persistent_workers=False, spec=spec,
                            classes=classes)
    return _TrainLoader(ds, batch_size=batch_size, shuffle=True, generator=g, drop_last=False,
                        num_workers=_workers(workers, len(labels)), collate_fn=_as_list,
                        persistent_workers=False, spec=spec, classes=classes)
