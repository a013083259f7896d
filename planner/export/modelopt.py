"""``--to modelopt``: an NVIDIA ModelOpt ``mtq.quantize`` config (``quant_cfg`` + ``algorithm``).

``quant_cfg`` is the released dict form: ``"default": {"enable": False}`` first (every quantizer
off), then one exact quantizer name per planned tensor (``<module>.weight_quantizer``,
``<module>.input_quantizer``; fnmatch patterns with no wildcard) and its attributes: integer weights
``{"num_bits": b, "axis": 0}`` (per output channel) or ``{"num_bits": b, "block_sizes": {-1: g}}``
(groups of g along the input dim); 8-bit inputs ``{"num_bits": 8, "axis": None}`` (per tensor,
calibrated by ModelOpt: the plan's scale is not passed). ``--out x.py`` writes a Python module
(``CONFIG = {...}``: ``block_sizes`` keeps its int key); ``.json`` a JSON file whose ``block_sizes``
key is the string ``"-1"`` (:func:`load_modelopt_config` turns it back).
"""

from __future__ import annotations

import json
import pprint
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sensplan.planner.export._core import (
    EXPORTERS,
    Exported,
    Exporter,
    ExportRequest,
    quantization_only,
    to_json,
)


@EXPORTERS.register
class ModelOptExporter(Exporter):
    name = "modelopt"
    description = "NVIDIA ModelOpt: mtq.quantize config (quant_cfg per quantizer name, default disabled)"

    def export(self, request: ExportRequest) -> Exported:
        specs = quantization_only(request, "modelopt", zero_points=False)
        cfg: dict[str, Any] = {"default": {"enable": False}}
        for spec in specs.values():
            if spec.int_weights:
                attrs: dict[str, Any] = {"num_bits": spec.weight_bits, "axis": 0}
                if spec.group_size:
                    attrs = {"num_bits": spec.weight_bits, "block_sizes": {-1: spec.group_size}}
                cfg[f"{spec.target}.weight_quantizer"] = {**attrs, "enable": True}
            if spec.act_bits < 32:
                cfg[f"{spec.target}.input_quantizer"] = {"num_bits": spec.act_bits, "axis": None, "enable": True}
        config = {"quant_cfg": cfg, "algorithm": "max"}
        if request.out.suffix == ".py":
            # the provenance is a literal (SOURCE), not docstring text: a path may hold a backslash or quotes
            source = {k: v for k, v in request.header().items() if k in ("target", "sensplan", "plan", "model")}
            text = ('"""A ModelOpt config exported by sensplan (where from: SOURCE; what the plan had that\n'
                    "ModelOpt cannot express: DROPPED).\n\nimport modelopt.torch.quantization as mtq\n"
                    'from this_file import CONFIG\nmodel = mtq.quantize(model, CONFIG, forward_loop)\n"""\n\n'
                    f"SOURCE = {pprint.pformat(source, width=110, sort_dicts=False)}\n\n"
                    f"DROPPED = {pprint.pformat(request.dropped_record(), width=110)}\n\n"
                    f"CONFIG = {pprint.pformat(config, width=110, sort_dicts=False)}\n")
            return Exported(text)
        doc = {**request.header(), "quant_cfg": _json_keys(cfg), "algorithm": "max",
               "dropped": request.dropped_record()}
        return Exported(to_json(doc))


def _json_keys(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    return obj


def load_modelopt_config(path: str, *, entries: bool = False) -> dict[str, Any]:
    """``{"quant_cfg", "algorithm"}`` from a ``modelopt`` JSON export, as ``mtq.quantize`` takes it
    (``block_sizes``' dimension keys back to ints). ``entries``: ``quant_cfg`` as the ordered list of
    ``{"quantizer_name", "cfg", "enable"}`` entries that ModelOpt 0.4x takes without a deprecation
    warning (see :func:`quant_cfg_entries`); else the dict form older releases take."""
    data = json.loads(Path(path).read_text())

    def fix(cfg: Any) -> Any:
        if isinstance(cfg, Mapping):
            return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): fix(v) for k, v in cfg.items()}
        return cfg

    quant_cfg = fix(data["quant_cfg"])
    return {"quant_cfg": quant_cfg_entries(quant_cfg) if entries else quant_cfg,
            "algorithm": data.get("algorithm", "max")}


def quant_cfg_entries(quant_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The dict form of ``quant_cfg`` as ModelOpt's list form, in the same order (later entries
    win): ``"default"`` becomes ``"quantizer_name": "*"``, each attribute dict its ``cfg`` (``None``
    when it only switches the quantizer off) and ``enable``.

    >>> quant_cfg_entries({"default": {"enable": False}, "fc.input_quantizer": {"num_bits": 8, "enable": True}})[1]
    {'quantizer_name': 'fc.input_quantizer', 'cfg': {'num_bits': 8}, 'enable': True}
    """
    out = []
    for name, attrs in quant_cfg.items():
        cfg = {k: v for k, v in attrs.items() if k != "enable"}
        out.append({"quantizer_name": "*" if name == "default" else name, "cfg": cfg or None,
                    "enable": bool(attrs.get("enable", True))})
    return out
