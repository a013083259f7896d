"""The exporter plug-in kind: ``plan.json`` -> another tool's configuration file.

An exporter reads one allocation of a plan (``plans.planned`` or ``plans.uniform``) and writes what
the target tool takes as input. It decides from each choice's *effect* (the declared vocabulary of
``sensplan._effects``: ``weight_bits``, ``weight_dtype``, ``group_size``, ``zero_point_bits``,
``act_bits``, ``density``, ``removed``, ``structure`` ...), never from a method's name, so a
third-party method whose effect is "4-bit integer weights in groups of 128" exports as the built-in
one does.

What the target cannot express is never silently lost: :meth:`ExportRequest.unsupported` refuses the
export with one message naming the fix, or, with ``drop_unsupported``, leaves it out and lists it in
:attr:`Exported.dropped` (the CLI prints each; the written file records them under ``dropped``).

This module is torch-free. An exporter that needs the model (the channel indices of Torch-Pruning,
the ONNX graph of ONNX Runtime) asks the request for it (:meth:`ExportRequest.loaded`), which calls
the loader the caller gave: the CLI rebuilds the plan's model, Python passes its own.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sensplan._effects import is_sparse, merge_per_unit
from sensplan._errors import UserInputError, first_line
from sensplan._registry import Registry

#: the ``format`` of the JSON files the exporters write (each adds ``target``)
EXPORT_FORMAT = "sensplan.export"
EXPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LoadedModel:
    """What an exporter that needs the model gets: the model (eval mode, CPU), one example input
    batch, and the calibration data the executor recalibrates and calibrates activations on
    (an ``EvalSet``, or None)."""

    model: Any
    example_input: Any
    calib: Any = None


@dataclass(frozen=True)
class LayerSpec:
    """One layer of an allocation, as the exporters see it: the merged effect of its choices on
    every axis, its name in the target tool (``target``), and the blocks that chose it."""

    unit: str
    target: str
    effect: Mapping[str, Any]
    blocks: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def int_weights(self) -> bool:
        return self.effect.get("weight_dtype") == "int"

    @property
    def weight_bits(self) -> int:
        return int(self.effect.get("weight_bits", 32))

    @property
    def group_size(self) -> int:
        """0: one scale per output channel; g: one per g consecutive values of a row."""
        return int(self.effect.get("group_size") or 0)

    @property
    def symmetric(self) -> bool:
        return not int(self.effect.get("zero_point_bits") or 0)

    @property
    def act_bits(self) -> int:
        return int(self.effect.get("act_bits", 32))

    @property
    def float_dtype(self) -> str | None:
        """``float16``/``bfloat16`` for 16-bit float weights, else None."""
        d = self.effect.get("weight_dtype")
        return str(d) if d in ("float16", "bfloat16") else None

    @property
    def sparse(self) -> bool:
        return is_sparse(self.effect)

    @property
    def restructured(self) -> bool:
        return bool(self.effect.get("structure"))

    @property
    def describe(self) -> str:
        return " + ".join(self.labels) or "none"


@dataclass(frozen=True)
class Unsupported:
    """A choice the target cannot express: the ``block`` (``<axis>:<unit>``), its label and why."""

    block: str
    label: str
    why: str

    def line(self) -> str:
        return f"{self.block} ({self.label}): {self.why}"


@dataclass
class Exported:
    """What an exporter produced: the text of the ``--out`` file, other files to write beside it
    (name -> bytes, each written atomically next to ``--out``), what it left out (with
    ``drop_unsupported``) and notes on how the target will treat the rest."""

    text: str
    extra_files: dict[str, bytes] = field(default_factory=dict)
    dropped: list[Unsupported] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportRequest:
    """One export: the plan, which allocation, whether to drop what the target cannot express (else
    refuse), where the file goes, and how to get the model when the exporter needs it."""

    plan: Any  # a sensplan.planner.Plan
    target: str
    variant: str = "planned"
    drop_unsupported: bool = False
    out: Path = Path("export.out")
    model_loader: Callable[[], LoadedModel] | None = None
    _loaded: LoadedModel | None = None
    dropped: list[Unsupported] = field(default_factory=list)
    left_out: set[str] = field(default_factory=set)  # blocks dropped before the exporter ran

    # -- the allocation ----------------------------------------------------------------------
    @property
    def allocation(self) -> Mapping[str, Any]:
        alloc: Mapping[str, Any] = self.plan.variant(self.variant)
        return alloc

    @property
    def choices(self) -> dict[str, Mapping[str, Any]]:
        """Every block of the allocation (``<axis>:<unit>`` -> its choice), ``method: null`` included
        (less the blocks :func:`export_plan` left out before the exporter ran)."""
        return {b: c for b, c in self.allocation["choices"].items() if b not in self.left_out}

    def applied(self) -> dict[str, Mapping[str, Any]]:
        """The blocks that apply a method."""
        return {b: c for b, c in self.choices.items() if c.get("method")}

    @property
    def is_transformer(self) -> bool:
        """Whether the plan's model is a Hugging Face model (``--model hf:...``)."""
        spec = (self.plan.data.get("model") or {}).get("spec") or {}
        return str(spec.get("source", "")).startswith("hf:")

    def target_name(self, unit: str) -> str:
        """The module's name in the target tool: a Hugging Face model's names without sensplan's
        wrapper prefix (``model.model.layers.0.mlp.up_proj`` -> ``model.layers.0.mlp.up_proj``,
        the name in ``AutoModelForCausalLM.from_pretrained(...).named_modules()``)."""
        if self.is_transformer and unit.startswith("model."):
            return unit[len("model."):]
        return unit

    def layers(self, *, all_layers: bool = True) -> dict[str, LayerSpec]:
        """Per layer unit (choices of ``kind: layer``), its merged effect; with ``all_layers`` the
        layers the plan leaves float too (an empty effect)."""
        layer_choices = [(b, c) for b, c in self.choices.items() if c.get("kind") == "layer"]
        effects = merge_per_unit((c["unit"], c.get("effect") or {}) for _, c in layer_choices if c.get("method"))
        out: dict[str, LayerSpec] = {}
        for unit in dict.fromkeys(c["unit"] for _, c in layer_choices):
            mine = [(b, c) for b, c in layer_choices if c["unit"] == unit and c.get("method")]
            if not mine and not all_layers:
                continue
            out[unit] = LayerSpec(unit, self.target_name(unit), effects.get(unit, {}), tuple(b for b, _ in mine),
                                  tuple(str(c.get("label") or c["method"]) for _, c in mine))
        return out

    def groups(self) -> dict[str, Mapping[str, Any]]:
        """The channel groups the allocation shrinks (``removed`` > 0): group root -> its choice."""
        return {c["unit"]: c for c in self.choices.values()
                if c.get("kind") == "group" and int((c.get("effect") or {}).get("removed") or 0) > 0}

    # -- what the target cannot express -------------------------------------------------------
    def unsupported(self, items: Sequence[Unsupported], fix: str) -> list[Unsupported]:
        """Refuse the export when ``items`` is not empty (one message: how many choices, the
        first few, and ``fix``), or, with ``drop_unsupported``, record them as dropped and return
        them (the exporter then leaves them out)."""
        if not items:
            return []
        if self.drop_unsupported:
            self.dropped.extend(items)
            return list(items)
        by_why = by_reason(items)  # one reason, said once, with the blocks it stops
        first = "; ".join(
            ", ".join(f"{i.block} ({i.label})" for i in same[:3]) + (f" and {len(same) - 3} more" if len(same) > 3
                                                                     else "") + f": {why}"
            for why, same in by_why.items())
        raise UserInputError(f"--to {self.target} cannot express {len(items)} choice(s) of the plan's {self.variant} "
                             f"allocation: {first}. Pass --drop-unsupported to export without them (they are listed "
                             f"in the file's 'dropped'), or {fix}.")

    def split_expert_items(self) -> list[Unsupported]:
        """The applied blocks on an MoE expert that sensplan split out of a fused experts module
        (``model.split_experts`` in the plan; see ``sensitivity/_moe.py``): the model that
        ``from_pretrained`` builds has no module of that name."""
        return [Unsupported(b, str(c.get("label") or c.get("method")), EXPERT_WHY)
                for b, c in self.applied().items() if self.split_expert(str(c.get("unit", "")))]

    def split_expert(self, unit: str) -> bool:
        """Whether ``unit`` is a layer of an MoE expert that sensplan split out (see above)."""
        return self.expert_root(unit) is not None

    def expert_root(self, unit: str) -> str | None:
        """The split experts module (its name and a ``.``) that ``unit`` is inside, or None."""
        return next((r for r in self._expert_roots if unit.startswith(r)), None)

    @functools.cached_property
    def _expert_roots(self) -> tuple[str, ...]:
        return tuple(f"{r}." for r in (self.plan.data.get("model") or {}).get("split_experts") or ())

    def group_items(self, why: str) -> list[Unsupported]:
        return [Unsupported(f"{c['axis']}:{u}", str(c.get("label")), why) for u, c in self.groups().items()]

    def layer_items(self, spec: LayerSpec, why: str) -> list[Unsupported]:
        return [Unsupported(b, lbl, why) for b, lbl in zip(spec.blocks, spec.labels, strict=True)]

    # -- the model ---------------------------------------------------------------------------
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            if self.model_loader is None:
                raise UserInputError(f"--to {self.target} needs the plan's model; pass it (Python: "
                                     f"export_plan(..., model=..., example_input=...)).")
            self._loaded = self.model_loader()
        return self._loaded

    # -- the written file ---------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The provenance every JSON export starts with."""
        from sensplan._artifacts import now_iso
        from sensplan._version import __version__

        model = self.plan.data.get("model") or {}
        return {"format": EXPORT_FORMAT, "schema_version": EXPORT_SCHEMA_VERSION, "target": self.target,
                "created": now_iso(), "sensplan": __version__,
                "plan": {"path": self.plan.path or None, "sha256": self.plan.sha256 or None, "variant": self.variant},
                "model": {"spec": model.get("spec"), "weights": model.get("weights"),
                          "architecture_digest": model.get("architecture_digest")}}

    def dropped_record(self) -> list[dict[str, str]]:
        return [{"block": d.block, "label": d.label, "why": d.why} for d in self.dropped]


class Exporter:
    """Base of an exporter plug-in: ``name`` (``--to NAME``), ``description``, ``suffix`` (the
    usual extension of its file), ``needs_model``, ``needs_calib`` (the model's loader must also give
    the plan's calibration data); :meth:`export` returns the file's content."""

    name = ""
    description = ""
    suffix = ".json"
    needs_model = False
    needs_calib = False
    #: whether the file names the modules of the user's model (a split MoE expert has none: its
    #: choices are refused, or left out with ``drop_unsupported``)
    names_modules = True

    def beside(self, out: Path) -> list[str]:
        """The names of the files :meth:`export` writes beside ``out`` (its ``extra_files``), known
        before it runs, so that an existing file of the user's there is never overwritten."""
        return []

    def export(self, request: ExportRequest) -> Exported:
        raise NotImplementedError


EXPORTERS: Registry[Exporter] = Registry("exporter", flag="--to", entry_points="sensplan.exporters")


def load_exporters() -> Registry[Exporter]:
    """The registry with every built-in exporter (the public modules of this package) and the
    ``sensplan.exporters`` entry points of other packages."""
    import sensplan.planner.export as pkg

    EXPORTERS.discover(pkg.__name__, pkg.__path__, Exporter)
    return EXPORTERS


def export_plan(plan: Any, target: str, out: str | os.PathLike[str], *, variant: str = "planned",
                drop_unsupported: bool = False, model: Any = None, example_input: Any = None, calib: Any = None,
                model_loader: Callable[[], LoadedModel] | None = None) -> Exported:
    """Export one allocation of ``plan`` (a :class:`~sensplan.planner.Plan`) for the tool ``target``
    (an exporter's name) into ``out``, written atomically, with any extra files beside it.

    ``model``/``example_input``/``calib`` (or ``model_loader``): the plan's model, for exporters
    that need it (``torch-pruning``, ``onnxruntime``). Raises ``UserInputError`` when the target
    cannot express a choice, unless ``drop_unsupported``. Returns what was written and dropped.

    >>> export_plan(Plan.load("plan.json"), "csv", "plan.csv")  # doctest: +SKIP
    """
    from sensplan._artifacts import atomic_write_bytes

    exporter = load_exporters().get(target)
    if model_loader is None and model is not None:
        loaded = LoadedModel(model, example_input, calib)
        model_loader = lambda: loaded  # noqa: E731
    req = ExportRequest(plan, target, variant, drop_unsupported, Path(out), model_loader)
    plan.variant(variant)  # an absent allocation is one clear message
    out_path = Path(out)
    for name in exporter.beside(out_path):
        _check_beside(out_path, out_path.parent / name, target)
    if exporter.names_modules:
        experts = req.unsupported(req.split_expert_items(), "apply the plan with `sensplan apply`, whose "
                                  "model.sensplan loads with sensplan.planner.load_compressed")
        req.left_out.update(i.block for i in experts)
    result = exporter.export(req)
    result.dropped = list(req.dropped)
    if result.dropped:
        result.notes.append(reached_without(plan, variant, {d.block for d in result.dropped}))
    for name, data in result.extra_files.items():
        if name not in exporter.beside(out_path):  # a plug-in that did not declare it: check it now
            _check_beside(out_path, out_path.parent / name, target)
        atomic_write_bytes(out_path.parent / name, data)
    atomic_write_bytes(out_path, result.text.encode())
    return result


def by_reason(items: Sequence[Unsupported]) -> dict[str, list[Unsupported]]:
    """``items`` grouped by why the target cannot express them, in their order."""
    out: dict[str, list[Unsupported]] = {}
    for i in items:
        out.setdefault(i.why, []).append(i)
    return out


def plan_scan(plan: Any) -> Path | None:
    """The plan's scan file: as recorded (absolute, or relative to where the plan was made), else
    relative to the plan's folder, else beside the plan; the first whose digest is the one the plan
    records (any, when it records none). None when there is none."""
    from sensplan._artifacts import file_sha256

    rec = plan.data.get("scan") or {}
    path = rec.get("path")
    if not path:
        return None
    here = Path(plan.path).parent if getattr(plan, "path", None) else None
    candidates: list[Path] = [Path(path), *([here / path, here / Path(path).name] if here is not None else [])]
    for candidate in candidates:
        if candidate.is_file() and (not rec.get("sha256") or file_sha256(candidate) == rec["sha256"]):
            return candidate
    return None


def reached_without(plan: Any, variant: str, dropped: set[str]) -> str:
    """What the allocation costs with the ``dropped`` blocks left as they are (the target keeps
    them float), against the plan's budgets: computed from the plan's scan when it can be read (see
    :func:`plan_scan`; checked by digest), said to be unknown otherwise. Never raises: it is a
    note on an export that is already made."""
    n = len(dropped)
    unknown = (f"without the {n} dropped choice(s) the target keeps those layers as they are, so the result "
               f"may no longer meet the plan's budgets; ")
    try:
        text = _priced_without(plan, variant, dropped)
    except Exception as e:  # noqa: BLE001 - a plan or scan this cannot price: say so, export anyway
        return unknown + f"what it costs could not be computed ({type(e).__name__}: {first_line(e, 160)})"
    return f"without the {n} dropped choice(s), which the target keeps as they are: {text}" if text else \
        unknown + "the costs are not known here"


def _priced_without(plan: Any, variant: str, dropped: set[str]) -> str | None:
    from sensplan._tables import Scan
    from sensplan.planner._costs import Costs, merged_effects, option_key
    from sensplan.planner._solver import _relative_slack

    path = plan_scan(plan)
    if path is None:
        recorded = (plan.data.get("scan") or {}).get("path") or "unsaved"
        return f"the costs are not known here: the plan's scan ({recorded}) cannot be read"
    cm = Costs(Scan.load(path), (), str((plan.data.get("objective") or {}).get("signal") or "drop"))
    keep = option_key(None, {})
    choices = {b: c for b, c in plan.variant(variant)["choices"].items() if b in cm.index}
    choice: dict[int, int] = {}
    removed: dict[str, int] = {}  # every group's removed channels, for a group chosen off the grid
    off_grid = False
    for b, c in choices.items():
        block = cm.blocks[cm.index[b]]
        if block.kind == "group":
            removed[block.unit] = 0 if b in dropped else int((c.get("effect") or {}).get("removed") or 0)
        key = keep if b in dropped else option_key(c.get("method"), c.get("setting") or {})
        keys = [o.key for o in block.options]
        if key in keys:
            choice[cm.index[b]] = keys.index(key)
        elif block.kind == "group":  # a uniform allocation's ratio between the scanned ones
            off_grid = True
        else:
            return "the costs are not known here: the plan's scan does not hold every option it chose"
    full = {i: choice.get(i, 0) for i in range(len(cm.blocks))}
    # off the grid, the analytic metrics are computed tensor by tensor, as the uniform baseline's are
    costs = cm.evaluate(full)
    if off_grid:
        costs.update(cm.analytic.direct(removed, merged_effects(cm.blocks, full)))
    was_costs = plan.variant(variant).get("predicted") or {}
    objective = plan.data.get("objective") or {}
    parts = []
    for b in objective.get("budgets") or []:
        metric, limit = b.get("metric"), b.get("absolute")
        if metric not in costs or limit is None:
            parts.append(f"{metric}: not computed from the scan (a measured cost table)")
            continue
        frac = costs[metric] / cm.original[metric] if cm.original.get(metric) else None
        was = was_costs.get(metric)
        met = costs[metric] <= float(limit) + _relative_slack(float(limit))
        parts.append(f"{metric} {costs[metric]:.6g}" + (f" ({frac:.3f} of the original)" if frac is not None else "")
                     + (f" against the plan's {was:.6g}" if was is not None else "")
                     + f" and the budget's {float(limit):.6g}: " + ("still met" if met else "NOT met"))
    if not parts:  # planned with --max-drop: no budget, only the metric it minimised
        metric = objective.get("minimize")
        if metric in costs:
            was = was_costs.get(metric)
            parts.append(f"{metric} {costs[metric]:.6g}"
                         + (f" against the plan's {was:.6g}" if was is not None else ""))
    return "; ".join(parts) or None


def _check_beside(out: Path, path: Path, target: str) -> None:
    """Refuse to write ``path`` (a file an export adds beside ``out``) over a file that an earlier
    ``--to target`` export to ``out`` did not write: it may be the user's own (their model.onnx
    beside ``--out model.json``), or ``out`` itself."""
    if os.path.realpath(path) == os.path.realpath(out):
        raise UserInputError(f"--out {out}: the {target} export also writes {path.name} beside it, which is "
                             f"--out itself. Choose another --out (e.g. {out.with_suffix('.json')}).")
    if not path.exists():
        return
    try:
        earlier = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and earlier.get("format") == EXPORT_FORMAT and earlier.get("target") == target:
        return  # the export this one replaces wrote it
    raise UserInputError(f"--out {out}: the {target} export also writes {path} beside it, and that file exists "
                         f"but is not from an earlier --to {target} export to {out}; sensplan does not overwrite "
                         f"it. Choose another --out (the extra file is named after it), or move {path} away.")


#: why a split MoE expert's choice cannot be exported by module name
EXPERT_WHY = ("an MoE expert's layer exists only in sensplan's split of the fused experts (one Linear per expert); "
              "the model from_pretrained builds holds all experts in one 3-D weight")


# -- small writers ---------------------------------------------------------------------------------
def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def to_yaml(obj: Any, indent: int = 0) -> str:
    """Block-style YAML of plain data (dicts, lists, strings, numbers, booleans, None). Strings that
    could be read as another type are written as JSON strings (a valid YAML double-quoted scalar),
    so any YAML reader gives back ``obj``."""
    pad = "  " * indent
    if isinstance(obj, Mapping):
        if not obj:
            return pad + "{}\n"
        out = []
        for k, v in obj.items():
            key = _scalar(k)
            if isinstance(v, (Mapping, list, tuple)) and v:
                out.append(f"{pad}{key}:\n{to_yaml(v, indent + 1)}")
            else:
                out.append(f"{pad}{key}: {_inline(v)}\n")
        return "".join(out)
    if isinstance(obj, (list, tuple)):
        if not obj:
            return pad + "[]\n"
        out = []
        for v in obj:
            if isinstance(v, (Mapping, list, tuple)) and v:
                body = to_yaml(v, indent + 1)
                out.append(f"{pad}- {body.lstrip()}")
            else:
                out.append(f"{pad}- {_inline(v)}\n")
        return "".join(out)
    return pad + _inline(obj) + "\n"


def _inline(v: Any) -> str:
    if isinstance(v, Mapping) and not v:
        return "{}"
    if isinstance(v, (list, tuple)) and not v:
        return "[]"
    return _scalar(v)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"):
        return s
    return json.dumps(s)


def exact_regex(name: str) -> str:
    """A regular expression that matches the module name ``name`` and nothing else."""
    return "^" + re.escape(name) + "$"


# -- what quantization-only targets share -------------------------------------------------------------
def nothing_quantized(request: ExportRequest, tool: str) -> UserInputError:
    """The refusal of a quantization tool's export whose allocation quantizes no layer it can take:
    such a file would make the tool quantize by its defaults (NNCF compresses every layer it is not
    told to skip; llm-compressor's modifier needs a config group)."""
    return UserInputError(f"--to {request.target}: the plan's {request.variant} allocation quantizes no layer "
                          f"{tool} can take, so there is nothing to export (a file would make {tool} quantize by "
                          f"its own defaults). Export the pruning with --to torch-pruning, or plan with integer "
                          f"weights (--methods ...,weight_quant).")


def quantization_only(request: ExportRequest, tool: str, *, int_bits: Sequence[int] = tuple(range(2, 9)),
                      activations: bool = True, zero_points: bool = True,
                      fix: str = "") -> dict[str, LayerSpec]:
    """The layers a quantization tool can take, refusing (or dropping) the rest: channel pruning,
    factorized layers, sparsity and 16-bit float weights always; integer weights of other widths
    than ``int_bits``; activation quantization unless ``activations``; zero points unless
    ``zero_points``. Returns every layer of the allocation (float ones with an empty effect), with
    the dropped choices' fields taken out of their effect."""
    items: list[Unsupported] = list(request.group_items(
        f"{tool} quantizes; it does not remove channels (export the pruning with --to torch-pruning and "
        f"replay it on the model first)"))
    specs = request.layers()
    out: dict[str, LayerSpec] = {}
    for unit, spec in specs.items():
        bad: dict[str, str] = {}
        if spec.restructured:
            bad["structure"] = f"{tool} does not factorize layers"
        if spec.sparse:
            bad["sparse"] = f"{tool} does not store sparse weights here"
        if spec.float_dtype:
            bad["float"] = f"{tool} quantizes to integers; {spec.float_dtype} weights are a dtype cast"
        if spec.int_weights and spec.weight_bits not in int_bits:
            widths = "/".join(str(b) for b in int_bits)
            bad["bits"] = f"{tool} takes {widths}-bit integer weights, not {spec.weight_bits}"
        if spec.int_weights and not spec.symmetric and not zero_points:
            bad["zp"] = f"{tool} takes symmetric integer weights (no zero point)"
        if spec.act_bits < 32 and not activations:
            bad["act"] = f"{tool} quantizes weights only (not a layer's input activations)"
        if not bad:
            out[unit] = spec
            continue
        # blame the blocks whose effect carries the unsupported field
        keep_blocks: list[str] = []
        keep_labels: list[str] = []
        dropped_fields: set[str] = set()
        for block, label in zip(spec.blocks, spec.labels, strict=True):
            e = request.choices[block].get("effect") or {}
            whys = [w for k, w in bad.items() if _carries(e, k)]
            if whys:
                items.append(Unsupported(block, label, "; ".join(whys)))
                dropped_fields.update(e)
            else:
                keep_blocks.append(block)
                keep_labels.append(label)
        effect = {k: v for k, v in spec.effect.items() if k not in dropped_fields}
        out[unit] = LayerSpec(unit, spec.target, effect, tuple(keep_blocks), tuple(keep_labels))
    request.unsupported(items, fix or f"plan without those methods for {tool}")
    return out


def _carries(effect: Mapping[str, Any], what: str) -> bool:
    if what == "structure":
        return bool(effect.get("structure"))
    if what == "sparse":
        return "density" in effect or "sparse_format" in effect
    if what == "float":
        return effect.get("weight_dtype") in ("float16", "bfloat16")
    if what in ("bits", "zp"):
        return effect.get("weight_dtype") == "int"
    if what == "act":
        return int(effect.get("act_bits", 32)) < 32
    return False


def out_of_scope(request: ExportRequest) -> list[str]:
    """The target names of the layers the plan leaves float without a choice for them: those its scan
    left out of scope (e.g. an LM head), and those in scope that no block of the allocation names (a
    scan of some units only, ``--units``). A target that compresses every layer it is not told to
    skip (GPTQModel, AutoRound, NNCF) must be told to skip these too."""
    scope = request.plan.data.get("scope") or {}
    planned = {c["unit"] for c in request.choices.values() if c.get("kind") == "layer"}
    names = [u for u in scope.get("layers") or [] if u not in planned]
    names += [u for u in scope.get("out_of_scope") or {} if u not in planned]
    # a split MoE expert's layer has no name in the target's model (its choices were refused or dropped)
    return [request.target_name(u) for u in dict.fromkeys(names) if not request.split_expert(u)]


def require_transformer(request: ExportRequest, tool: str) -> None:
    if not request.is_transformer:
        spec = ((request.plan.data.get("model") or {}).get("spec") or {}).get("source", "?")
        raise UserInputError(f"--to {tool} is for Hugging Face transformers (a plan of --model hf:DIR); this plan's "
                             f"model is {spec!r}. Use --to modelopt, onnxruntime, nncf or csv.")
