"""ONNX export, int8 quantization by the plan, and measurement on ONNX Runtime.

See :mod:`sensplan.planner._runtime` for what runs where. The exporter is torch's (``dynamo=True``):
weight initializers keep their module names, which is how a plan's layer finds its node.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensplan._errors import IncompatibleModelError, first_line
from sensplan.planner._ort_nbits import apply_nbits, nbits_config
from sensplan.planner._ort_quant import int8_layers, layer_nodes, quant_config, run_quantize_static
from sensplan.planner._runtime import compare_latency


def strip_input_quant(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A copy of ``model`` without the fake-quantization hooks of activation quantization, and the
    per-layer parameters they held (bits, scale, zero point)."""
    from sensplan.sensitivity import remove_input_quant_

    clean = copy.deepcopy(model)
    return clean, remove_input_quant_(clean)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines and warnings (stdout, stderr, Python warnings) kept out of the
    user's terminal; an error still raises."""
    import logging

    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice through the root logger
        try:
            yield
        finally:
            root.setLevel(level)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Export ``model`` (on the CPU, float32, activation fake-quantization removed) to one ONNX file
    with a dynamic batch dimension and the weights inside; the layers' weight initializers keep
    their module names (``layer1.0.conv1.weight``). Returns the removed activation parameters per
    layer (``act_params``) and the export's seconds."""
    clean, act = strip_input_quant(model)
    clean = clean.to("cpu").float().eval()
    x = example_input[:1].to("cpu")
    x = x.expand(2, *x.shape[1:]).clone()  # a batch of 1 would be specialised (not dynamic) by torch.export
    t0 = time.perf_counter()
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(clean, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: torch.export.Dim("batch", max=1 << 16)},))
            if program is None:
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(os.fspath(path), external_data=False)
    except Exception as e:  # noqa: BLE001 - any exporter failure is one message
        raise IncompatibleModelError(f"The model could not be exported to ONNX ({type(e).__name__}: "
                                     f"{first_line(e)[:300]}). Use --runtime torch.") from e
    return {"act_params": act, "seconds": round(time.perf_counter() - t0, 3)}


def quantize_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str], plan_layers: Mapping[str, str],
                  act_params: Mapping[str, Mapping[str, Any]], calib: np.ndarray, *,
                  unit_of: Callable[[str], str] = lambda s: s, modules: Collection[str] = ()) -> dict[str, Any]:
    """Write ``dst``: ``src`` with the layers ``plan_layers`` marks "int8" as QDQ int8 nodes (per
    channel symmetric int8 weights; asymmetric uint8 activations at the plan's scale and zero point
    from ``act_params``), everything else float, as :func:`~sensplan.planner._ort_quant.quant_config`
    says (the configuration ``sensplan export --to onnxruntime`` writes); the glue operators it adds
    are calibrated on ``calib`` (the plan's calibration inputs). Returns what was quantized and which
    layers stayed float, with why."""
    import onnx

    config = quant_config(onnx.load(os.fspath(src)).graph, plan_layers, act_params, unit_of=unit_of,
                          modules=modules)
    return apply_quant_config(src, dst, config, calib)


def export_for_plan(compressed: nn.Module, example_input: torch.Tensor, effects: Mapping[str, Mapping[str, Any]],
                    path: str | os.PathLike[str], *, unit_of: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    """Export ``compressed`` (the executor's model of a plan) to the float ONNX file ``path`` and
    return the ``quantize_static`` configuration that makes the plan's int8 layers (by their merged
    ``effects``) int8 on it (:func:`~sensplan.planner._ort_quant.quant_config`, with the activation
    parameters the plan's activation quantization calibrated), its ``nbits`` section the Linear
    layers with weight-only integer weights that become MatMulNBits nodes
    (:func:`~sensplan.planner._ort_nbits.nbits_config`). ``apply --runtime onnxruntime``
    quantizes with it (:func:`apply_quant_config`); ``export --to onnxruntime`` writes it."""
    import onnx

    exported = export_onnx(compressed, example_input, path)
    graph = onnx.load(os.fspath(path)).graph
    modules = {n for n, _ in compressed.named_modules() if n}
    states = int8_layers(effects)
    config = quant_config(graph, states, exported["act_params"], unit_of=unit_of, modules=modules)
    config["nbits"] = nbits_config(graph, {u: effects[u] for u, s in states.items() if s == "nbits"},
                                   layer_nodes(graph, modules), unit_of=unit_of)
    return config


def apply_quant_config(src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Mapping[str, Any],
                       calib: np.ndarray) -> dict[str, Any]:
    """Write ``dst``: ``src`` quantized as ``config`` (:func:`export_for_plan`) says (a copy when
    no layer is int8), then its ``nbits`` layers made MatMulNBits nodes
    (:func:`~sensplan.planner._ort_nbits.apply_nbits`); returns what was quantized (``int8_nodes``,
    ``glue_nodes``, ``nbits_nodes`` and per unit ``nbits_layers``) and which layers stayed float,
    with why."""
    float_layers = dict(config["float_layers"])
    nbits = config.get("nbits") or {"layers": {}, "float_layers": {}, "notes": []}
    float_layers.update(nbits["float_layers"])
    notes = [*config["notes"], *nbits["notes"]]
    if not config["layers"]:
        import shutil

        shutil.copyfile(src, dst)
    else:
        with _quiet():
            run_quantize_static(src, dst, config, calib)
    out: dict[str, Any] = {"int8_nodes": len(config["layers"]), "glue_nodes": len(config["glue"])}
    if nbits["layers"]:  # after the QDQ step, which left these nodes float (they are in nodes_to_exclude)
        done = apply_nbits(dst, dst, nbits)
        float_layers.update(done["float_layers"])
        out.update(nbits_nodes=len(done["layers"]), nbits_layers=done["layers"],
                   nbits_rounding="the plan's codes, scales and zero points (sensplan's quantizer)")
    return {**out, "float_layers": float_layers, **({"notes": notes} if notes else {})}


def ort_session(model: str | bytes, threads: int) -> Any:
    """An ONNX Runtime CPU session on ``threads`` intra-op threads that do not spin between runs
    (spinning threads of one session would slow the next one's run in an interleaved timing)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - a model ORT cannot load is one message
        raise IncompatibleModelError(f"ONNX Runtime could not load the exported model ({type(e).__name__}: "
                                     f"{first_line(e)[:300]}). Use --runtime torch.") from e


class OrtModel(nn.Module):
    """An ONNX Runtime session behind the interface of a PyTorch model: ``forward`` takes a tensor,
    runs the session on the CPU at ``threads`` threads and returns the output as a tensor on the
    input's device, so the tasks score it as they score any model."""

    def __init__(self, path: str | os.PathLike[str], threads: int) -> None:
        super().__init__()
        self.path = str(path)
        self.threads = threads
        self.session = ort_session(self.path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def run_numpy(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(None, {self.input_name: x})[0]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.run_numpy(x.detach().to("cpu").numpy())
        return torch.from_numpy(out).to(x.device)


def ort_version() -> str:
    import onnxruntime as ort

    return str(ort.__version__)


def gold_agreement(reference: nn.Module, candidate: nn.Module, x: torch.Tensor, batch_size: int = 256
                   ) -> dict[str, Any]:
    """How closely ``candidate`` reproduces ``reference`` on the gold inputs ``x``: the fraction of
    equal top-1 predictions and the largest absolute difference of an output value."""
    agree, worst, n = 0, 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            a, b = reference(xb).float(), candidate(xb).float().to(xb.device)
            if a.dim() > 1:
                agree += int((a.reshape(len(xb), -1, a.shape[-1]).argmax(-1)
                              == b.reshape(len(xb), -1, b.shape[-1]).argmax(-1)).all(-1).sum())
            worst = max(worst, float((a - b).abs().max()))
            n += len(xb)
    return {"n": n, "top1_agreement": agree / max(1, n), "max_abs_diff": worst}


def file_bytes(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size


# The child builds its session with the options of ort_session written out again, on purpose: importing
# sensplan there (about 560 MiB of high-water mark) would hide the session's own peak. It reads its
# high-water mark from /proc (VmHWM, which starts afresh with the new program): Linux's ru_maxrss
# starts from the parent's at fork, so a child of a large process saw no peak of its own (0 MiB).
_PEAK_SCRIPT = """
import resource, sys, numpy as np, onnxruntime as ort
def peak_kib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r // 1024 if sys.platform == "darwin" else r
path, threads, shape, dtype = sys.argv[1], int(sys.argv[2]), [int(v) for v in sys.argv[3].split(",")], sys.argv[4]
base = peak_kib()
o = ort.SessionOptions(); o.intra_op_num_threads = threads; o.inter_op_num_threads = 1; o.log_severity_level = 3
o.add_session_config_entry("session.intra_op.allow_spinning", "0")
s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
x = np.zeros(shape, dtype=dtype)
s.run(None, {s.get_inputs()[0].name: x})
print(base, peak_kib())
"""


def peak_memory_mb(path: str | os.PathLike[str], example: torch.Tensor, batch: int, threads: int) -> float | None:
    """The peak resident memory (MiB) that loading ``path`` into an ONNX Runtime session and running
    one batch of ``batch`` adds to a fresh process that has imported onnxruntime (measured in a
    child process, so this process's own memory does not count). None where it cannot be measured."""
    import subprocess
    import sys

    shape = ",".join(str(v) for v in (batch, *example.shape[1:]))
    dtype = str(example.dtype).replace("torch.", "")
    try:
        done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, os.fspath(path), str(threads), shape, dtype],
                              capture_output=True, text=True, timeout=300, check=True)
        base, peak = (int(v) for v in done.stdout.split()[-2:])
    except (subprocess.SubprocessError, OSError, ValueError):
        return None
    return round((peak - base) / 1024.0, 2)


def ort_measurements(torch_model: nn.Module, path: str | os.PathLike[str], data: Any, task: Any, state: Any, *,
                     threads: int, batch: int, gold: int = 256, ort_model: OrtModel | None = None
                     ) -> dict[str, Any]:
    """The ONNX file ``path`` (exported from ``torch_model``) on ONNX Runtime: the task's score on
    ``data``, its agreement with ``torch_model`` on the first ``gold`` items, its file size and the
    peak memory a session running a batch of ``batch`` adds."""
    ort_model = ort_model or OrtModel(path, threads)
    ev = task.evaluate(ort_model, data, state)
    return {"score": ev.score, "loss": ev.loss, "n": ev.n, "file_bytes": file_bytes(path),
            "agreement_with_torch": gold_agreement(torch_model, ort_model, data.x[:gold]),
            "peak_memory_mb": peak_memory_mb(path, data.example_input, batch, threads)}


def measure_on_onnxruntime(original: nn.Module, compressed: nn.Module, data: Any, task: Any, state: Any,
                           effects: Mapping[str, Mapping[str, Any]], staged: Path, *, calib_x: torch.Tensor,
                           threads: int, batches: Sequence[int], timing: bool = True,
                           original_onnx: Path | None = None, original_measured: Mapping[str, Any] | None = None,
                           gold: int = 256, unit_of: Callable[[str], str] = lambda s: s) -> dict[str, Any]:
    """Export ``compressed`` to ONNX with the plan's int8 layers quantized (written to ``staged``),
    and measure it against ``original`` on ONNX Runtime (:func:`ort_measurements` for each, then
    their agreement and their latency at ``batches``, timed interleaved). ``original_onnx``: the
    original's float export, and ``original_measured`` its :func:`ort_measurements`, when the caller
    made them already (several variants of one plan measure the original once)."""
    work = staged.parent
    tmp = work / f".{staged.name}.float.onnx"
    orig_path = original_onnx or work / f".{staged.name}.original.onnx"
    try:
        t0 = time.perf_counter()
        if original_onnx is None:
            export_onnx(original, data.example_input, orig_path)
        config = export_for_plan(compressed, data.example_input, effects, tmp, unit_of=unit_of)
        quant = apply_quant_config(tmp, staged, config, calib_x[:256].detach().cpu().numpy())
        seconds = time.perf_counter() - t0
        ort_orig, ort_comp = OrtModel(orig_path, threads), OrtModel(staged, threads)
        out: dict[str, Any] = {"name": "onnxruntime", "version": ort_version(), "threads": threads,
                               "export_seconds": round(seconds, 3), "quantized": quant}
        side = {"threads": threads, "batch": max(batches), "gold": gold}
        out["original"] = dict(original_measured or ort_measurements(original, orig_path, data, task, state,
                                                                     ort_model=ort_orig, **side))
        out["compressed"] = ort_measurements(compressed, staged, data, task, state, ort_model=ort_comp, **side)
        out["gold_agreement"] = gold_agreement(ort_orig, ort_comp, data.x[:gold])
        if timing:
            timed = compare_latency({"original": ort_orig.run_numpy, "compressed": ort_comp.run_numpy},
                                    data.example_input.detach().cpu().numpy(), batches, threads=threads)
            out["latency"] = timed
            out["speedup"] = {f"batch {b}": ts["original"]["p50_ms"] / ts["compressed"]["p50_ms"]
                              for b, ts in timed["batches"].items()}
        return out
    finally:
        tmp.unlink(missing_ok=True)
        if original_onnx is None:
            Path(orig_path).unlink(missing_ok=True)
