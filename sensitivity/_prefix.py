"""Run only what a probe changes: reuse, per batch, the activations before the first module it perturbs.

A probe perturbs one unit; everything the model computes before that unit is the same as the
original's. The scan traces the model once with ``torch.fx`` and, per evaluation batch, keeps the
values that are alive at a *cut* (the graph position of the earliest perturbed node): a probe runs
the graph from there on. Probes are ordered by where they cut, so the cache only moves forward, one
segment at a time, and the whole prefix work of a scan is about one forward pass.

Exactness. The rest of the graph runs the same operations on the same values as ``model(x)``, so
the results are bit-identical (tested on ResNets, an MLP, branches and a transformer block). Guards:

- at start, the traced graph must reproduce ``model(x)`` bit for bit on the check inputs;
- a probe's cut comes from what it changed: parameters and buffers (object and values), modules
  (swapped), hooks. A change the graph cannot place (a hook on a module the trace went through, a
  swapped non-leaf module, a global hook) runs that probe in full;
- every probe is checked: the check inputs run from the cut with values cached *before* the probe
  must give bit for bit what ``model(x)`` gives; if not (a method changed something no check sees,
  e.g. a plain attribute), the probe runs in full.

BatchNorm recalibration runs its calibration batches through the same cache (in its own mode:
BatchNorm layers normalise by batch statistics there), and only BatchNorm layers after the cut are
measured: those before it see exactly what they saw in the original.

Memory is bounded by ``limit_mb`` (``scan --cache-mb``); batches beyond it are written to a
temporary folder and read back.

A model ``torch.fx`` cannot trace (data-dependent control flow; every Hugging Face transformer) is
cut by *module replay* instead (:class:`_Calls`): one run of the check inputs records the order in
which modules are entered and return; a probe cuts where its first changed module is entered, and
every module called once that returned before the cut (the outermost such) gives, per batch, the
output it gave before instead of running. The code between module calls still runs. The same
guards apply (the check inputs, every probe). An output that, in the recording, was handed only to
modules replayed at the cut is kept as a one-element NaN placeholder (:meth:`_Calls.dead`): if
anything reads it, the NaN reaches the check (or a batch's outputs), and placeholders are turned
off for the rest of the scan. Batches whose modules run in another order than the
check inputs' (routing that depends on the data) are not detected by the check; MoE experts, which
all read the router's output, are safe. A model neither way can cut runs every probe in full, and
the scan says why (``PrefixCache.reason``).
"""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sensplan._errors import first_line

#: the number of check samples whose values at every cut are kept to check each probe
CHECK_SAMPLES = 2


@dataclass
class _Entry:
    pos: int
    values: Any  # the live values (graph) or the replayed outputs by module (modules)
    path: str | None
    nbytes: int
    dead: bool = False  # module replay: some outputs are placeholders (:func:`_placeholders`)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _clone(value: Any, memo: dict[int, torch.Tensor]) -> Any:
    """A deep copy of the tensors in ``value`` (tuples, lists, dicts kept); the same tensor object
    twice gives the same copy twice, so aliasing between live values survives."""
    if isinstance(value, torch.Tensor):
        if _placeholder(value):  # one element, nothing to copy: writing to it raises
            return value
        key = id(value)
        if key not in memo:
            memo[key] = value.detach().clone()
        return memo[key]
    if isinstance(value, tuple):
        items = [_clone(v, memo) for v in value]
        if hasattr(value, "_fields"):  # a namedtuple keeps its type
            return type(value)(*items)
        if hasattr(type(value), "n_fields"):  # a torch.return_types structseq (values, indices)
            return type(value)(items)
        return tuple(items)
    if isinstance(value, list):
        return [_clone(v, memo) for v in value]
    if isinstance(value, dict):
        copied = {k: _clone(v, memo) for k, v in value.items()}
        if type(value) is not dict:  # e.g. a transformers ModelOutput: read by attribute
            try:
                return type(value)(**copied)
            except TypeError:
                pass
        return copied
    return value


def _placeholder(t: torch.Tensor) -> bool:
    """Whether ``t`` is one of :func:`_placeholders`'s: NaN, one element stored, expanded."""
    return (t.layout == torch.strided and t.is_floating_point() and t.numel() > 1
            and all(s == 0 for s in t.stride()) and t.untyped_storage().nbytes() == t.element_size()
            and bool(torch.isnan(t[(0,) * t.dim()])))


def _placeholders(value: Any) -> Any:
    """``value`` with each floating-point tensor replaced by NaN of its shape, stored as one element:
    what module replay keeps of an output nothing after the cut should read. If something does
    read it (code between module calls, which no recording sees), the NaN reaches the outputs and
    the check fails."""
    def nan(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or t.numel() <= 1 or t.layout != torch.strided:
            return t.detach().clone()  # kept whole (and not a view of a live value)
        return torch.full((1,) * t.dim(), float("nan"), dtype=t.dtype, device=t.device).expand(t.shape)

    if isinstance(value, torch.Tensor):
        return nan(value)
    if isinstance(value, (tuple, list, dict)):
        memo = {id(t): nan(t) for t in _tensors(value)}
        return _clone(value, memo)
    return value


def _strided(values: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``values`` that have a storage of their own to point at (not sparse, not empty)."""
    return (t for t in _tensors(values) if t.numel() and t.layout == torch.strided)


def _storages(values: Any) -> tuple[set[int], int]:
    """The storages (data pointers) of the tensors in ``values``, and their bytes."""
    seen: dict[int, int] = {}
    for t in _strided(values):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return set(seen), sum(seen.values())


#: the integer views a fingerprint sums a tensor's bytes as, widest first, with their sizes in bytes
_WORDS = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2))


def _fingerprint(t: torch.Tensor) -> tuple[Any, ...]:
    """What a probe's change to ``t`` shows in: its shape, dtype, and two wrapping integer sums of
    its bits (all of them, every other element). Any change to one element changes the first; a
    change that cancels in both sums (two equal rows swapped) is not one a compression method
    makes, and the check of each probe against the whole model catches what placement misses."""
    t = t.detach()
    head = (tuple(t.shape), t.dtype, t.layout)
    if t.is_meta:
        return head
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    flat = t.resolve_conj().resolve_neg().reshape(-1).view(torch.uint8)
    for dtype, size in _WORDS:
        if flat.numel() % size == 0 and flat.storage_offset() % size == 0:
            flat = flat.view(dtype)
            break
    with torch.inference_mode():
        sums = torch.stack([flat.sum(dtype=torch.int64), flat[1::2].sum(dtype=torch.int64)]).tolist()
    return *head, *sums


def _global_hooks() -> tuple[int, ...]:
    from torch.nn.modules import module as m

    return tuple(len(getattr(m, name, {})) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_module_registration_hooks"))


def _hook_keys(mod: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(mod._forward_hooks), tuple(mod._forward_pre_hooks)


class _Stop(BaseException):
    """The run reached the cut (:meth:`_Calls.run_until`); not an ``Exception``, which a model's
    own ``except Exception`` around a module call would catch."""


class _Mismatch(Exception):
    """A batch called a replayed module more than once: it cannot be replayed."""


class _Calls:
    """The model's module calls in the order they ran, recorded from one run of the check inputs:
    what a model ``torch.fx`` cannot trace is cut by instead of a graph (*module replay*).

    A position is a step of that run (a module entered or returned); a probe cuts at the step where
    its first changed module is entered. Below a cut, every module called exactly once and
    returned before the cut (the largest such, not those inside them) is *replayed*: its
    ``forward`` returns the output it gave on that batch before, without running. The code around
    the module calls (a transformer's mask, the residual sums) still runs."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.enter: dict[str, int] = {}
        self.exit: dict[str, int] = {}
        self.calls: Counter[str] = Counter()
        self.caller: dict[str, str | None] = {}  # the module running when it was first entered
        # who read each module's outputs after it returned: per output storage, the modules
        # running (the reader itself included) at each call handed it; the model's own outputs
        # are read by its caller (no module)
        self.readers: dict[str, dict[int, list[frozenset[str]]]] = {}
        alive: dict[int, list[tuple[str, Any]]] = {}  # storage -> (module, a weak reference to its output)
        step = 0
        stack: list[str] = []

        def read(ptrs: Iterable[int], running: frozenset[str]) -> None:
            for p in ptrs:
                for maker, ref in alive.get(p, ()):
                    if ref() is not None:  # a storage freed and reused is not the output read
                        self.readers[maker].setdefault(p, []).append(running)

        def wrap(name: str, forward: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                nonlocal step
                self.calls[name] += 1
                if name not in self.enter:
                    self.enter[name], self.caller[name] = step, stack[-1] if stack else None
                step += 1
                stack.append(name)
                read(_storages((args, kwargs))[0], frozenset(stack))
                try:
                    out = forward(*args, **kwargs)
                    made = {t.untyped_storage().data_ptr(): t for t in _strided(out)}
                    self.readers[name] = {p: [] for p in made}
                    for p, t in made.items():
                        alive.setdefault(p, []).append((name, weakref.ref(t)))
                    if name == "":
                        read(made, frozenset())
                    return out
                finally:
                    stack.pop()
                    self.exit[name] = step
                    step += 1
            return run

        with _patched(model, {n: (lambda f, n=n: wrap(n, f)) for n, _ in model.named_modules()}), \
                torch.inference_mode():
            model(x)
        self.end = step  # beyond every call: the cut of a probe that changed nothing
        self.once = {n for n, c in self.calls.items() if c == 1 and n in self.exit}
        # a module is ever replayed only when another one is entered after it returned and before
        # its caller returns (the root: by a probe that changed nothing)
        steps = sorted(self.enter.values())

        def replayable(n: str) -> bool:
            up = self.caller.get(n)
            until = self.exit[up] if up is not None else self.end
            i = bisect.bisect_right(steps, self.exit[n])
            return n == "" or (i < len(steps) and steps[i] < until)

        self.replayable = {n for n in self.once if replayable(n)}
        #: the check inputs' output of every replayable module (by name); empty when they did not fit
        self.outputs: dict[str, Any] = {}
        self.check: torch.Tensor | None = None
        self._skips: dict[int, list[str]] = {}
        self._dead: dict[int, set[str]] = {}

    def keep_outputs(self, x: torch.Tensor, limit: int) -> bool:
        """Record the replayable modules' outputs for ``x`` (the check inputs), unless they take
        more than ``limit`` bytes. Whether they fit."""
        self.outputs, total, fits = {}, 0, True

        def wrap(name: str, forward: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                nonlocal total, fits
                out = forward(*args, **kwargs)
                if fits:
                    self.outputs[name] = _clone(out, {})
                    total += sum(t.numel() * t.element_size() for t in _tensors(out))
                    fits = total <= limit
                return out
            return run

        with _patched(self.model, {n: (lambda f, n=n: wrap(n, f)) for n in self.replayable}), torch.no_grad():
            self.model(x)
        if not fits:
            self.outputs = {}
        else:
            self.check = x
        return fits

    def deepest(self, name: str) -> int | None:
        """Where a change to ``name`` (a module or tensor FQN) first shows: the step that enters the
        deepest module at or above it that ran; None when none did but the root."""
        parts = name.split(".") if name else []
        for k in range(len(parts), 0, -1):
            at = self.enter.get(".".join(parts[:k]))
            if at is not None:
                return at
        return None

    def position(self, name: str) -> int:
        """The first step that runs ``name`` or anything inside it (the deepest caller above when it
        never ran itself)."""
        pre = name + "."
        inside = [i for n, i in self.enter.items() if n == name or n.startswith(pre)]
        if inside:
            return min(inside)
        at = self.deepest(name)
        return at if at is not None else 0

    def skipped(self, cut: int) -> list[str]:
        """The modules replayed below ``cut``: called once, returned before it, and not inside
        another such module."""
        if cut not in self._skips:
            def done(n: str | None) -> bool:
                return n is not None and n in self.once and self.exit[n] < cut

            out = []
            for n in self.replayable:
                if not done(n):
                    continue
                up = self.caller.get(n)
                while up is not None and not done(up):
                    up = self.caller.get(up)
                if up is None:
                    out.append(n)
            self._skips[cut] = sorted(out, key=self.enter.__getitem__)
        return self._skips[cut]

    def dead(self, cut: int) -> set[str]:
        """The modules replayed below ``cut`` whose outputs nothing after it reads, as far as the
        recording saw: each output handed to other modules after it was made, and only to modules
        replayed there too. (An output never handed to a module, e.g. an attention's output summed
        with the residual by the code around it, is kept.) Their outputs are kept as placeholders
        (:func:`_placeholders`), which the check of each probe puts to the test."""
        if cut not in self._dead:
            skipped = set(self.skipped(cut))

            def unread(n: str) -> bool:
                outs = self.readers.get(n, {})
                return bool(outs) and all(r and all(s & skipped for s in r) for r in outs.values())

            self._dead[cut] = {n for n in skipped if n and unread(n)}
        return self._dead[cut]

    def run_until(self, x: Any, cut: int) -> None:
        """``model(x)`` until it enters a module first entered at ``cut`` or later: every module
        replayed below ``cut`` runs (and leaves its state, if any, from ``x``)."""
        def stop(forward: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                raise _Stop
            return run

        after = {n: stop for n, at in self.enter.items() if n and at >= cut}
        with suppress(_Stop), _patched(self.model, after):
            self.model(x)

    def run(self, x: Any, replay: dict[str, Any], record: Sequence[str],
            dead: Iterable[str] = ()) -> tuple[Any, dict[str, Any] | None]:
        """``model(x)`` with the modules in ``replay`` (name -> output) returning those outputs, and
        the outputs of the modules in ``record`` (private copies; placeholders for those in
        ``dead``), or None when one of them did not run exactly once on ``x`` (its output is not
        this batch's to keep). Raises :class:`_Mismatch` when a replayed module is called twice."""
        got: dict[str, Any] = {}
        wanted = set(record)
        dead = set(dead)
        calls: Counter[str] = Counter()

        def keep(name: str, out: Any, private: bool) -> None:
            if name in wanted:
                got[name] = _placeholders(out) if name in dead else out if private else _clone(out, {})

        def wrap(name: str, forward: Any) -> Any:
            def run(*args: Any, **kwargs: Any) -> Any:
                calls[name] += 1
                if name in replay:
                    if calls[name] > 1:
                        raise _Mismatch(name)
                    keep(name, replay[name], True)
                    return _clone(replay[name], {})
                out = forward(*args, **kwargs)
                keep(name, out, False)
                return out
            return run

        with _patched(self.model, {n: (lambda f, n=n: wrap(n, f)) for n in set(replay) | wanted}):
            out = self.model(x)
        return out, (got if all(calls[n] == 1 for n in wanted) else None)


@contextmanager
def _patched(model: nn.Module, wrappers: dict[str, Any]) -> Iterator[None]:
    """Each named module's ``forward`` replaced by ``wrappers[name](forward)`` (an attribute of the
    instance: its hooks still run around it), restored after."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for name, wrap in wrappers.items():
            m = model.get_submodule(name) if name else model
            own = m.__dict__.get("forward")
            m.forward = wrap(m.forward)  # type: ignore[method-assign]
            saved.append((m, own))  # only once set: a module that refuses it is left as it is
        yield
    finally:
        for m, own in reversed(saved):
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own  # type: ignore[method-assign]


#: the count of probes run from a cut unchecked (the check values did not fit)
UNCHECKED = "probes unchecked (the check values exceed a quarter of --cache-mb)"


class PrefixCache:
    """The prefix cache of one scan: ``forward(x)`` runs ``model`` on ``x`` (a batch sliced from one
    of ``bases``, the scan's data tensors) from the current cut (:meth:`probing`), or in full.

    ``reason`` says why the cache is off (None when it is on); ``record()`` is what the scan
    reports of it."""

    def __init__(self, model: nn.Module, bases: Sequence[torch.Tensor], check: torch.Tensor,
                 limit_mb: float = 2048, *, spill_root: str | None = None, order_only: bool = False) -> None:
        """``spill_root``: the folder to spill into (a temporary one by default); ``order_only``:
        trace the model only to order probes (``position``), never run from a cut."""
        self.model = model
        self.limit = int(limit_mb * 2 ** 20)
        self.reason: str | None = None
        self.cut: int | None = None
        self.counts: Counter[str] = Counter()
        self.entries: dict[tuple[Any, ...], _Entry] = {}
        self.in_memory = 0
        self.held = self.peak = 0  # bytes the entries hold, in memory and on disk: now and at most
        self.spill_dir: str | None = None
        self.spill_root = spill_root
        self.order_only = order_only
        self.output = 0
        self._bases = list(bases)
        self._check = check[:CHECK_SAMPLES]
        self._check_values: dict[int, list[Any]] | None = None
        self._no_dead = False  # module replay: a placeholder was read, so none from then on
        if self.limit <= 0:
            self.reason = "turned off (--cache-mb 0): every probe runs the whole model"
            return
        #: the module calls when the scan cuts by module replay (see :class:`_Calls`), else None (the graph)
        self.calls: _Calls | None = None
        self.no_graph: str | None = None  # why the graph could not be used
        try:
            try:
                self._trace()
            except Exception as e:  # noqa: BLE001 - the user's model: anything torch.fx cannot follow
                self.no_graph = str(e) if isinstance(e, _Unusable) else \
                    f"torch.fx cannot trace or run the model ({type(e).__name__}: {first_line(e, 200)})"
                self._record_calls()
            if order_only:
                return
            self._snapshot()
            if self.calls is not None:
                return
            for k in range(len(self._check), 0, -1):  # two samples, or one when two do not fit
                self._check_values = self._values_at_every_cut(self._check[:k])
                if self._check_values is not None:
                    self._check = self._check[:k]
                    break
            else:
                self.counts[UNCHECKED] = 0
        except _Unusable as e:
            self.reason = f"{self.no_graph}; {e}" if self.no_graph else str(e)
        except Exception as e:  # noqa: BLE001 - the user's model: anything the replay cannot follow
            self.reason = ((f"{self.no_graph}; " if self.no_graph else "")
                           + f"module replay failed ({type(e).__name__}: {first_line(e, 200)}); every probe "
                             f"runs the whole model")

    @property
    def active(self) -> bool:
        return self.reason is None

    # -- the graph -------------------------------------------------------------------------------

    def _trace(self) -> None:
        from torch import fx

        gm = fx.symbolic_trace(self.model)
        self.nodes = list(gm.graph.nodes)
        holders = [n for n in self.nodes if n.op == "placeholder"]
        if not holders or any(not n.args for n in holders[1:]):
            raise _Unusable("the model's forward takes more than one input: every probe runs the whole model")
        self.input = holders[0]
        self.defaults = {n: n.args[0] for n in holders[1:]}
        self.last_use: dict[Any, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.frees: list[list[Any]] = [[] for _ in self.nodes]
        for n, i in self.last_use.items():
            self.frees[i].append(n)
        # the first node that calls a module (one may be called twice) or reads an attribute
        self.leaf_at: dict[str, int] = {}
        self.attr_at: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op in ("call_module", "get_attr"):
                (self.leaf_at if n.op == "call_module" else self.attr_at).setdefault(str(n.target), i)
        self.output = next(i for i, n in enumerate(self.nodes) if n.op == "output")
        self._live_cache: dict[int, list[Any]] = {}
        if self.model._forward_hooks or self.model._forward_pre_hooks:
            raise _Unusable("the model has hooks on its top module: every probe runs the whole model")
        with torch.inference_mode():
            want = self.model(self._check)
            got = self._run(self._check, start=None, stop_at=None)
        if not _same(want, got):
            raise _Unusable("the traced graph does not reproduce the model's outputs bit for bit: every "
                            "probe runs the whole model")

    def _record_calls(self) -> None:
        """Module replay instead of the graph: record the module calls, keep the check inputs'
        outputs of the modules a probe may replay (two samples, or one when two take more than a
        quarter of the cache; none when even one does: probes are then unchecked), and check that
        replaying the modules returned before the middle one gives ``model(x)`` bit for bit."""
        if self.model._forward_pre_hooks:  # a pre-hook on the top module could change its input
            raise _Unusable("the model has pre-hooks on its top module: every probe runs the whole model")
        calls = _Calls(self.model, self._check)
        self.calls, self.output = calls, calls.end
        if self.order_only:
            return
        if not any(calls.keep_outputs(self._check[:k], self.limit // 4) for k in range(len(self._check), 0, -1)):
            self.counts[UNCHECKED] = 0
            return
        self._check = calls.check if calls.check is not None else self._check
        base = self._bases[0]
        # a full run on other samples before each replay of the check inputs: state a replayed
        # module would have left (an attribute set in forward) is then another batch's, and shows
        self._decoy = base[-len(self._check):] if len(base) > len(self._check) else self._check.flip(0)
        steps = sorted(calls.enter.values())
        for cut in (steps[len(steps) // 2], calls.end):
            if not self._checks(cut, count=False):
                self.calls, self.output = None, 0
                raise _Unusable("replaying the model's modules does not reproduce its outputs bit for bit: "
                                "every probe runs the whole model")

    def live(self, pos: int) -> list[Any]:
        """The nodes before ``pos`` whose values a node at or after it reads (inputs included)."""
        if pos not in self._live_cache:
            self._live_cache[pos] = [n for n in self.nodes[:pos]
                                     if n.op != "get_attr" and self.last_use.get(n, -1) >= pos]
        return self._live_cache[pos]

    def position(self, modules: Iterable[str]) -> int:
        """Where a probe of these modules (FQNs) will probably cut: the first graph node that runs
        one of them or something inside; the end when none does (for ordering probes)."""
        if not self.active:
            return 0
        if self.calls is not None:
            return min((self.calls.position(n) for n in modules), default=self.calls.end)
        best = len(self.nodes)
        for name in modules:
            pre = name + "."
            for target, i in self.leaf_at.items():
                if (target == name or target.startswith(pre) or name.startswith(target + ".")) and i < best:
                    best = i
        return best

    def _fetch(self, node: Any) -> Any:
        obj: Any = self.model
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj

    def _run(self, x: torch.Tensor, start: tuple[int, list[Any]] | None, stop_at: int | None,
             on_cut: Any = None) -> Any:
        """Run the graph on ``x``: from ``start`` (a position and its live values, copied first) or
        from the input; call ``on_cut(env, position)`` on reaching ``stop_at`` (for caching; -1: at
        every position), then go on."""
        from torch.fx.node import map_arg

        env: dict[Any, Any] = {}
        if start is None:
            first = 0
            env[self.input] = x
            env.update(self.defaults)
        else:
            first, values = start
            env.update(zip(self.live(first), _clone(values, {}), strict=True))

        def arg(n: Any) -> Any:
            return env[n] if n in env else self._fetch(n)

        for i in range(first, len(self.nodes)):
            if on_cut is not None and (i == stop_at or stop_at == -1):
                on_cut(env, i)
            node = self.nodes[i]
            op = node.op
            if op == "placeholder":
                continue
            args, kwargs = map_arg(node.args, arg), map_arg(node.kwargs, arg)
            if op == "get_attr":
                env[node] = self._fetch(node)
            elif op == "call_module":
                env[node] = self.model.get_submodule(str(node.target))(*args, **kwargs)
            elif op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif op == "call_method":
                env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:  # output
                return args[0]
            for n in self.frees[i]:
                env.pop(n, None)
        raise RuntimeError("the traced graph has no output")

    def _values_at_every_cut(self, x: torch.Tensor) -> dict[int, list[Any]] | None:
        """The live values of every cut for ``x`` (the check inputs), from one run of the original;
        None when they would take more than a quarter of the cache."""
        out: dict[int, list[Any]] = {}
        copies: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id -> (original, version, copy)
        total = 0

        def keep(env: dict[Any, Any], pos: int) -> None:
            nonlocal total
            if self.nodes[pos].op == "placeholder" or total > self.limit // 4:
                return
            values = [env[n] for n in self.live(pos)]
            for t in _tensors(values):
                have = copies.get(id(t))
                if have is None or have[1] != t._version:  # new, or changed in place since copied
                    copies[id(t)] = (t, t._version, t.detach().clone())
                    total += t.numel() * t.element_size()
            out[pos] = _clone(values, {id(t): copies[id(t)][2] for t in _tensors(values)})

        with torch.no_grad():  # not inference mode: tensors made there have no version counter
            self._run(x, None, -1, keep)
        return out if total <= self.limit // 4 else None

    # -- what a probe changed --------------------------------------------------------------------

    def _snapshot(self) -> None:
        self.mod_ids = {n: id(m) for n, m in self.model.named_modules()}
        self.hooks = {n: _hook_keys(m) for n, m in self.model.named_modules()}
        # each tensor's object and a fingerprint of its values, not a copy: a copy of a language
        # model's weights would double its memory
        self.tensors = {n: (t, _fingerprint(t)) for n, t in
                        [*self.model.named_parameters(), *self.model.named_buffers()]}
        self.global_hooks = _global_hooks()
        # every name of a shared module or tensor (tied weights): a change shows under the first
        self.aliases: dict[str, list[str]] = {}
        seen: dict[int, str] = {}
        for n, obj in [*self.model.named_modules(remove_duplicate=False),
                       *self.model.named_parameters(remove_duplicate=False),
                       *self.model.named_buffers(remove_duplicate=False)]:
            first = seen.setdefault(id(obj), n)
            self.aliases.setdefault(first, [first])
            if n != first:
                self.aliases[first].append(n)

    def _cut_now(self) -> int | None:
        """The graph position of the first node the model's current state changes (the output
        when nothing changed), or None when a change cannot be placed."""
        if _global_hooks() != self.global_hooks:
            return None
        touched: list[str] = []
        mods = dict(self.model.named_modules())
        for n, m in mods.items():
            if self.mod_ids.get(n) != id(m) or self.hooks.get(n) != _hook_keys(m):
                touched.append(n)
        now = dict([*self.model.named_parameters(), *self.model.named_buffers()])
        for n, t in now.items():
            old = self.tensors.get(n)
            if old is None or old[0] is not t or old[1] != _fingerprint(t):
                touched.append(n)
        touched.extend(n for n in self.tensors if n not in now)
        cut = self.output
        for name in touched:
            for alias in self.aliases.get(name, [name]):
                i = self._node_of(alias)
                if i is None:
                    return None
                cut = min(cut, i)
        return cut

    def _node_of(self, name: str) -> int | None:
        """The first node that runs ``name`` (a module or tensor FQN): a leaf module at or above it,
        or a ``get_attr`` of it; None for anything else (the root, a module the trace went through)."""
        if self.calls is not None:
            return self.calls.deepest(name)
        parts = name.split(".") if name else []
        found = [i for i in (self.attr_at.get(name),
                             *(self.leaf_at.get(".".join(parts[:k])) for k in range(len(parts), 0, -1)))
                 if i is not None]
        return min(found) if found else None

    @contextmanager
    def probing(self) -> Iterator[None]:
        """Inside a probe (entered already): find its cut, check it on the check inputs, and run
        ``forward`` from it until exit."""
        cut = self._cut_now() if self.active else None
        if cut is not None and not self._checks(cut):
            cut = None
        self.counts["probes run from a cut" if cut is not None else "probes run in full"] += 1
        self.cut = cut
        try:
            yield
        finally:
            self.cut = None

    @contextmanager
    def unchanged(self) -> Iterator[None]:
        """Outside any probe: cache what reaches the output, so that a second pass over the same
        batches (the task's reference, then the baseline) does not run the model again."""
        # (module replay keeps no final outputs: a language model's are its logits, often the
        # largest tensor it makes, and the pass they save is one of many)
        self.cut = self.output if self.active and not self.order_only and self.calls is None else None
        try:
            yield
        finally:
            self.cut = None

    def _checks(self, cut: int, count: bool = True) -> bool:
        if self.calls is not None:
            if not self.calls.outputs:  # the check values did not fit: the placement is trusted
                self.counts[UNCHECKED] += count
                return True
            dead = self._dead_at(cut)
            if dead and self._replays(self.calls, cut, dead):
                return True
            ok = self._replays(self.calls, cut, set())
            if dead and ok:  # only the placeholders made the difference: one was read
                self._placeholders_off(count)
            return ok
        if self._check_values is None:  # the check values did not fit: the placement is trusted
            self.counts[UNCHECKED] += 1
            return True
        values = self._check_values.get(cut)
        if values is None:
            return False
        with torch.inference_mode():
            return _same(self.model(self._check), self._run(self._check, (cut, values), None))

    def _replays(self, calls: _Calls, cut: int, dead: set[str]) -> bool:
        """Whether replaying the check inputs' outputs below ``cut`` (placeholders for ``dead``)
        gives ``model(x)`` bit for bit."""
        replay = {n: _placeholders(calls.outputs[n]) if n in dead else calls.outputs[n]
                  for n in calls.skipped(cut)}
        with torch.inference_mode():
            try:  # replay first, after another batch (up to the cut); the whole model last
                calls.run_until(self._decoy, cut)
                got = calls.run(self._check, replay, [])[0]
            except Exception:  # noqa: BLE001 - whatever the replay broke: that probe runs in full
                return False
            return _same(self.model(self._check), got)

    def _dead_at(self, cut: int, key: tuple[Any, ...] | None = None) -> set[str]:
        """The modules whose outputs are kept as placeholders below ``cut``: none once one was read,
        when the check values did not fit (nothing would test them), and for a batch run with
        modules in training mode (BatchNorm recalibration: a batch run twice would count twice)."""
        if self.calls is None or self._no_dead or not self.calls.outputs or (key is not None and key[-1]):
            return set()
        return self.calls.dead(cut)

    def _placeholders_off(self, count: bool = True) -> None:
        """An output kept as a placeholder was read: keep every output from now on, and drop the
        entries that hold placeholders."""
        self._no_dead = True
        if count:
            self.counts["placeholders turned off (an output thought unread was read)"] += 1
        for key in [k for k, e in self.entries.items() if e.dead]:
            self._drop(self.entries.pop(key))

    # -- running ---------------------------------------------------------------------------------

    def forward(self, x: Any) -> Any:
        """``model(x)``, from the current cut when there is one and ``x`` is a slice of the scan's data."""
        cut = self.cut
        key = self._key(x) if cut is not None else None
        if key is None or cut is None:
            return self.model(x)
        entry = self.entries.get(key)
        start = (entry.pos, self._load(entry)) if entry is not None and entry.pos <= cut else None
        if self.calls is not None:
            return self._replay(self.calls, x, key, cut, start, entry is not None and entry.dead)
        if start is not None and start[0] == cut:
            self.counts["batches from the cache"] += 1
            return self._run(x, start, None)
        self.counts["batches cached"] += 1
        return self._run(x, start, cut, lambda env, _: self._store(key, cut, [env[n] for n in self.live(cut)]))

    def _replay(self, calls: _Calls, x: torch.Tensor, key: tuple[Any, ...], cut: int,
                start: tuple[int, Any] | None, placeholders: bool) -> Any:
        """``forward`` by module replay: from the batch's outputs at ``cut`` when it has them, else
        from those of an earlier cut (or none), keeping the outputs at ``cut`` (``placeholders``:
        ``start`` holds some). A run that replayed placeholders and failed, or gave a value that is
        not finite (code that reads an earlier output on some batches only, which the check inputs
        did not show), turns placeholders off and runs the batch whole (hooks after the cut then see
        it twice)."""
        replayed = start is not None and placeholders
        try:
            if start is not None and start[0] == cut:
                self.counts["batches from the cache"] += 1
                out, got = calls.run(x, start[1], [])[0], None
            else:
                out, got = calls.run(x, start[1] if start is not None else {}, calls.skipped(cut),
                                     self._dead_at(cut, key))
        except _Mismatch:  # this batch calls a replayed module twice: it runs whole
            self.counts["batches run in full (a replayed module ran twice)"] += 1
            old = self.entries.pop(key, None)
            if old is not None:
                self._drop(old)
            return self.model(x)
        except Exception:  # noqa: BLE001 - e.g. a write to a placeholder
            if not replayed:
                raise
            self._placeholders_off()
            return self.model(x)
        # (a NaN reaches the sum; a sum that overflows only turns placeholders off)
        if replayed and not all(bool(torch.isfinite(t.sum())) for t in _tensors(out) if t.is_floating_point()):
            self._placeholders_off()
            return self.model(x)
        if start is not None and start[0] == cut:
            return out
        if got is None:
            self.counts["batches not cached (a module ran other than once)"] += 1
        else:
            self.counts["batches cached"] += 1
            self._store(key, cut, got, copied=True)
        return out

    def _key(self, x: Any) -> tuple[Any, ...] | None:
        if not isinstance(x, torch.Tensor):
            return None
        ptr = x.untyped_storage().data_ptr()
        for i, b in enumerate(self._bases):
            if b.untyped_storage().data_ptr() == ptr and b.dtype == x.dtype:
                return (i, x.storage_offset(), tuple(x.shape), tuple(x.stride()),
                        torch.is_inference_mode_enabled(), _autocast(x.device.type),
                        tuple(n for n, m in self.model.named_modules() if m.training))
        return None

    def _store(self, key: tuple[Any, ...], pos: int, values: Any, copied: bool = False) -> None:
        """Keep ``values`` (the live values of graph position ``pos``, or the outputs of the modules
        replayed below step ``pos``) for the batch ``key`` (``copied``: they are private copies)."""
        old = self.entries.pop(key, None)
        if old is not None:
            self._drop(old)
        flat = [t for t in _tensors(values) if t.numel()]
        ptrs = {t.untyped_storage().data_ptr() for t in flat}
        if len(ptrs) < len({id(t) for t in flat}):  # views of one another: a copy would split them
            self.counts["batches not cached (live values are views of one another)"] += 1
            return
        values = values if copied else _clone(values, {})
        nbytes = _storages(values)[1]
        dead = any(_placeholder(t) for t in _tensors(values))
        if self.in_memory + nbytes <= self.limit:
            self.in_memory += nbytes
            self._keep(key, _Entry(pos, values, None, nbytes, dead))
            return
        if self.spill_dir is None:
            self.spill_dir = tempfile.mkdtemp(prefix="sensplan-cache-", dir=self.spill_root)
        path = os.path.join(self.spill_dir, f"{len(self.entries)}-{abs(hash(key))}.pt")
        try:
            torch.save(values, path)
        except Exception:  # noqa: BLE001 - a live value torch cannot save: that batch is not cached
            self.counts["batches not cached (a live value cannot be saved)"] += 1
            return
        self.counts["batches spilled to disk"] += 1
        self._keep(key, _Entry(pos, None, path, nbytes, dead))

    def _keep(self, key: tuple[Any, ...], entry: _Entry) -> None:
        self.entries[key] = entry
        self.held += entry.nbytes
        self.peak = max(self.peak, self.held)

    def _load(self, entry: _Entry) -> Any:
        if entry.values is not None:
            return entry.values
        # our own file, written above: any Python value the graph passes along may be in it
        got = torch.load(str(entry.path), map_location=self._check.device, weights_only=False)
        return got if self.calls is not None else list(got)

    def _drop(self, entry: _Entry) -> None:
        self.held -= entry.nbytes
        if entry.path is not None:
            os.remove(entry.path)
        else:
            self.in_memory -= entry.nbytes

    def close(self) -> None:
        """Free the cache and remove what it spilled to disk."""
        self.entries.clear()
        self.in_memory = self.held = 0
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None

    def record(self) -> dict[str, Any]:
        """What the scan reports: whether the cache ran, why not, and what it did."""
        how = None if not self.active else "graph (torch.fx)" if self.calls is None else \
            f"module replay ({self.no_graph})"
        return {"used": self.active, "reason": self.reason, "limit_mb": round(self.limit / 2 ** 20, 1),
                **({"peak_mb": round(self.peak / 2 ** 20, 1)} if self.active and not self.order_only else {}),
                **({"mode": how} if how else {}),
                **({"where": "in each worker (this process only ordered the probes)"} if self.order_only else {}),
                **dict(sorted(self.counts.items()))}


class _Unusable(Exception):
    pass


def _autocast(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4 takes no device type
        return bool(torch.is_autocast_enabled())


def _same(a: Any, b: Any) -> bool:
    ta, tb = list(_tensors(a)), list(_tensors(b))
    if len(ta) != len(tb) or (not ta and a != b):
        return False
    return all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


class CachedModel(nn.Module):
    """What a task evaluates during a scan: ``model`` (a submodule, so ``eval()`` and its device work
    as usual), called through its prefix cache."""

    def __init__(self, model: nn.Module, cache: PrefixCache) -> None:
        super().__init__()
        self.model = model
        self._cache = cache

    def forward(self, x: Any) -> Any:
        return self._cache.forward(x)
