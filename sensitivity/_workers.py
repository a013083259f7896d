"""Spread a scan's probes over worker processes (``scan --workers N``) or a Ray cluster (``--ray``).

A scan is thousands of independent probes. Each worker holds the model, the data and the task's
reference state once (sent once, when it starts), rebuilds the scan's structure (the same units and
probes in the same order: checked), and measures the probes it is given in chunks, in the order of
where they cut the model, so that its own prefix cache (``_prefix``) moves forward. The main
process keeps the only journal: it appends each row as a chunk comes back, so a killed scan
resumes as a single-process one does. A chunk whose worker died is given to a fresh worker (twice
at most); the table is the single-process scan's (up to float rounding when the workers run
with fewer torch threads than the single process would).

Local workers are spawned processes (``torch.multiprocessing``, so tensors travel through shared
memory); each uses ``threads`` torch threads. On Ray, each worker is an actor (``num_gpus`` of a GPU
each when the scan runs on CUDA), started by ``ray.init()`` on this machine or on a cluster by
address. Ray is an optional extra: ``pip install -e ".[ray]"``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sensplan._errors import SensplanError, UserInputError, first_line

#: a chunk whose worker died is retried this many times before the scan gives up
RETRIES = 2


@dataclass
class Payload:
    """What every worker needs, sent once: the model (its spec and weights, or the pickled module),
    the data, the configuration, the baseline result and the probes the main process will ask for."""

    spec: Any
    state: dict[str, torch.Tensor] | None
    module: bytes | None
    data: Any
    calib: Any
    config: Any
    base: Any
    device: str
    dtype: torch.dtype | None
    threads: int
    probes: list[tuple[str, str, str]]
    methods: dict[str, type] = field(default_factory=dict)
    spill_root: str | None = None
    channels_last: bool = False  # the inputs' memory order (see _eval.channels_last_wins)


def payload(model: nn.Module, model_spec: Any, data: Any, calib: Any, config: Any, base: Any,
            device: torch.device, dtype: torch.dtype | None, threads: int, todo: Sequence[Any],
            spill_root: str | None = None, channels_last: bool = False) -> Payload:
    """The payload of ``model`` (on the CPU): rebuilt from ``model_spec`` with its current weights,
    or pickled whole when there is no spec (its class must be importable)."""
    from sensplan.sensitivity._scan import _setting_key
    from sensplan.sensitivity.methods import METHODS

    state = module = None
    if model_spec is not None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    else:
        buf = io.BytesIO()
        try:
            torch.save(model, buf)
        except Exception as e:  # noqa: BLE001 - whatever pickle says about the user's class
            raise UserInputError(
                f"--workers sends the model to each worker, but it cannot be pickled ({type(e).__name__}: "
                f"{first_line(e, 200)}). Give the scan a model spec (scan(..., model_spec=...), as the CLI's "
                f"--model does) or run without workers.") from e
        module = buf.getvalue()
    names = {m.name for m, _, _ in todo}
    methods = {n: type(METHODS.get(n)) for n in names}
    return Payload(model_spec, state, module, data.to("cpu"), calib.to("cpu") if calib is not None else None,
                   config, base, str(device), dtype, threads,
                   [(m.name, u, _setting_key(s)) for m, u, s in todo], methods, spill_root, channels_last)


def device_in_turn(device: str | torch.device, rank: int) -> torch.device:
    """Local worker ``rank``'s device: a CUDA device without an index means one GPU each in turn
    (``cuda:K`` pins every worker to GPU K)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", rank % torch.cuda.device_count())
    return dev


class _Worker:
    """One worker's scan: built from a payload, measures probes by index."""

    def __init__(self, p: Payload, rank: int = 0) -> None:
        from sensplan.sensitivity._eval import batchnorm_statistics
        from sensplan.sensitivity._models import build_model
        from sensplan.sensitivity._scan import _probes_to_run, _scan_context, _setting_key, measuring
        from sensplan.sensitivity.methods import METHODS
        from sensplan.sensitivity.tasks import get_task

        torch.set_num_threads(max(1, p.threads))
        for name, cls in p.methods.items():  # methods registered at run time in the main process
            if name not in METHODS.names():
                METHODS.register(cls)
        dev = device_in_turn(p.device, rank)
        if p.module is not None:
            model: nn.Module = torch.load(io.BytesIO(p.module), weights_only=False)
        else:
            model = build_model(p.spec)
            model.load_state_dict(p.state or {})
        model = model.to(dev).eval()
        cfg = p.config
        # the main process's choice of memory order, restated (pickling need not keep strides)
        data = p.data.to(dev).in_layout(p.channels_last)
        calib = p.calib.to(dev).in_layout(p.channels_last) if p.calib is not None else None
        task = get_task(cfg.task)
        state = task.prepare(model, data, cfg.batch_size, dev, p.dtype)
        ctx = _scan_context(model, data, calib, cfg, dev)
        reference = batchnorm_statistics(model, calib) if calib is not None else {}
        _, todo = _probes_to_run(ctx, cfg)
        if [(m.name, u, _setting_key(s)) for m, u, s in todo] != p.probes:
            raise RuntimeError("a scan worker found other probes than the main process: the model or a method "
                               "is not deterministic. Run without --workers.")
        self.todo = todo
        self.prober, self.cache = measuring(ctx, task, state, p.base, cfg, reference, p.dtype,
                                            spill_root=p.spill_root)

    def run(self, indices: Sequence[int]) -> list[tuple[int, dict[str, Any]]]:
        return list(self.prober.run(self.todo, indices))


class WorkerStartError(RuntimeError):
    """A worker could not set itself up (not retried: every worker would fail the same way)."""


_WORKER: _Worker | None = None
_START_ERROR: str = ""


def _start_error(e: BaseException) -> str:
    return f"a scan worker could not start: {type(e).__name__}: {first_line(e, 500)}"


def _init(p: Payload, counter: Any) -> None:
    global _WORKER, _START_ERROR
    with counter.get_lock():
        rank = int(counter.value)
        counter.value += 1
    try:
        _WORKER = _Worker(p, rank)
    except Exception as e:  # noqa: BLE001 - said by the first chunk, not as a dead pool
        _START_ERROR = _start_error(e)


def _chunk(indices: list[int]) -> list[tuple[int, dict[str, Any]]]:
    if _WORKER is None:
        raise WorkerStartError(_START_ERROR or "a scan worker did not start")
    return _WORKER.run(indices)


def chunks(indices: Sequence[int], workers: int) -> list[list[int]]:
    """``indices`` (in cut order) in consecutive chunks: about sixteen per worker, so that a slow
    chunk does not hold the scan up, Ctrl-C loses little (rows reach the journal as chunks finish),
    and each worker's cuts still move forward."""
    size = max(1, math.ceil(len(indices) / (16 * workers)))
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]


class ProcessRunner:
    """Measures probes on ``workers`` spawned local processes; ``run(indices)`` yields rows as chunks
    finish."""

    def __init__(self, p: Payload, workers: int) -> None:
        self.payload, self.workers = p, workers
        self.retried = 0
        self.pool: Any = None

    def _start(self) -> Any:
        from concurrent.futures import ProcessPoolExecutor

        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init,
                                   initargs=(self.payload, ctx.Value("i", 0)))

    def run(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        todo = chunks(indices, self.workers)
        tries: dict[int, int] = {}
        while todo:
            if self.pool is None:
                self.pool = self._start()
            futures = {self.pool.submit(_chunk, c): k for k, c in enumerate(todo)}
            left = dict(enumerate(todo))
            broken = False
            running: set[int] = set()  # the chunks being measured when a worker died
            while futures:
                running = {k for f, k in futures.items() if f.running()}
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    k = futures.pop(f)
                    try:
                        rows = f.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    del left[k]
                    yield from rows
            todo = list(left.values())
            if broken:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None
                # the chunks seen running when it broke; all that are left when none was seen yet
                # (a future is marked running a moment after it is submitted), so that every break
                # counts against some chunk and a chunk that always kills its worker ends the scan
                charged = (running & set(left)) or set(left)
                for k in charged:
                    first = left[k][0]
                    tries[first] = tries.get(first, 0) + 1
                    if tries[first] > RETRIES:
                        raise RuntimeError(f"a scan worker died {RETRIES + 1} times on the same probes; run "
                                           f"without --workers to see why")
                self.retried += len(charged)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class RayRunner:
    """Measures probes on ``workers`` Ray actors (``address``: a running cluster; None: start Ray on
    this machine with ``workers`` CPUs)."""

    def __init__(self, p: Payload, workers: int, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise UserInputError("--ray needs Ray, an optional extra: pip install -e \".[ray]\" (or pip install "
                                 "ray). Or use --workers N for processes on this machine.") from None
        self.ray = ray
        self.started = False
        self.actors: list[Any] = []
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers * max(1, p.threads), include_dashboard=False, log_to_driver=False)
            self.started = True
        try:
            # on CUDA, the cluster's G GPUs shared out evenly: 1 / ceil(N / G) of one each
            have = int(ray.cluster_resources().get("GPU", 0)) if p.device.startswith("cuda") else 0
            gpus = 1.0 / math.ceil(workers / have) if have else 0
            cpus = max(1, p.threads) if not address else 1  # a cluster's machines set their own threads
            self.actor_class = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(_RayWorker)
            self.ref = ray.put(p)
            self.workers = workers
            self.actors = [self._actor() for _ in range(workers)]
            self.retried = 0
        except BaseException:
            self.close()
            raise

    def _actor(self) -> Any:
        return self.actor_class.remote(self.ref)  # type: ignore[attr-defined]

    def run(self, indices: Sequence[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        ray = self.ray
        queue = list(enumerate(chunks(indices, self.workers)))
        tries: dict[int, int] = {}
        busy: dict[Any, tuple[int, int, list[int]]] = {}  # ref -> (actor slot, chunk number, chunk)
        free = list(range(len(self.actors)))
        while queue or busy:
            while queue and free:
                slot = free.pop()
                k, c = queue.pop(0)
                busy[self.actors[slot].run.remote(c)] = (slot, k, c)
            done, _ = ray.wait(list(busy), num_returns=1)
            for ref in done:
                slot, k, c = busy.pop(ref)
                try:
                    rows = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # raised inside the worker: said, not retried
                    if isinstance(e.cause, SensplanError):  # one line, as in one process (not Ray's traceback)
                        raise e.cause from None
                    raise e.as_instanceof_cause() from None
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    tries[k] = tries.get(k, 0) + 1
                    if tries[k] > RETRIES:
                        raise RuntimeError(f"a Ray scan worker died {RETRIES + 1} times on the same probes; "
                                           f"run without --ray to see why") from None
                    self.actors[slot] = self._actor()
                    queue.insert(0, (k, c))
                    self.retried += 1
                else:
                    yield from rows
                free.append(slot)

    def close(self) -> None:
        if self.actors:
            try:  # let each actor remove what its cache spilled, then stop it
                self.ray.get([a.close.remote() for a in self.actors], timeout=30)
            except Exception:  # noqa: BLE001 - a dead actor has nothing left to remove
                pass
            for a in self.actors:
                self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False


class _RayWorker:
    def __init__(self, p: Payload) -> None:
        self.worker: _Worker | None = None
        self.error = ""
        try:
            self.worker = _Worker(p)
        except Exception as e:  # noqa: BLE001 - said by the first chunk, not as a dead actor
            self.error = _start_error(e)

    def run(self, indices: list[int]) -> list[tuple[int, dict[str, Any]]]:
        if self.worker is None:
            raise WorkerStartError(self.error)
        return self.worker.run(indices)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cache.close()


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """Torch threads per worker: the available cores shared out (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads if threads is not None else max(1, cores // max(1, workers))


def describe(runner: Any, workers: int, ray: str | None) -> dict[str, Any]:
    """What scan.json records of the workers."""
    return {"workers": workers, "backend": "ray" if ray is not None else "processes",
            **({"ray_address": ray or "local"} if ray is not None else {}),
            "chunks_retried": getattr(runner, "retried", 0)}
