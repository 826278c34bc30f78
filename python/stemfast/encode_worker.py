"""Encoding in a worker process, started before this process imports torch.

Importing torch (and kornia) and loading the model take ~3.5 s of one core before the first patch is
encoded -- longer than reading a 1024^2 image, finding its sites, cutting its patches and importing
matplotlib together. Threads cannot overlap an import with other Python work (the GIL), a second
process can: :class:`EncodeWorker` forks a child that imports torch, loads the model and then
encodes the patch arrays this process sends it, while this process -- which never imports torch --
reads, finds sites, cuts patches and imports the plotting modules. The results are the same as
encoding here (the same model, the same code, the same threads).

Used by the in-process batch runner (:mod:`stemfast.batch.runner`) for the shipped model used as is.
``stemfast analyze`` / ``batch`` start it (:func:`prestart_shipped`) before they import the
pipeline, when their options leave the shipped model a possibility; the runner then takes it
(:func:`shipped_worker_model`) or closes it. :func:`unavailable` says why not otherwise: the setting
``STEMFAST_ENCODE_WORKER=0``, no ``fork`` start method (Windows, macOS' default is kept), torch
already imported here (nothing to gain; forking a process with torch's threads running is unsafe)
or other threads running (a lock held at the fork could block the child).
The Dask runner and training runs encode in their own processes as before.

A failure in the child comes back as the exception it raised (its traceback logged here) and fails
the frame or file as it would in this process (the shipped model refused by the child's checks when it
loads is a refusal, as in this process: the runner waits for the load before the analysis); a child
that died is reported with its exit code, one that does not load the model in 10 minutes is ended,
and no call waits on a dead child. The child ends when this process closes the worker or exits (it is
a daemon, and it stops when its end of the pipe closes).
"""
from __future__ import annotations

import logging
import multiprocessing
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .forking import ctrl_c_held, ctrl_c_released

__all__ = ["ENV_VAR", "unavailable", "EncodeWorker", "WorkerModel", "EncodeWorkerError", "prestart",
           "prestart_shipped", "discard_prestarted", "prestart_file", "shipped_worker_model",
           "file_worker_model"]

log = logging.getLogger("stemfast.batch")

#: ``0`` / ``false`` / ``no`` / ``off``: encode in this process
ENV_VAR = "STEMFAST_ENCODE_WORKER"
#: seconds between checks that the child is still alive while waiting for it
_POLL_S = 0.5
#: the longest wait for the model to load (it takes seconds; a child stuck for this long is ended)
_LOAD_TIMEOUT_S = 600.0
_ENCODING_FIELDS = ("mu", "logvar", "angle", "recon_error", "recon", "angle_strength")


class EncodeWorkerError(RuntimeError):
    """The encode worker died, or its failure could not be sent back as the original exception."""


def unavailable() -> str | None:
    """Why the encode worker cannot or should not run here, or None when it can."""
    from .forking import fork_hazard, switched_off

    return switched_off(ENV_VAR) or fork_hazard()  # torch already imported: also nothing to gain


class EncodeWorker:
    """A child process that loads a model with ``load`` (a callable run in the child) and encodes.

    Examples
    --------
    >>> w = EncodeWorker(my_loader)  # doctest: +SKIP
    >>> enc = w.encode(patches)  # doctest: +SKIP
    >>> w.close()  # doctest: +SKIP
    """

    def __init__(self, load: Callable[[], object]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._conn, load), name="stemfast-encode", daemon=True)
        with ctrl_c_held():  # a Ctrl-C during the fork is delivered after it, not lost in the fork's hooks
            self._proc.start()
        child.close()
        self._info: dict | None = None  # the model's settings and metadata, once loaded
        self._failed: BaseException | None = None
        log.info("encoding in a worker process (pid %d); %s=0 encodes in this process", self._proc.pid, ENV_VAR)

    def ready(self) -> dict:
        """Wait for the model to load; its ``{"config": dict, "extra": dict}``, or the loader's exception."""
        if self._failed is not None:
            raise self._failed
        if self._info is None:
            self._info = self._receive(timeout=_LOAD_TIMEOUT_S)
        return self._info

    def encode(self, patches) -> object:
        """``model.encode(patches)`` in the child; returns a :class:`stemfast.model.Encoding`."""
        from .model.settings import Encoding

        self.ready()
        try:
            self._conn.send(("encode", np.asarray(patches)))
        except (OSError, ValueError) as exc:  # a broken pipe: the child died since the last call
            self._proc.join(1.0)
            why = self._died() if self._proc.exitcode is not None else \
                f"the encode worker (pid {self._proc.pid}) cannot be reached: {exc}"
            raise self._fail(EncodeWorkerError(why)) from None
        return Encoding(**self._receive())

    def _died(self) -> str:
        """What to say of the child that ended: its exit code (and the signal that killed it)."""
        import signal

        code = self._proc.exitcode
        how = ""
        if code is not None and code < 0:
            try:
                how = f", killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f", killed by signal {-code}"
        return f"the encode worker (pid {self._proc.pid}) died (exit code {code}{how})"

    def _receive(self, timeout: float | None = None):
        """The child's next answer; its exception re-raised here, a dead child (or, with ``timeout``, one
        silent for that long, then ended) an EncodeWorkerError."""
        import time

        t_end = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._conn.poll(_POLL_S):
                if not self._proc.is_alive():
                    raise EOFError
                if t_end is not None and time.monotonic() > t_end:
                    raise self._fail(EncodeWorkerError(f"the encode worker (pid {self._proc.pid}) did not load "
                                                       f"the model in {timeout:.0f} s; ended"))
            kind, value, tb = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(1.0)
            raise self._fail(EncodeWorkerError(self._died())) from None
        if kind == "error":
            # a stemfast error is a message for the user (e.g. a --model file that is no model), as in process
            user_error = type(value).__module__.startswith("stemfast.") and not isinstance(value, EncodeWorkerError)
            (log.debug if user_error else log.error)("encode worker failed:\n%s", tb.rstrip())
            if self._info is None:  # the model did not load: every later call fails the same way
                self._fail(value)
            raise value
        return value

    def _fail(self, exc: BaseException) -> BaseException:
        self._failed = exc
        self.close()
        return exc

    def close(self) -> None:
        """Stop the child (asked first, then terminated); idempotent."""
        if self._proc.is_alive():
            try:
                self._conn.send(("close", None))
            except (OSError, ValueError):
                pass
            self._proc.join(2.0)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(2.0)
        self._conn.close()


def _serve(conn, parent_end, load: Callable[[], object]) -> None:
    """The child: load the model, then answer ``("encode", patches)`` until ``("close", None)`` or EOF."""
    parent_end.close()  # else the pipe would stay open when the parent dies, and recv would wait forever
    ctrl_c_released()  # Ctrl-C is the parent's to handle; it closes the worker
    try:
        model = load()
    except BaseException as exc:  # noqa: BLE001 - sent back, re-raised in the parent
        _send_error(conn, exc)
        return
    import dataclasses

    config = getattr(model, "config", None)
    device = getattr(model, "device", None)
    conn.send(("ready", {"config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {},
                         "extra": dict(getattr(model, "extra", None) or {}),
                         "device": str(device) if device is not None else None}, None))
    while True:
        try:
            kind, patches = conn.recv()
        except (EOFError, OSError):
            return
        if kind != "encode":
            return
        try:
            enc = model.encode(patches)
            answer = ("ok", {f: getattr(enc, f, None) for f in _ENCODING_FIELDS}, None)
        except BaseException as exc:  # noqa: BLE001
            _send_error(conn, exc)
            continue
        conn.send(answer)


def _send_error(conn, exc: BaseException) -> None:
    """The exception itself when the parent can unpickle it without importing anything (a builtin or a
    stemfast exception), else an EncodeWorkerError with its type and message; and the traceback."""
    tb = traceback.format_exc()
    plain = EncodeWorkerError(f"{type(exc).__name__}: {exc}")
    if type(exc).__module__ in ("builtins", "stemfast") or type(exc).__module__.startswith("stemfast."):
        try:
            conn.send(("error", exc, tb))
            return
        except Exception:  # noqa: BLE001 - does not pickle
            pass
    conn.send(("error", plain, tb))


@dataclass
class WorkerModel:
    """Stands in for a model in the parent process: its settings (``config``, an
    :class:`~stemfast.model.RVAEConfig`) and metadata (``extra``) known without loading it, and
    :meth:`encode`, which runs in the worker."""

    config: object
    extra: dict
    worker: EncodeWorker

    def encode(self, patches) -> object:
        return self.worker.encode(patches)

    @property
    def device(self) -> str | None:
        """The child's torch device (``"cpu"``, ``"cuda:0"``...); waits for the model to load."""
        return self.worker.ready().get("device")

    def close(self) -> None:
        self.worker.close()


#: a worker started by :func:`prestart` before the run knew it needs it: (key, worker)
_prestarted: tuple[tuple, EncodeWorker] | None = None


def prestart(key: tuple, load: Callable[[], object]) -> None:
    """Start a worker for the model ``load`` gives (named by ``key``) now, when :func:`unavailable`
    allows, so that it imports torch while this process imports the pipeline; the run takes it
    (:func:`shipped_worker_model`, :func:`file_worker_model`) or closes it."""
    global _prestarted
    if _prestarted is None and unavailable() is None:
        _prestarted = (key, EncodeWorker(load))


def prestart_shipped(device: str = "auto") -> None:
    """:func:`prestart` for the shipped model, to run on ``device`` (the setting ``model.device``)."""
    prestart(("shipped", device), partial(_load_shipped, device))


def discard_prestarted() -> None:
    """Close a worker :func:`prestart` started that the run does not use."""
    global _prestarted
    if _prestarted is not None:
        _prestarted[1].close()
        _prestarted = None


def prestart_file(path, load: Callable[[], object], device: str = "auto") -> None:
    """:func:`prestart` for a model file that ``load`` loads, to run on ``device``."""
    prestart(_file_key(path, device), partial(_load_on, load, device))


def _file_key(path, device: str) -> tuple:
    """The :func:`prestart` key of a model file's worker."""
    from pathlib import Path

    return ("file", str(Path(path).resolve()), device)


def _take(key: tuple, load: Callable[[], object]) -> EncodeWorker:
    """The prestarted worker when it is for ``key``, else a new one (a prestarted one for another
    model is closed)."""
    global _prestarted
    if _prestarted is not None and _prestarted[0] == key:
        worker, _prestarted = _prestarted[1], None
        return worker
    discard_prestarted()
    return EncodeWorker(load)


def _load_shipped(device: str):
    from .model.shipped import load_default_model

    return load_default_model(probe=False, map_location=device)


def _load_on(load: Callable[[], object], device: str):
    """``load()``'s model moved to ``device`` (the setting ``model.device``), in the child."""
    from .model.engine import on_device

    return on_device(load(), device)


def shipped_worker_model(man: dict, device: str = "auto") -> WorkerModel:
    """The shipped model in a worker (the prestarted one, else a new one), from its manifest ``man``
    (checked by :func:`stemfast.model.shipped.usable_manifest`): settings and tag from the
    manifest, the model loaded (and its tag checked) in the child, on ``device``."""
    from .model.settings import RVAEConfig

    worker = _take(("shipped", device), partial(_load_shipped, device))
    extra = {"shipped": {"name": man.get("name"), "version": man.get("version")}, "sha256": man.get("sha256"),
             "contract": man.get("contract")}
    return WorkerModel(RVAEConfig.from_dict(man.get("config") or {}), extra, worker)


def file_worker_model(path, load: Callable[[], object], device: str = "auto") -> WorkerModel:
    """A model file loaded by ``load`` in a worker (the prestarted one for ``path`` and ``device``,
    else a new one), then moved to ``device``. Waits for the model: its settings and metadata come
    from the child, and so does the loader's exception (e.g.
    :class:`~stemfast.errors.ModelFileError`), raised here."""
    from pathlib import Path

    from .model.settings import RVAEConfig

    worker = _take(_file_key(path, device), partial(_load_on, load, device))
    info = worker.ready()
    return WorkerModel(RVAEConfig.from_dict(info["config"]), info["extra"], worker)
