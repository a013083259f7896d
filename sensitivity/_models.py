"""Resolve a model spec string to a ``torch.nn.Module`` and load its weights.

Model specs:

- ``torchvision:resnet18``: a torchvision classification model, built without downloading weights;
- ``sensplan:digits_cnn``: a model from sensplan's own registry (see :func:`list_models`);
- ``path/to/file.py:factory``: a factory function in a Python file;
- ``package.module:factory``: a factory function by import path;
- ``pickle:model.pt``: a whole pickled ``nn.Module`` (runs arbitrary code: needs ``allow_pickle``);
- ``hf:DIR`` or ``hf:ORG/NAME``: a Hugging Face ``transformers`` model from a ``save_pretrained``
  folder or the local hub cache (the ``hf`` extra; see :mod:`sensplan.sensitivity._hf`).

Keyword arguments for the factory are given separately (``kwargs``), e.g. ``{"num_classes": 10}``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensplan._errors import CheckpointError, ModelSpecError, first_line

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: make ``fn`` available as the model spec ``sensplan:<fn.__name__>``.

    A name that is already taken raises ``ValueError`` instead of silently replacing the model.
    """
    if fn.__name__ in _REGISTRY and _REGISTRY[fn.__name__] is not fn:
        raise ValueError(f"A model named {fn.__name__!r} is already registered. Rename the factory.")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Names in sensplan's model registry matching a shell-style ``pattern``."""
    import fnmatch

    _ensure_builtin_models()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _ensure_builtin_models() -> None:
    # The built-in models register themselves on import.
    from sensplan.sensitivity import _zoo  # noqa: F401


def _closest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@dataclass(frozen=True)
class ModelSpec:
    """What model to build: a spec string (see the module docstring) and factory keyword arguments."""

    source: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ModelSpecError("The model spec must be a non-empty string such as "
                                 "'torchvision:resnet18' or 'examples/cifar_resnet.py:resnet20'.")
        if ":" not in self.source:
            raise ModelSpecError(
                f"The model spec {self.source!r} has no ':'. Use 'torchvision:NAME', "
                f"'sensplan:NAME', 'path/to/file.py:FACTORY', 'package.module:FACTORY', "
                f"'pickle:FILE' or 'hf:DIR'.")
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def file(self) -> str | None:
        """The file the spec reads (a factory's .py file, a pickle), or None (a registry name, a
        package module)."""
        prefix, _, rest = self.source.partition(":")
        if prefix == "pickle":
            return rest
        if prefix == "hf":
            return None
        module_part = self.source.rpartition(":")[0]
        if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
            return module_part
        return None

    def to_dict(self) -> dict[str, Any]:
        """The spec as artifacts record it; a file it reads is recorded with its resolved path and
        sha256 too, so :meth:`from_record` finds it from another working directory."""
        out: dict[str, Any] = {"source": self.source, "kwargs": dict(self.kwargs)}
        prefix, _, rest = self.source.partition(":")
        if prefix == "hf" and os.path.isdir(rest):  # found again from another working directory
            out["dir"] = os.path.realpath(rest)
        f = self.file
        if f is not None and Path(f).is_file():
            from sensplan._artifacts import file_sha256

            out.update(file=os.path.realpath(f), file_sha256=file_sha256(f))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(source=d["source"], kwargs=d.get("kwargs", {}))

    @classmethod
    def from_record(cls, d: Mapping[str, Any], *, beside: str | os.PathLike[str] | None = None,
                    artifact: str = "the artifact", fix: str = "") -> ModelSpec:
        """The spec an artifact recorded, with its file found from here: beside the artifact
        (``beside``: its folder) first, then at the resolved path it was recorded with, then as
        written. A file found elsewhere than written is named by its new path. A file that is
        nowhere raises a ModelSpecError listing where it looked and naming the fix (``fix``: the
        remedy of the caller, e.g. a flag)."""
        spec = cls.from_dict(d)
        prefix, _, rest = spec.source.partition(":")
        if prefix == "hf" and not os.path.isdir(rest) and d.get("dir") and os.path.isdir(d["dir"]):
            return cls(f"hf:{d['dir']}", spec.kwargs)
        f = spec.file
        if f is None:
            return spec
        from sensplan._artifacts import locate

        found = (locate(f, resolved=d.get("file"), sha256=d.get("file_sha256"), beside=beside)
                 or locate(f, resolved=d.get("file"), beside=beside))  # the same file, edited since
        if found is None:
            places = []
            if beside is not None:
                places.append(f"beside {artifact} ({os.path.join(beside, Path(f).name)})")
            if d.get("file"):
                places.append(f"where it was ({d['file']})")
            if not Path(f).is_absolute():
                places.append(f"{f} from {str(Path.cwd())!r}")
            raise ModelSpecError(
                f"The model file {f!r} that {artifact} records is in none of these places: "
                f"{'; '.join(places)}. Copy it beside {artifact}{fix}.")
        if os.path.realpath(found) == os.path.realpath(f):
            return spec
        prefix = "pickle:" if spec.source.startswith("pickle:") else ""
        attr = "" if prefix else ":" + spec.source.rpartition(":")[2]
        return cls(f"{prefix}{found}{attr}", spec.kwargs)


def build_model(spec: ModelSpec, *, allow_pickle: bool = False) -> nn.Module:
    """Build the (untrained or factory-initialized) model a spec names, in eval mode, on the CPU."""
    prefix, _, rest = spec.source.partition(":")
    if prefix == "torchvision":
        model = _build_torchvision(rest, spec.kwargs)
    elif prefix == "sensplan":
        _ensure_builtin_models()
        if rest not in _REGISTRY:
            raise ModelSpecError(
                f"Unknown sensplan model {rest!r}.{_closest(rest, list(_REGISTRY))} "
                f"Known: {', '.join(sorted(_REGISTRY))}.")
        model = _call_factory(_REGISTRY[rest], spec)
    elif prefix == "pickle":
        model = _load_pickled(rest, allow_pickle)
    elif prefix == "hf":
        from sensplan.sensitivity._hf import load_hf_model

        model = load_hf_model(rest, dict(spec.kwargs))
    else:
        module_part, _, attr = spec.source.rpartition(":")
        fn = _resolve_factory(module_part, attr)
        if isinstance(fn, nn.Module):  # a model built at import: a copy (the file's own is never changed)
            if spec.kwargs:
                raise ModelSpecError(f"{spec.source!r} is a model (a {type(fn).__name__}), not a function that "
                                     f"builds one: --model-arg needs a factory. Drop --model-arg, or point --model "
                                     f"at a factory.")
            try:
                model = copy.deepcopy(fn)
            except Exception as e:  # noqa: BLE001 - the user's module: say which and why
                raise ModelSpecError(f"{spec.source!r} is a model that cannot be copied ({type(e).__name__}: "
                                     f"{first_line(e)}); point --model at a function that builds it.") from None
        else:
            model = _call_factory(fn, spec)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"The model spec {spec.source!r} returned an object of type {type(model).__name__}, "
                             f"not a torch.nn.Module. Point it at a function that builds the model.")
    return model.eval()


def _build_torchvision(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ModelSpecError(f"Unknown torchvision classification model {name!r}.{_closest(name, names)} "
                             f"List them with: python -c \"import torchvision; "
                             f"print(torchvision.models.list_models(module=torchvision.models))\"")
    if "weights" in kwargs and kwargs["weights"] not in (None, "None"):
        raise ModelSpecError("sensplan never downloads weights. Build the model without "
                             "'weights' and pass a local checkpoint with --weights FILE.")
    kw = {k: v for k, v in kwargs.items() if k != "weights"}
    try:
        model: nn.Module = torchvision.models.get_model(name, weights=None, **kw)
        return model
    except TypeError as e:
        raise ModelSpecError(f"torchvision:{name} does not accept {kw}: {e}. Check --model-arg.") from None
    except Exception as e:  # noqa: BLE001 - e.g. a ValueError for an argument value it refuses
        raise ModelSpecError(f"Building torchvision:{name} with {kw} failed: {_one_line(e)}. Check "
                             f"--model-arg (--verbose shows the traceback).") from e


def _resolve_factory(module_part: str, attr: str) -> Callable[..., Any]:
    if not attr:
        raise ModelSpecError(f"The model spec {module_part + ':'!r} names no factory after ':'.")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ModelSpecError(f"The model file {module_part!r} does not exist "
                                 f"(looked in {str(Path.cwd())!r}). Check the path.")
        mod_name = "sensplan_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            imp_spec = importlib.util.spec_from_file_location(mod_name, path)
            if imp_spec is None or imp_spec.loader is None:
                raise ModelSpecError(f"Cannot import {module_part!r} as a Python file.")
            module = importlib.util.module_from_spec(imp_spec)
            sys.modules[mod_name] = module  # dataclasses and pickling look modules up by name
            try:
                imp_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[mod_name]
                raise ModelSpecError(f"Importing {module_part!r} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ModelSpecError(f"Cannot import {module_part!r} ({e}). Is the package installed, "
                                 f"or did you mean a file path ending in .py?") from None
    if not hasattr(module, attr):
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ModelSpecError(f"{module_part!r} has no {attr!r}.{_closest(attr, public)}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ModelSpecError(f"{module_part}:{attr} is not callable.")
    return fn  # type: ignore[no-any-return]


def _call_factory(fn: Callable[..., Any], spec: ModelSpec) -> Any:
    try:
        inspect.signature(fn).bind(**spec.kwargs)
    except TypeError as e:
        raise ModelSpecError(f"The factory {spec.source!r} does not accept {dict(spec.kwargs)}: {e}. "
                             f"Check --model-arg.") from None
    except ValueError:  # signature not introspectable: just call it
        pass
    try:
        return fn(**spec.kwargs)
    except Exception as e:  # noqa: BLE001 - the user's factory: any failure is theirs to fix
        args = f" with {dict(spec.kwargs)}" if spec.kwargs else ""
        raise ModelSpecError(f"Calling the model factory {spec.source!r}{args} failed: "
                             f"{_one_line(e)}. Fix the factory or its --model-arg values "
                             f"(--verbose shows the traceback).") from e


def _one_line(e: BaseException) -> str:
    """``Type: message`` shortened to its first line (its first sentence when that is long), for
    errors that must fit one line."""
    first = first_line(e, 10**6)
    if len(first) > 160 and ". " in first[:300]:
        first = first[:first.index(". ") + 1]
    first = (first if len(first) <= 300 else first[:297] + "...").rstrip(" .!?")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _load_pickled(path: str, allow_pickle: bool) -> nn.Module:
    if not allow_pickle:
        raise ModelSpecError(f"Loading a pickled model ({path!r}) runs code from the file. If you trust "
                             f"it, pass --allow-pickle; otherwise give a model factory and a state dict.")
    if not Path(path).is_file():
        raise ModelSpecError(f"The pickled model file {path!r} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file, or one whose classes cannot be imported
        raise ModelSpecError(f"Cannot unpickle the model file {path!r}: {_one_line(e)}. If it needs "
                             f"the module that defines the model class, make it importable; otherwise "
                             f"give a model factory as --model and a state dict as --weights.") from e
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(f"{path!r} holds a {type(obj).__name__}, not a pickled nn.Module. "
                             f"For a state dict, give the model factory as --model and the file as --weights.")
    return obj


_NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema", "module")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint with ``weights_only=True``; unwrap common nesting and ``module.`` prefixes."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise CheckpointError(f"The weights file {str(p)!r} {what}. Check --weights.")
    if p.stat().st_size == 0:
        raise CheckpointError(f"The weights file {str(p)!r} is empty (0 bytes): it was probably cut "
                              f"off while being written or copied. Save or copy it again.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(_unreadable_checkpoint(p, e)) from None
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
            inner = next((obj[k] for k in _NESTING_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        keys = list(obj)[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{str(p)!r} is not a state dict (found {keys}). Save model.state_dict(), "
                              f"or a dict with the state dict under 'state_dict'.")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _unreadable_checkpoint(p: Path, e: Exception) -> str:
    """Why ``torch.load(p, weights_only=True)`` failed, and what to do.

    Only a file that is a real pickle of Python objects (the unpickler met a class it does not
    allow: "Unsupported global") gets the advice to load it as a pickled model; random bytes, a
    truncated download or another format are called what they are. Unpickling those would be
    pointless, and unpickling a damaged file from an unknown source is dangerous.
    """
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        cls = found.group(1)
        return (f"{str(p)!r} holds Python objects besides tensors (it refers to {cls}), so it is "
                f"probably a whole pickled model or a training checkpoint. sensplan reads state dicts "
                f"with weights_only=True and does not unpickle objects by default. Save "
                f"model.state_dict() instead; or, only if you trust the file, use --model pickle:{p} "
                f"--allow-pickle.")
    operand = re.search(r"Unsupported operand \d+", text)
    if operand or isinstance(e, (EOFError, OSError, RuntimeError)):
        # random bytes, a cut-off file, another format (a .npy, a .py file, an ONNX model). The
        # first line of torch's own message would suggest weights_only=False: not for such a file.
        detail = f"UnpicklingError: {operand.group(0)}" if operand else _one_line(e)
        with open(p, "rb") as f:
            zipped = f.read(2) == b"PK"
        kind = ("a damaged or truncated zip archive" if zipped
                else "not a PyTorch checkpoint, or it is damaged or truncated")
        return (f"Cannot read the weights file {str(p)!r}: it is {kind} (torch.load: {detail}). "
                f"Pass a file written by torch.save(model.state_dict(), PATH), or copy or download "
                f"it again.")
    return f"Cannot read the weights file {str(p)!r}: {_one_line(e)}. Check --weights."


def _is_tensor_dict(obj: Mapping[Any, Any]) -> bool:
    vals = list(obj.values())
    return bool(vals) and sum(isinstance(v, torch.Tensor) for v in vals) >= max(1, len(vals) // 2)


def load_weights_(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint into ``model`` in place (strict); explain mismatches."""
    sd = read_state_dict(path)
    own = model.state_dict()
    for k in own:  # checkpoints from PyTorch < 0.4.1 have no BatchNorm step counters
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k].clone()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing from the file: {_few(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch: {_few(wrong)}")
        raise CheckpointError(f"The weights in {str(path)!r} do not fit the model ({'; '.join(parts)}). "
                              f"Check that --model builds the architecture the checkpoint was saved from "
                              f"(e.g. num_classes via --model-arg).")
    model.load_state_dict(sd, strict=True)
    return model


def _few(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_model(spec: ModelSpec, weights: str | os.PathLike[str] | None = None, *,
               allow_pickle: bool = False, init_seed: int = 0) -> nn.Module:
    """Build the model a spec names and load ``weights`` into it; returns it in eval mode on the CPU.

    Without ``weights`` the factory's random initialisation runs under ``torch.manual_seed(init_seed)``
    (the global random state is left as it was), so every command builds the same random model."""
    if weights is None and not spec.source.startswith("pickle:"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return build_model(spec, allow_pickle=allow_pickle).eval()
    model = build_model(spec, allow_pickle=allow_pickle)
    if weights is not None:
        load_weights_(model, weights)
    return model.eval()


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` of ``model`` is; return the module it replaced."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = owner.get_submodule(child)
    setattr(owner, child, new)
    return old


def architecture_digest(model: nn.Module) -> str:
    """A digest of the model's state-dict names and shapes: equal for the same architecture."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return h.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's state-dict values: equal only for bit-identical weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # bf16 too
    return h.hexdigest()[:16]
