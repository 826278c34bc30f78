"""Batch analysis on a Dask cluster (optional extra: ``pip install 'stemfast[distributed]'``).

``python -m stemfast batch DIR --scheduler local:4`` starts a ``LocalCluster`` of 4 single-threaded
worker processes; ``--scheduler tcp://host:8786`` connects to a running scheduler (every worker
needs stemfast installed and must see the input files and the output folder at the same paths:
the workers write the outputs).

Task layout
-----------
- The model is trained (or loaded) once, in the client process, exactly as in the in-process
  run. Its file bytes are shipped to every worker **once** (``client.scatter(..., broadcast=True)``)
  and each worker process deserialises it once and caches it (keyed by the model's SHA-256).
- **2-D images: one task per file** (:func:`stemfast.batch.process_input`): read, sites, patches,
  encode, classes, scores, figures, ``summary.json`` and ``done.json``, all written by the worker.
- **Stacks: one task per chunk of ``frames_per_task`` frames** (:func:`stemfast.batch.process_chunk`,
  written to ``OUT/<name>/.parts/``) plus one assembling task (:func:`stemfast.batch.assemble_parts`)
  that streams the parts, in frame order, into the same outputs as the in-process run and then
  deletes them. A chunk task reads only its frames (``io.read(path, frames=slice)``), so
  compressed stacks are never loaded whole on a worker. A chunk reads the frame before it, so the frame-to-frame drift is the same as in
  the in-process run. Stacks with at most ``frames_per_task`` frames are one task. The defects of
  a stack are linked through its frames (:mod:`stemfast.tracking`) by the assembling task, which
  reads the parts in frame order: the ids are those of the in-process run.

Every output is written atomically and ``done.json`` last, so a worker lost mid-task costs only
that task: Dask reruns it (``retries=2`` for errors; a task whose worker dies is rescheduled by
the scheduler), and finished parts of a stack are not redone. Inference is deterministic on the
CPU, so the results are identical to the in-process run (same model, same settings).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Sequence

__all__ = ["require_dask", "connect", "run_distributed", "parse_scheduler"]

log = logging.getLogger(__name__)

_EXTRA_HINT = "pip install 'stemfast[distributed]'"


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
    if "://" not in s and ":" not in s:
        raise ValueError(f"--scheduler must be 'local:N' or a scheduler address like tcp://host:8786, got {spec!r}")
    return "address", s


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
        client = dd.Client(arg)
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


# ----------------------------------------------------------------------------- worker side

_MODELS: dict[str, object] = {}


def worker_model(data: bytes | None, sha: str | None):
    """The model of ``data`` (``RVAE.save`` bytes), deserialised once per worker process."""
    if data is None:
        return None
    m = _MODELS.get(sha)
    if m is None:
        from .batch import load_model

        with tempfile.TemporaryDirectory(prefix="stemfast-model-") as td:
            p = Path(td) / "model.pt"
            p.write_bytes(data)
            m = load_model(p)
        if len(_MODELS) >= 2:
            _MODELS.clear()
        _MODELS[sha] = m
        log.info("worker %d: model %s loaded", os.getpid(), (sha or "")[:12])
    return m


def _task_file(entry, out_dir, model_data, model_sha, config, chash):
    from .batch import process_input

    return process_input(entry, out_dir, model=worker_model(model_data, model_sha), model_sha=model_sha,
                         config=config, chash=chash)


def _task_chunk(entry, out_dir, start, stop, model_data, model_sha, config, chash):
    from .batch import process_chunk

    return process_chunk(entry, out_dir, start, stop, model=worker_model(model_data, model_sha),
                         model_sha=model_sha, config=config, chash=chash)


def _task_assemble(entry, out_dir, parts, config, chash, model_sha):
    from .batch import assemble_parts

    return assemble_parts(entry, out_dir, list(parts), config=config, chash=chash, model_sha=model_sha)


# ----------------------------------------------------------------------------- client side


def run_distributed(entries: Sequence, out_dir, *, scheduler: str, model_path, model_sha: str | None, config,
                    chash: str, frames_per_task: int = 16, show_progress: bool = True,
                    dashboard_address: str | None = ":8787") -> list:
    """Analyse ``entries`` (:class:`stemfast.batch.InputEntry`) on Dask; returns their ``InputResult``.

    See the module docstring for the task layout.
    """
    from . import batch as B

    require_dask()
    out = Path(out_dir)
    if frames_per_task < 1:
        raise ValueError("frames_per_task must be >= 1")
    results: dict[str, object] = {}
    plan = []  # (entry, n_frames)
    io = B._io()
    for e in entries:
        n = e.n_frames
        if n is None:  # the file has not been opened in this run: open it (lazily) to plan its tasks
            try:
                mg = io.read(e.path)
                n = B._n_frames(mg)
                e.n_frames = n
                del mg
            except Exception as exc:  # noqa: BLE001 - unreadable: report it like the in-process run
                reason = str(exc) if isinstance(exc, io.ReadError) else f"cannot read: {type(exc).__name__}: {exc}"
                results[e.name] = B._skip(e, out / e.name, reason, cache=True)
                continue
        plan.append((e, n))
    if not plan:
        return [results[e.name] for e in entries]

    from dask.distributed import as_completed

    with connect(scheduler, dashboard_address=dashboard_address) as client:
        data = Path(model_path).read_bytes() if model_path is not None else None
        model_ref = client.scatter(data, broadcast=True, hash=False) if data is not None else None
        tag = uuid.uuid4().hex[:8]
        fut_to_entry = {}
        futures = []
        for e, n in plan:
            d = out / e.name
            d.mkdir(parents=True, exist_ok=True)
            B._clean_dir(d)
            if n <= frames_per_task:
                f = client.submit(_task_file, e, str(out), model_ref, model_sha, config, chash,
                                  key=f"stemfast-file-{e.name}-{tag}", retries=2, pure=False)
            else:
                chunks = [client.submit(_task_chunk, e, str(out), s, min(s + frames_per_task, n), model_ref,
                                        model_sha, config, chash, key=f"stemfast-chunk-{e.name}-{s}-{tag}",
                                        retries=2, pure=False)
                          for s in range(0, n, frames_per_task)]
                f = client.submit(_task_assemble, e, str(out), chunks, config, chash, model_sha,
                                  key=f"stemfast-assemble-{e.name}-{tag}", retries=2, pure=False)
            fut_to_entry[f.key] = e
            futures.append(f)
        bar = B._bar(None, show_progress, total=len(fut_to_entry), desc="analyse (dask)", unit="file")
        try:
            for fut in as_completed(futures):
                e = fut_to_entry[fut.key]
                try:
                    r = fut.result()
                except Exception as exc:  # noqa: BLE001 - a task that failed for good
                    log.debug("task %s failed", fut.key, exc_info=True)
                    r = B._skip(e, out / e.name, f"task failed: {type(exc).__name__}: {exc}", cache=False,
                                status="failed")
                results[e.name] = r
                bar.update(1)
        finally:
            bar.close()
    return [results[e.name] for e in entries if e.name in results]
