"""The compressed-model file (``model.sensplan``): each weight stored in the format its plan chose.

Layout (little-endian)::

    b"SENSPLAN"  8 bytes magic
    uint32       container version (4; version 3 files, which have no group-wise scales or zero
                 points, are read too)
    uint64       header length H
    H bytes      zlib-compressed JSON header
    ...          tensor payload: each tensor's parts at header["tensors"][key]["parts"][i]["offset"]

A weight's *values* are float32, float16/bfloat16, or integer codes packed at ``bits`` bits (offset
binary; with a zero point, unsigned) with float32 scales: one per output channel, or one per group
of ``group_size`` values of a row (``scales`` is then rows × groups), and with ``zero_point`` a
``bits``-bit zero point per scale (``zero_points``). Its *layout* (see :mod:`sensplan._effects`) is
dense, a bitmask (one bit per position, then the kept values), CSR (int32 row pointers, 16/32-bit
column indices, values) or N:M (the kept values plus ceil(log2 M) bits of position each). The
header also records the model spec, what each method recorded when it was applied (``records``, in
the order they were applied: the channels a group method removed, a factorized layer's rank, input
quantization parameters) and the applied plan. :func:`load_compressed` builds the original
architecture and lets each method replay its record (``Method.rebuild_``), then loads the tensors:
it knows no method by name.
"""

from __future__ import annotations

import io
import json
import math
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
from sensplan._effects import FLOAT_BITS, index_bits, merge, sparse_layout
from sensplan._errors import ArtifactError, IncompatibleModelError, first_line
from sensplan.sensitivity import (
    METHODS,
    MethodContext,
    ModelSpec,
    QFormat,
    architecture_digest,
    build_model,
    dequantize_codes,
    from_rows,
    get_method,
    magnitude_mask,
    nm_mask,
    pack_codes,
    quantize,
    to_rows,
    unpack_codes,
)

MAGIC = b"SENSPLAN"
CONTAINER_VERSION = 4
#: versions this sensplan reads (4 added group-wise scales and zero points: an older reader would
#: decode a zero-point entry wrongly, so it must refuse the file)
READABLE_VERSIONS = (3, 4)
COMPRESSED_FORMAT = "sensplan.compressed"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int8": torch.int8,
           "uint8": torch.uint8, "bool": torch.bool}


@dataclass
class CompressedModel:
    """A compressed model and what is needed to store it compactly.

    ``module`` runs like any model (stored values are held dequantized in float32); ``records`` is
    ``[(method name, record), ...]`` in the order the methods were applied (what each replays on
    load); ``effects`` maps a weight's state-dict key to its merged effect (how it is stored) and
    ``row_lens`` to the original layer's row length (the CSR index rule). ``codes`` maps a weight's
    key to the integer codes, scales and zero points a method quantized it with
    (``ctx.cache[INT_CODES]``): stored as they are when they decode to the weight exactly, so the
    file holds what the executor ran even where quantizing the result again would pick other scales.
    """

    module: nn.Module
    records: list[tuple[str, Any]]
    effects: dict[str, dict[str, Any]] = field(default_factory=dict)
    row_lens: dict[str, int] = field(default_factory=dict)
    model_spec: ModelSpec | None = None
    original_digest: str = ""
    input_shape: tuple[int, ...] = ()
    plan: Mapping[str, Any] = field(default_factory=dict)
    codes: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def payload_bytes(self) -> int:
        """Bytes of tensor data the file holds (without the header)."""
        return _encode(self, keep_bytes=False)[2]

    def sizes(self) -> tuple[int, int]:
        """(bytes of the file :func:`save_compressed` writes, bytes of its tensor data), without
        writing it."""
        entries, _, payload = _encode(self, keep_bytes=False)
        return 20 + len(_header_blob(self, entries)) + payload, payload


def _pack_uint(values: np.ndarray, bits: int) -> bytes:
    planes = ((values.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack_uint(data: bytes, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits]
    out: np.ndarray = (planes.reshape(n, bits).astype(np.int64) << np.arange(bits, dtype=np.int64)).sum(axis=1)
    return out


def _raw(t: torch.Tensor) -> bytes:
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        return data.view(torch.int16).numpy().tobytes()
    return data.numpy().tobytes()


def _from_raw(chunk: bytes, dtype_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = _DTYPES[dtype_name]
    if dtype == torch.bfloat16:
        t = torch.from_numpy(np.frombuffer(chunk, dtype=np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.frombuffer(bytearray(chunk), dtype=dtype) if chunk else torch.empty(0, dtype=dtype)
    return t.reshape(shape).clone()


def _values(w: torch.Tensor, effect: Mapping[str, Any], codes: Any = None
            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Integer codes, scales and zero points (int; no zero points when symmetric): ``codes`` when
    given and they decode to ``w`` exactly, else ``w`` quantized; or the values in their storage
    dtype (float)."""
    if effect["weight_dtype"] == "int":
        fmt = QFormat.of(effect)
        if codes is not None:
            q, s = codes[0].detach().cpu(), codes[1].detach().cpu()
            z = codes[2].detach().cpu() if codes[2] is not None else None
            if q.shape == w.shape and (z is not None) == fmt.asymmetric and \
                    torch.equal(dequantize_codes(q, s, z, fmt.group_size), w):
                return q, s, z
        return quantize(w, fmt)
    return w.detach().to(_DTYPES[effect["weight_dtype"]]), None, None


def _value_bytes(v: torch.Tensor, effect: Mapping[str, Any]) -> bytes:
    if effect["weight_dtype"] == "int":
        if effect.get("zero_point_bits"):
            return _pack_uint(v.reshape(-1).cpu().numpy(), int(effect["weight_bits"]))
        return pack_codes(v.reshape(-1), int(effect["weight_bits"]))
    return _raw(v.reshape(-1))


def _encode_tensor(w: torch.Tensor, effect: Mapping[str, Any], row_len: int, codes: Any = None
                   ) -> tuple[dict[str, Any], list[bytes]]:
    layout = sparse_layout(effect, row_len)
    values, scales, zero_points = _values(w, effect, codes)
    entry: dict[str, Any] = {"layout": layout, "value_dtype": effect["weight_dtype"],
                             "bits": int(effect["weight_bits"]), "shape": list(w.shape)}
    if scales is not None and effect.get("group_size"):
        entry["group_size"] = int(effect["group_size"])
    if zero_points is not None:
        entry["zero_point"] = True
    parts: list[tuple[str, bytes]] = []
    flat = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.reshape(1, -1)
    if layout == "dense":
        parts.append(("values", _value_bytes(values, effect)))
    elif layout == "nm":
        n, m = (int(v) for v in effect["nm"])
        mask = nm_mask(w, n, m)
        rows = to_rows(mask.to(torch.uint8))
        pad = (-rows.shape[-1]) % m
        padded = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
        pos = torch.nonzero(padded.reshape(-1, m), as_tuple=False)[:, 1].numpy()
        vals = to_rows(values)
        vals = torch.nn.functional.pad(vals, (0, pad)) if pad else vals
        kept = vals.reshape(-1, m)[padded.reshape(-1, m).bool()]
        entry["nm"] = [n, m]
        parts += [("meta", _pack_uint(pos, math.ceil(math.log2(m)))), ("values", _value_bytes(kept, effect))]
        entry["nnz"] = int(kept.numel())
    else:
        # exactly the kept_values(numel, density) positions the plan priced: every non-zero, and
        # where quantization rounded kept values to zero, the next positions as explicit zeros
        mask = (magnitude_mask(w, float(effect["density"])) | (w.detach() != 0)).reshape(flat.shape)
        kept = flat[mask]
        entry["nnz"] = int(kept.numel())
        if layout == "bitmask":
            parts.append(("mask", np.packbits(mask.reshape(-1).numpy(), bitorder="little").tobytes()))
        else:
            counts = mask.sum(dim=1).numpy().astype(np.int64)
            rowptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cols = torch.nonzero(mask, as_tuple=False)[:, 1].numpy()
            ib = index_bits(row_len)
            entry["index_bits"] = ib
            parts += [("rowptr", rowptr.tobytes()),
                      ("colidx", cols.astype(np.uint16 if ib == 16 else np.uint32).tobytes())]
        parts.append(("values", _value_bytes(kept, effect)))
    if scales is not None:
        parts.append(("scales", scales.detach().float().contiguous().numpy().tobytes()))
    if zero_points is not None:
        parts.append(("zero_points", _pack_uint(zero_points.reshape(-1).numpy(), int(effect["weight_bits"]))))
    return entry, _named(entry, parts)


def _named(entry: dict[str, Any], parts: list[tuple[str, bytes]]) -> list[bytes]:
    entry["part_names"] = [name for name, _ in parts]
    return [b for _, b in parts]


def _encode(cm: CompressedModel, keep_bytes: bool = True) -> tuple[dict[str, Any], bytes, int]:
    """(header entries, payload, payload length). With ``keep_bytes=False`` the payload is not
    assembled (b""): raw tensors are only measured, not copied, and the sizes are the same."""
    blob = io.BytesIO()
    entries: dict[str, Any] = {}
    at = 0
    from sensplan.sensitivity import tied_tensors

    state = cm.module.state_dict()
    tied = tied_tensors(state)
    for key, t in state.items():
        t = t.detach()
        if key in tied:  # the same memory as an earlier tensor (a tied LM head): stored once
            entries[key] = {"layout": "tied", "to": tied[key], "parts": [], "part_names": []}
            continue
        eff = cm.effects.get(key)
        if eff is not None and t.is_floating_point() and _stores_specially(eff):
            entry, parts = _encode_tensor(t.cpu().float(), merge([eff]), cm.row_lens.get(key, 1),
                                          cm.codes.get(key))
            lengths = [len(b) for b in parts]
        else:
            dtype = str(t.dtype).replace("torch.", "")
            if dtype not in _DTYPES:
                raise ArtifactError(f"Cannot store tensor {key} of dtype {dtype}.")
            entry = {"layout": "raw", "dtype": dtype, "shape": list(t.shape), "part_names": ["raw"]}
            parts = [_raw(t)] if keep_bytes else []
            lengths = [t.numel() * t.element_size()]
        entry["parts"] = []
        for n in lengths:
            entry["parts"].append([at, n])
            at += n
        if keep_bytes:
            for b in parts:
                blob.write(b)
        entries[key] = entry
    return entries, blob.getvalue(), at


def _stores_specially(eff: Mapping[str, Any]) -> bool:
    e = merge([eff])
    return bool(e["weight_dtype"] != "float32" or e["weight_bits"] != FLOAT_BITS or e["density"] < 1.0)


def save_compressed(cm: CompressedModel, path: str | os.PathLike[str]) -> int:
    """Atomically write ``cm`` to ``path``; return the file size in bytes."""
    entries, payload, _ = _encode(cm)
    head = _header_blob(cm, entries)

    def write(f: Any) -> None:
        f.write(MAGIC)
        f.write(struct.pack("<IQ", CONTAINER_VERSION, len(head)))
        f.write(head)
        f.write(payload)

    atomic_write(path, write)
    return Path(path).stat().st_size


def _header_blob(cm: CompressedModel, entries: dict[str, Any]) -> bytes:
    header = {"format": COMPRESSED_FORMAT, "schema_version": CONTAINER_VERSION,
              "model": {"spec": cm.model_spec.to_dict() if cm.model_spec else None,
                        "architecture_digest": cm.original_digest,
                        "input_shape": list(cm.input_shape)},
              "records": [[name, record] for name, record in cm.records], "tensors": entries,
              "plan": dict(cm.plan)}
    return zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)


def payload_size(path: str | os.PathLike[str]) -> int:
    """Bytes of tensor data in a file :func:`save_compressed` wrote (its size less the header)."""
    with open(path, "rb") as f:
        start = f.read(20)
    if len(start) < 20 or start[:8] != MAGIC:
        raise ArtifactError(f"{str(path)!r} is not a sensplan compressed model.")
    return Path(path).stat().st_size - 20 - int(struct.unpack("<IQ", start[8:20])[1])


def read_header(path: str | os.PathLike[str], *, payload: bool = True) -> tuple[dict[str, Any], bytes]:
    """The header of a compressed model file and its tensor payload (``payload=False``: the header
    only, ``b""`` for the payload; the file's size is still checked against the tensors' extent)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"The compressed model {str(p)!r} does not exist. Create it with `sensplan apply`.")
    again = "Re-create it with `sensplan apply`."
    with p.open("rb") as f:
        head = f.read(20)
        if len(head) < 20 and MAGIC.startswith(head[:8]):  # cut inside the magic, version or length
            raise ArtifactError(f"{str(p)!r} is truncated (only {len(head)} bytes). {again}")
        if head[:8] != MAGIC:
            raise ArtifactError(f"{str(p)!r} is not a sensplan compressed model (bad magic bytes).")
        version, hlen = struct.unpack("<IQ", head[8:20])
        if version not in READABLE_VERSIONS:
            raise ArtifactError(f"{str(p)!r} is container version {version}; this sensplan reads versions "
                                f"{' and '.join(map(str, READABLE_VERSIONS))}. Re-create it with `sensplan apply`, "
                                f"or load it with the sensplan version that wrote it.")
        blob = f.read(hlen)
        if len(blob) < hlen:
            raise ArtifactError(f"{str(p)!r} is truncated: its header needs {hlen} bytes, the file has "
                                f"{len(blob)}. {again}")
        try:
            header = json.loads(zlib.decompress(blob))
        except (zlib.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{str(p)!r} has a corrupt header ({e}). {again}") from None
        if (not isinstance(header, dict) or header.get("format") != COMPRESSED_FORMAT
                or any(k not in header for k in ("model", "records", "tensors"))):
            raise ArtifactError(f"{str(p)!r} has a corrupt header (not a {COMPRESSED_FORMAT} header "
                                f"with model, records and tensors). {again}")
        data = f.read() if payload else b""
    size = len(data) if payload else p.stat().st_size - 20 - hlen
    end = max((o + n for e in header.get("tensors", {}).values() for o, n in e.get("parts", [])), default=0)
    if end > size:
        raise ArtifactError(f"{str(p)!r} is truncated: its tensors need {end} bytes of payload, the file "
                            f"has {size}. Re-create it with `sensplan apply`.")
    return header, data


def _decode_values(chunk: bytes, e: Mapping[str, Any], n: int) -> torch.Tensor:
    if e["value_dtype"] == "int":
        if e.get("zero_point"):
            return torch.from_numpy(_unpack_uint(chunk, int(e["bits"]), n)).float()
        return unpack_codes(chunk, int(e["bits"]), (n,)).float()
    return _from_raw(chunk, e["value_dtype"], (n,)).float()


def _decode_tensor(e: Mapping[str, Any], parts: dict[str, bytes]) -> torch.Tensor:
    shape = tuple(e["shape"])
    numel = int(np.prod(shape)) if shape else 1
    rows = shape[0] if shape else 1
    n = numel if e["layout"] == "dense" else int(e["nnz"])
    dense = _scatter(e, parts, _decode_values(parts["values"], e, n))
    if "scales" in parts:
        scales = torch.from_numpy(np.frombuffer(parts["scales"], dtype=np.float32).copy())
        zp = None
        if e.get("zero_point"):
            zp = torch.from_numpy(_unpack_uint(parts["zero_points"], int(e["bits"]), scales.numel()))
        kept = _scatter(e, parts, torch.ones(n)) if e["layout"] != "dense" and zp is not None else None
        dense = dequantize_codes(dense.reshape(shape), scales.reshape(rows, -1),
                                 None if zp is None else zp.reshape(rows, -1), int(e.get("group_size", 0)))
        if kept is not None:  # a position the sparse layout did not store is 0, not -zero_point * scale
            dense = dense.reshape(rows, -1) * (kept != 0)
    return dense.reshape(shape).float()


def _scatter(e: Mapping[str, Any], parts: dict[str, bytes], vals: torch.Tensor) -> torch.Tensor:
    """The (rows, row length) matrix with the stored ``vals`` at the positions the layout stored,
    0 elsewhere."""
    shape = tuple(e["shape"])
    numel = int(np.prod(shape)) if shape else 1
    rows = shape[0] if shape else 1
    layout = e["layout"]
    if layout == "dense":
        dense = vals.reshape(rows, -1)
    elif layout == "nm":
        n, m = e["nm"]
        row_shape = (shape[0], 1, shape[1]) if len(shape) == 2 else (shape[0], int(np.prod(shape[2:])), shape[1])
        pad = (-row_shape[-1]) % m
        nnz = int(e["nnz"])
        pos = torch.from_numpy(_unpack_uint(parts["meta"], math.ceil(math.log2(m)), nnz))
        groups = torch.zeros(nnz // n, m)
        groups.scatter_(1, pos.reshape(-1, n), vals.reshape(-1, n))
        padded = groups.reshape(*row_shape[:-1], row_shape[-1] + pad)
        dense = from_rows(padded[..., : row_shape[-1]], torch.Size(shape)).reshape(rows, -1)
    else:
        dense = torch.zeros(rows, numel // max(1, rows))
        if layout == "bitmask":
            mask = np.unpackbits(np.frombuffer(parts["mask"], dtype=np.uint8), bitorder="little")[:numel]
            dense.reshape(-1)[torch.from_numpy(mask.astype(bool))] = vals
        else:
            rowptr = np.frombuffer(parts["rowptr"], dtype=np.int32)
            cols = np.frombuffer(parts["colidx"], dtype=np.uint16 if e.get("index_bits") == 16 else np.uint32)
            r = np.repeat(np.arange(rows), np.diff(rowptr))
            dense[torch.from_numpy(r), torch.from_numpy(cols.astype(np.int64))] = vals
    return dense


def load_compressed(path: str | os.PathLike[str], model: nn.Module | None = None, *,
                    allow_pickle: bool = False) -> nn.Module:
    """Rebuild a runnable model from a ``.sensplan`` file.

    ``model`` is a fresh instance of the *original* architecture (it is changed in place); if
    omitted, it is built from the model spec recorded in the file (its factory file is looked for
    beside the file first, then where it was when the file was written). Every method that was
    applied replays its record on it (pruning, factorization, activation quantization); then the
    stored values are loaded, dequantized to float32. Example::

        model = load_compressed("out/model.sensplan")            # spec from the file
        model = load_compressed("out/model.sensplan", resnet20())  # or bring the architecture
    """
    header, payload = read_header(path)
    info = header["model"]
    if model is None:
        if not info.get("spec"):
            raise ArtifactError(f"{str(path)!r} records no model spec; pass the original architecture as `model`.")
        spec = ModelSpec.from_record(info["spec"], beside=os.path.dirname(os.path.abspath(path)),
                                     artifact=repr(str(path)),
                                     fix=", or pass the model yourself: load_compressed(path, model)")
        model = build_model(spec, allow_pickle=allow_pickle)
    model.eval()
    if info.get("architecture_digest") and architecture_digest(model) != info["architecture_digest"]:
        raise IncompatibleModelError(f"The model given to load {str(path)!r} is not the architecture it was "
                                     f"compressed from. Pass a fresh instance of the original model.")
    _replay(model, header, str(path))
    state: dict[str, torch.Tensor] = {}
    try:
        for key, e in header["tensors"].items():
            parts = {name: payload[o:o + n] for name, (o, n) in zip(e["part_names"], e["parts"], strict=True)}
            if e["layout"] == "tied":
                state[key] = state[e["to"]]
            elif e["layout"] == "raw":
                state[key] = _from_raw(parts["raw"], e["dtype"], tuple(e["shape"]))
            else:
                state[key] = _decode_tensor(e, parts)
    except (KeyError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{str(path)!r} is corrupt: a tensor cannot be decoded ({type(err).__name__}: "
                            f"{err}). Re-create it with `sensplan apply`.") from None
    del payload  # the decoded tensors own their memory: the file's bytes go before the state loads
    _load_state_preserving_metadata(model, state, str(path))
    return model.eval()


def _replay(model: nn.Module, header: Mapping[str, Any], path: str) -> None:
    """Every method's record, replayed in the order the methods were applied."""
    records = header["records"]
    if not records:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ctx = MethodContext(model, torch.zeros(1, *header["model"]["input_shape"], device=device), {}, {}, {},
                        device=device)
    for name, record in records:
        method = get_method(name, named_in=repr(path))
        try:
            with METHODS.failures(name, f"rebuild_ (loading {path!r})",
                                  fix="Fix the plug-in, or, if another version of it wrote the file, re-create "
                                      "the file with `sensplan apply`"):
                method.rebuild_(ctx, record)
        except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise ArtifactError(f"{path!r}: replaying what {name} recorded failed ({type(e).__name__}: "
                                f"{first_line(e)}). Re-create it with `sensplan apply`.") from None


def _load_state_preserving_metadata(model: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    # keep the module versions (``_metadata``) that some models' loaders check (e.g. MNASNet)
    meta = getattr(model.state_dict(), "_metadata", None)
    from collections import OrderedDict

    sd: Any = OrderedDict(state)
    if meta is not None:
        sd._metadata = meta
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise IncompatibleModelError(f"The weights in {path!r} do not fit the rebuilt model: "
                                     f"{first_line(e)}") from None
