"""The compressed-model file (``model.sensplan``): packed integer weights with their scales.

Layout (little-endian)::

    b"SENSPLAN"  8 bytes magic
    uint32       container version (1)
    uint64       header length H
    H bytes      zlib-compressed JSON header
    ...          tensor payload: each tensor's bytes at header["tensors"][key]["offset"]

A quantized weight is stored as its codes packed at ``bits`` bits each (offset binary, see
``sensitivity._quant.pack_codes``) followed by one float32 scale per output channel; every other
tensor as raw bytes of its dtype. The header also records the model spec, the channels removed
from each group (root indices, in the original model's numbering) and the plan that was applied,
so :func:`load_compressed` can rebuild the pruned architecture and load the weights.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensplan._artifacts import atomic_write
from sensplan._errors import ArtifactError, IncompatibleModelError
from sensplan.sensitivity._groups import PruningGraph
from sensplan.sensitivity._models import ModelSpec, architecture_digest, build_model
from sensplan.sensitivity._quant import (
    FLOAT_BITS,
    dequantize,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)

MAGIC = b"SENSPLAN"
CONTAINER_VERSION = 1
COMPRESSED_FORMAT = "sensplan.compressed"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
           "uint8": torch.uint8, "bool": torch.bool}


@dataclass
class CompressedModel:
    """A pruned, quantized model and what is needed to store it compactly.

    ``module`` runs like any model (quantized weights are held dequantized in float32);
    ``removed`` maps group root FQN -> removed channel indices; ``codes`` maps layer FQN ->
    ``(int8 codes, float32 scales, bits)`` for every quantized layer.
    """

    module: nn.Module
    removed: dict[str, list[int]]
    codes: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    model_spec: ModelSpec | None = None
    original_digest: str = ""
    input_shape: tuple[int, ...] = ()
    plan: Mapping[str, Any] = field(default_factory=dict)

    def payload_bytes(self) -> int:
        """Bytes of tensor data the file holds (without the header)."""
        total = 0
        quantized = {f"{k}.weight" for k in self.codes}
        for key, t in self.module.state_dict().items():
            if key in quantized:
                q, s, b = self.codes[key[: -len(".weight")]]
                total += packed_nbytes(q.numel(), b) + s.numel() * 4
            else:
                total += t.numel() * t.element_size()
        return total


def save_compressed(cm: CompressedModel, path: str | os.PathLike[str]) -> int:
    """Atomically write ``cm`` to ``path``; return the file size in bytes."""
    blob = io.BytesIO()
    entries: dict[str, Any] = {}
    quantized = {f"{k}.weight": k for k in cm.codes}
    for key, t in cm.module.state_dict().items():
        entry: dict[str, Any] = {"offset": blob.tell(), "shape": list(t.shape)}
        if key in quantized:
            q, scale, bits = cm.codes[quantized[key]]
            if tuple(q.shape) != tuple(t.shape):
                raise ArtifactError(f"Internal: codes of {key} have shape {tuple(q.shape)}, weight {tuple(t.shape)}.")
            blob.write(pack_codes(q, bits))
            entry.update(dtype="float32", bits=bits, scales_offset=blob.tell())
            blob.write(scale.detach().float().contiguous().numpy().tobytes())
        else:
            dtype = str(t.dtype).replace("torch.", "")
            if dtype not in _DTYPES:
                raise ArtifactError(f"Cannot store tensor {key} of dtype {dtype}.")
            entry.update(dtype=dtype, bits=FLOAT_BITS if t.is_floating_point() else t.element_size() * 8)
            data = t.detach().contiguous()
            raw = data.view(torch.int16).numpy().tobytes() if data.dtype == torch.bfloat16 else data.numpy().tobytes()
            blob.write(raw)
        entry["nbytes"] = blob.tell() - entry["offset"]
        entries[key] = entry
    header = {"format": COMPRESSED_FORMAT, "schema_version": 1,
              "model": {"spec": cm.model_spec.to_dict() if cm.model_spec else None,
                        "architecture_digest": cm.original_digest,
                        "input_shape": list(cm.input_shape)},
              "removed": cm.removed, "tensors": entries, "plan": dict(cm.plan)}
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    payload = blob.getvalue()

    def write(f: Any) -> None:
        f.write(MAGIC)
        f.write(struct.pack("<IQ", CONTAINER_VERSION, len(head)))
        f.write(head)
        f.write(payload)

    atomic_write(path, write)
    return Path(path).stat().st_size


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], bytes]:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"The compressed model {str(p)!r} does not exist. Create it with `sensplan apply`.")
    raw = p.read_bytes()
    if raw[:8] != MAGIC:
        raise ArtifactError(f"{str(p)!r} is not a sensplan compressed model (bad magic bytes).")
    version, hlen = struct.unpack("<IQ", raw[8:20])
    if version != CONTAINER_VERSION:
        raise ArtifactError(f"{str(p)!r} is container version {version}; this sensplan reads version "
                            f"{CONTAINER_VERSION}. Use the sensplan version that wrote it.")
    try:
        header = json.loads(zlib.decompress(raw[20:20 + hlen]))
    except (zlib.error, json.JSONDecodeError) as e:
        raise ArtifactError(f"{str(p)!r} has a corrupt header ({e}).") from None
    return header, raw[20 + hlen:]


def load_compressed(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                    allow_pickle: bool = False) -> nn.Module:
    """Rebuild a runnable model from a ``.sensplan`` file.

    ``model`` is a fresh instance of the *original* architecture (it is pruned in place); if omitted,
    it is built from the model spec recorded in the file (the factory must be importable). Quantized
    weights are dequantized to float32. Example::

        model = load_compressed("out/model.sensplan")            # spec from the file
        model = load_compressed("out/model.sensplan", resnet20())  # or bring the architecture
    """
    header, payload = read_header(path)
    info = header["model"]
    if model is None:
        if not info.get("spec"):
            raise ArtifactError(f"{str(path)!r} records no model spec; pass the original architecture as `model`.")
        model = build_model(ModelSpec.from_dict(info["spec"]), allow_pickle=allow_pickle)
    model.eval()
    if info.get("architecture_digest") and architecture_digest(model) != info["architecture_digest"]:
        raise IncompatibleModelError(f"The model given to load {str(path)!r} is not the architecture it was "
                                     f"compressed from. Pass a fresh instance of the original model.")
    if header["removed"]:
        graph = PruningGraph(model, torch.zeros(1, *info["input_shape"]))
        for gid, idxs in header["removed"].items():
            graph.prune_(gid, list(idxs))
    state = {}
    for key, e in header["tensors"].items():
        chunk = payload[e["offset"]: e["offset"] + e["nbytes"]]
        shape = tuple(e["shape"])
        if "scales_offset" in e:
            code_bytes = e["scales_offset"] - e["offset"]
            q = unpack_codes(chunk[:code_bytes], e["bits"], shape)
            scales = torch.from_numpy(np.frombuffer(chunk[code_bytes:], dtype=np.float32).copy())
            state[key] = dequantize(q, scales)
        else:
            dtype = _DTYPES[e["dtype"]]
            if dtype == torch.bfloat16:
                t = torch.from_numpy(np.frombuffer(chunk, dtype=np.int16).copy()).view(torch.bfloat16)
            else:
                t = torch.frombuffer(bytearray(chunk), dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
            state[key] = t.reshape(shape).clone()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise IncompatibleModelError(f"The weights in {str(path)!r} do not fit the rebuilt model: "
                                     f"{str(e).splitlines()[0]}") from None
    return model.eval()
