"""The Dask runner: batch analysis on a Dask cluster (optional extra: ``pip install 'stemfast[distributed]'``).

``python -m stemfast batch DIR --scheduler local:4`` starts a ``LocalCluster`` of 4 single-threaded
worker processes; ``--scheduler tcp://host:8786`` connects to a running scheduler (every worker
needs stemfast installed and must see the input files and the output folder at the same paths:
the workers write the outputs).

Task layout
-----------
- The model is trained (or loaded) once, in the client process, exactly as in the in-process
  run. Its file bytes are shipped to every worker **once** (``client.scatter(..., broadcast=True)``)
  and each worker process deserialises it once and caches it (keyed by the model's SHA-256).
- **2-D images: one task per file** (:func:`stemfast.batch.tasks.process_input`): read, sites, patches,
  encode, classes, scores, figures, ``summary.json`` and ``done.json``, all written by the worker.
- **Stacks: one task per chunk of ``frames_per_task`` frames** (:func:`stemfast.batch.tasks.process_chunk`,
  written to ``OUT/<name>/.parts/``) plus one assembling task (:func:`stemfast.batch.tasks.assemble_parts`)
  that streams the parts, in frame order, into the same outputs as the in-process run and then
  deletes them. A chunk task reads only its frames (``io.read(path, frames=slice)``), so
  compressed stacks are never loaded whole on a worker; they are read in the units of the whole stack
  (its rescaling, found when the client opened the file to plan the chunks: ``InputEntry.described``,
  which the parts also carry as the description of the input). A part keeps the drift views of its
  first and last frames with a lattice; the assembling task measures the drift of each chunk's first
  frame with a lattice from the last one before it (:func:`stemfast.batch.frames.linked_drift`), so the
  frame-to-frame drift is the same as in the in-process run, across frames without a lattice at the
  chunks' ends too. Stacks with at most ``frames_per_task`` frames are one task. The defects of
  a stack are linked through its frames (:mod:`stemfast.tracking`) by the assembling task, which
  reads the parts in frame order: the ids are those of the in-process run.

Every output is written atomically and ``done.json`` last, so a worker lost mid-task costs only
that task: Dask reruns it (``retries=2`` for errors; a task whose worker dies is rescheduled by
the scheduler), and finished parts of a stack are not redone. A task the cluster cancels rather
than fails (seen after a worker was killed) is submitted again, up to ``CANCELLED_RESUBMITS`` times.
Inference is deterministic, so the results are identical to the in-process run (same model, same
settings).

This module uses the task layer (:mod:`stemfast.batch.tasks`) like the in-process runner
(:mod:`stemfast.batch.local`); only :func:`stemfast.batch.run_batch` calls it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from ..config import pinned_backend
from ..heap import reuse_freed_memory
from .common import progress_bar
from .companions import CompanionError, read_companion
from .inputs import note_whole_read, read_failure_reason, read_input
from .model_state import load_model
from .status import clean_dir, failure_reason, skip_input
from .tasks import assemble_parts, process_chunk, process_input

__all__ = ["require_dask", "connect", "run_distributed", "parse_scheduler", "check_scheduler"]

log = logging.getLogger("stemfast.distributed")

_EXTRA_HINT = "pip install 'stemfast[distributed]'"
#: Schemes of Dask addresses that reach a scheduler in another process.
_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
#: Seconds to wait for a scheduler to accept a connection / answer as a Dask scheduler.
CONNECT_TIMEOUT_S = 5.0


def require_dask():
    """Import ``dask.distributed`` or raise an ImportError that names the extra to install."""
    try:
        import distributed  # noqa: F401
        from dask import distributed as dd
    except ImportError as exc:
        raise ImportError(
            f"running on a Dask cluster (--scheduler) needs dask.distributed, which is not installed: "
            f"{_EXTRA_HINT}  ({exc})") from exc
    return dd


def parse_scheduler(spec: str) -> tuple[str, int | str]:
    """``"local:4"`` -> ``("local", 4)``; ``"local"`` -> ``("local", cpu count)``; else ``("address", spec)``.

    Examples
    --------
    >>> parse_scheduler("local:3"), parse_scheduler("tcp://10.0.0.1:8786")
    (('local', 3), ('address', 'tcp://10.0.0.1:8786'))
    """
    s = spec.strip()
    if s == "local" or s.startswith("local:"):
        _, _, n = s.partition(":")
        try:
            k = int(n) if n else (os.cpu_count() or 1)
        except ValueError:
            raise ValueError(f"--scheduler local:N needs an integer N, got {spec!r}") from None
        if k < 1:
            raise ValueError(f"--scheduler local:N needs N >= 1, got {spec!r}")
        return "local", k
    from ..errors import SettingsError

    scheme, sep, rest = s.partition("://")
    if not sep:
        scheme, rest = "tcp", s
    if scheme == "inproc":
        raise SettingsError(f"--scheduler {spec!r}: inproc:// addresses reach a scheduler inside the same process "
                            "only; use local:N for a local cluster or tcp://host:port for a running scheduler")
    if scheme not in _SCHEMES:
        raise SettingsError(f"--scheduler must be 'local:N' or a scheduler address like tcp://host:8786 "
                            f"(schemes: {', '.join(_SCHEMES)}), got {spec!r}")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"--scheduler {spec!r}: expected {scheme}://HOST:PORT (e.g. tcp://10.0.0.1:8786)")
    return "address", s if sep else f"tcp://{s}"


def _host_port(address: str) -> tuple[str, int]:
    rest = address.partition("://")[2].rstrip("/")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def check_scheduler(spec: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (:class:`~stemfast.errors.SchedulerError`, within ``timeout`` s) unless a Dask scheduler
    answers at a ``tcp://`` address.

    A Dask scheduler greets a new connection at once (a frame of 8-byte lengths, then msgpack);
    nothing listening, a listener that stays silent (a web server waiting for a request) and one
    that sends something else are told apart in the message. Other schemes are left to Dask.
    """
    import socket
    import struct

    from ..errors import SchedulerError

    kind, addr = parse_scheduler(spec)
    if kind != "address" or not str(addr).startswith("tcp://"):
        return
    host, port = _host_port(str(addr))
    t_end = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise SchedulerError(f"no Dask scheduler at {addr}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise SchedulerError(f"no Dask scheduler at {addr}: {(exc.strerror or str(exc)).lower()} "
                             "(is the scheduler running, and is the address right?)") from None
    data = b""
    try:
        while len(data) < 24:
            left = t_end - time.monotonic()
            if left <= 0:
                raise socket.timeout
            sock.settimeout(left)
            chunk = sock.recv(24 - len(data))
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise SchedulerError(f"no Dask scheduler at {addr}: something listens there but did not greet as a Dask "
                             f"scheduler within {timeout:g} s (another service on that port?)") from None
    except OSError as exc:
        raise SchedulerError(f"no Dask scheduler at {addr}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    ok = len(data) >= 24
    if ok:
        total, n_frames, first = struct.unpack("<QQQ", data[:24])
        ok = 16 <= total <= (1 << 24) and 1 <= n_frames <= 64 and first <= total
    if not ok:
        raise SchedulerError(f"no Dask scheduler at {addr}: something listens there but does not speak the Dask "
                             f"protocol (it sent {data[:16]!r})")


@contextlib.contextmanager
def connect(scheduler, *, dashboard_address: str | None = ":8787") -> Iterator[object]:
    """A ``dask.distributed.Client`` for ``scheduler`` (``local:N`` or an address); closed on exit.

    An existing ``Client`` passed as ``scheduler`` is used as it is (and not closed).

    The dashboard link is logged and printed to stderr.
    """
    dd = require_dask()
    if not isinstance(scheduler, str):  # an existing Client: use it, leave it open
        yield scheduler
        return
    kind, arg = parse_scheduler(scheduler)
    cluster = None
    if kind == "local":
        cluster = dd.LocalCluster(n_workers=int(arg), threads_per_worker=1, processes=True,
                                  dashboard_address=dashboard_address)
        client = dd.Client(cluster)
    else:
        client = _client(dd, str(arg))
    try:
        link = getattr(client, "dashboard_link", None)
        n = len(client.scheduler_info().get("workers", {}))
        msg = f"Dask: {n} workers at {client.scheduler.address}; dashboard: {link}"
        log.info(msg)
        print(msg, file=sys.stderr)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()



def _client(dd, address: str, *, timeout: float = CONNECT_TIMEOUT_S):
    """``dd.Client(address)`` within ``timeout`` s; :class:`~stemfast.errors.SchedulerError` with the cause when
    nothing answers or the listener is not a Dask scheduler (its reply can look like anything: a
    web server's makes Dask try to allocate exabytes)."""
    import logging as _logging

    from ..errors import SchedulerError

    check_scheduler(address, timeout=timeout)
    quiet = [_logging.getLogger(n) for n in ("distributed.comm.tcp", "distributed.core", "distributed.client",
                                             "distributed.protocol.core", "distributed.comm.core")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(_logging.CRITICAL)
    try:
        return dd.Client(address, timeout=f"{timeout}s")
    except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, MemoryError, protocol errors
        raise SchedulerError(f"no Dask scheduler at {address}: something listens there but did not answer as a "
                             f"Dask scheduler within {timeout:g} s ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)


# ----------------------------------------------------------------------------- worker side

_MODELS: dict[tuple, object] = {}


def worker_model(data: bytes | None, sha: str | None, config=None):
    """The model of ``data`` (``RVAE.save`` bytes), deserialised once per worker process -- or, when it
    is the shipped model and ``config``'s ``model.engine`` resolves to the compiled engine on this
    worker, the shipped model's arrays run by it on ``config``'s ``sites.backend`` (as the in-process
    run does; no torch). Kept per model, engine and kernel backend."""
    if data is None:
        return None
    compiled = config is not None and _shipped_compiled_here(sha, config)
    key = (sha, compiled, config.sites.backend if compiled else None)
    m = _MODELS.get(key)
    if m is None:
        m = _compiled_shipped(config.sites.backend) if compiled else None
        if m is None:  # not the shipped model on the compiled engine, or its arrays cannot be used
            with tempfile.TemporaryDirectory(prefix="stemfast-model-") as td:
                p = Path(td) / "model.pt"
                p.write_bytes(data)
                m = load_model(p)
        if len(_MODELS) >= 2:
            _MODELS.clear()
        _MODELS[key] = m
        log.info("worker %d: model %s loaded", os.getpid(), (sha or "")[:12])
    return m


def _shipped_compiled_here(sha: str | None, config) -> bool:
    """Whether ``sha`` is the shipped model's and ``config``'s engine resolves to compiled on this worker."""
    from ..model.engine import engine_for

    return bool(sha) and engine_for(config) == "compiled" and sha == _shipped_sha()


@functools.lru_cache(maxsize=1)
def _shipped_sha() -> str | None:
    """The SHA-256 the package's manifest gives the shipped model (read once per worker process; None
    without a usable manifest: the model file then runs on torch)."""
    from ..model.shipped import ShippedModelError, manifest

    try:
        return manifest().get("sha256")
    except ShippedModelError:
        return None


def _compiled_shipped(backend: str | None):
    """The shipped model on the compiled engine running on ``backend`` (the run's ``sites.backend``), or
    None (a warning says why)."""
    from ..model.shipped import compiled_default_or_none, manifest

    return compiled_default_or_none(manifest(), backend=backend)


def _task_file(entry, out_dir, model_data, model_sha, config, chash, read_options=None):
    reuse_freed_memory()  # the worker's heap as the command line's (stemfast.heap)
    return process_input(entry, out_dir, model=worker_model(model_data, model_sha, config), model_sha=model_sha,
                         config=config, chash=chash, read_options=read_options)


def _task_chunk(entry, out_dir, start, stop, model_data, model_sha, config, chash, read_options=None):
    reuse_freed_memory()
    return process_chunk(entry, out_dir, start, stop, model=worker_model(model_data, model_sha, config),
                         model_sha=model_sha, config=config, chash=chash, read_options=read_options)


def _task_assemble(entry, out_dir, parts, config, chash, model_sha, read_options=None):
    return assemble_parts(entry, out_dir, list(parts), config=config, chash=chash, model_sha=model_sha,
                          read_options=read_options)


# ----------------------------------------------------------------------------- client side

#: how often an input whose task the cluster cancelled (not failed) is submitted again
CANCELLED_RESUBMITS = 2


class _Tasks:
    """Submits the tasks of one input to ``client`` (a long stack: its chunks and their assembly) and
    remembers, for the future whose result is the input's, ``(entry, n_frames, attempt)`` in
    :attr:`inputs` by key. The model file's bytes are scattered to the workers once, and again when
    the cluster has lost them."""

    def __init__(self, client, out: Path, model_path, model_sha, config, chash, frames_per_task, read_options):
        self.client, self.out, self.model_sha, self.config, self.chash = client, out, model_sha, config, chash
        self.frames_per_task, self.read_options = frames_per_task, read_options
        self.data = Path(model_path).read_bytes() if model_path is not None else None
        self.model_ref = None
        self.tag = uuid.uuid4().hex[:8]
        self.inputs: dict[str, tuple] = {}

    def submit(self, e, n: int, attempt: int = 0):
        c, out, cfg, ro = self.client, str(self.out), self.config, self.read_options
        if self.data is not None and (self.model_ref is None or self.model_ref.status != "finished"):
            self.model_ref = c.scatter(self.data, broadcast=True, hash=False)
        ref, sha, fpt = self.model_ref, self.model_sha, self.frames_per_task
        run = f"{self.tag}-{attempt}" if attempt else self.tag  # a resubmission gets keys of its own
        if n <= fpt:
            f = c.submit(_task_file, e, out, ref, sha, cfg, self.chash, ro,
                         key=f"stemfast-file-{e.name}-{run}", retries=2, pure=False)
        else:
            chunks = [c.submit(_task_chunk, e, out, s, min(s + fpt, n), ref, sha, cfg, self.chash, ro,
                               key=f"stemfast-chunk-{e.name}-{s}-{run}", retries=2, pure=False)
                      for s in range(0, n, fpt)]
            f = c.submit(_task_assemble, e, out, chunks, cfg, self.chash, sha, ro,
                         key=f"stemfast-assemble-{e.name}-{run}", retries=2, pure=False)
        self.inputs[f.key] = (e, n, attempt)
        return f


def run_distributed(entries: Sequence, out_dir, *, scheduler: str, model_path, model_sha: str | None, config,
                    chash: str, frames_per_task: int = 16, show_progress: bool = True,
                    dashboard_address: str | None = ":8787", read_options=None) -> list:
    """Analyse ``entries`` (:class:`stemfast.batch.InputEntry`) on Dask; returns their ``InputResult``.

    See the module docstring for the task layout.
    """
    require_dask()
    out = Path(out_dir)
    if frames_per_task < 1:
        raise ValueError("frames_per_task must be >= 1")
    results: dict[str, object] = {}
    plan = []  # (entry, n_frames)
    for e in entries:
        n, mg = e.n_frames, None
        # a file not opened in this run is opened (lazily) to plan its tasks; a stack analysed in chunks also
        # for what its chunks need of the whole file (its units, the notes on all its frames: e.described)
        if n is None or (n > frames_per_task and e.described is None):
            try:
                mg = read_input(e.path, read_options)
                note_whole_read(e, mg)
                n = e.n_frames
            except Exception as exc:  # noqa: BLE001 - unreadable: report it like the in-process run
                results[e.name] = skip_input(e, out / e.name, read_failure_reason(exc), cache=True,
                                             read_options=read_options)
                continue
        if n > 1 and e.companion is not None:  # a stack's companion is checked here, its frames read by the chunks
            try:
                read_companion(e, mg if mg is not None else read_input(e.path, read_options), read_options)
            except CompanionError as exc:  # refused as in the in-process run
                results[e.name] = skip_input(e, out / e.name, str(exc), cache=True, read_options=read_options)
                continue
        del mg
        plan.append((e, n))
    if not plan:
        return [results[e.name] for e in entries]

    from dask.distributed import as_completed

    # the workers run the kernels the hash stands for, whatever their own environment would pick
    config = pinned_backend(config, resolve=True)
    with connect(scheduler, dashboard_address=dashboard_address) as client:
        tasks = _Tasks(client, out, model_path, model_sha, config, chash, frames_per_task, read_options)
        futures = []
        for e, n in plan:
            d = out / e.name
            if d.is_dir():
                clean_dir(d)
            futures.append(tasks.submit(e, n))
        bar = progress_bar(None, show_progress, total=len(futures), desc="analyse (dask)", unit="file")
        try:
            pending = as_completed(futures)
            for fut in pending:
                e, n, attempt = tasks.inputs.pop(fut.key)
                if fut.cancelled() and attempt < CANCELLED_RESUBMITS:
                    # the cluster dropped the task (seen after a worker was killed: other tasks
                    # "cancelled for reason: unknown"): not a failure of the input -- submit it again;
                    # its finished parts and outputs are kept, so only what is missing is redone
                    log.warning("%s: its task was cancelled by the cluster; submitting it again (%d of %d)",
                                e.name, attempt + 1, CANCELLED_RESUBMITS)
                    pending.add(tasks.submit(e, n, attempt + 1))
                    continue
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 - a task that failed for good
                    log.debug("task %s failed", fut.key, exc_info=True)
                    r = skip_input(e, out / e.name, f"task failed: {failure_reason(exc)}", cache=False,
                                   status="failed")
                results[e.name] = r
                bar.update(1)
        finally:
            bar.close()
    return [results[e.name] for e in entries if e.name in results]
