"""The task layer: one input, or one chunk of a stack's frames, to its outputs.

Used by the in-process runner (:mod:`stemfast.batch.local`) and by the Dask runner
(:mod:`stemfast.batch.dask`) alike; nothing here knows which one calls it.

- :func:`process_input`: read an input, analyse every frame, write its outputs (``done.json`` last).
- :func:`process_chunk`: analyse frames ``start:stop`` of a stack into a part
  (:mod:`stemfast.batch.parts`).
- :func:`assemble_parts`: write a stack's outputs from its parts, in frame order.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..atomic import StagedDir, staged_dir
from ..config import ReadOptions
from .common import crash_hook
from .companions import CompanionError, companion_higher, companion_notes, read_companion
from .frames import DriftEnds, FrameResult, FrameWindow, count_frames, iter_frames, linked_drift, read_frame
from .inputs import InputEntry, describe_input, read_failure_reason, read_input
from .outputs import InputSource, RunSettings, assemble, start_assemble
from .parts import load_drift_ends, load_part, part_key, part_meta, part_path, save_part
from .results import InputResult
from .status import InputUnreadable, clean_dir, failure_reason, result_from_summary, skip_input, write_done

__all__ = ["process_input", "start_input", "PendingInput", "process_chunk", "assemble_parts", "patch_size_of",
           "input_info"]

log = logging.getLogger("stemfast.batch")


def patch_size_of(model, config) -> int | None:
    """The fixed patch size (px) the images are cut at for ``model``: the one it was trained at when the
    settings fixed one, else the settings' ``patch_size``; None: each image by its own spacing
    (:func:`stemfast.patchextent.plan_for`)."""
    from ..patchextent import plan_for

    return plan_for(model, config).fixed_px


def process_input(entry: InputEntry, out_dir: str | os.PathLike, *, model, model_sha: str | None, config,
                  chash: str, prepared_cache: dict | None = None, show_progress: bool = False,
                  read_options: ReadOptions | None = None) -> InputResult:
    """Analyse one input completely and write its outputs, ``done.json`` last.

    The outputs are written into a staging folder that replaces ``OUT/<name>/`` as a whole, so a
    failure (disk full, Ctrl-C) leaves the previous complete set in place. Used by the in-process
    batch and by Dask workers (one task per 2-D file). Never raises for a bad input: the problem
    becomes the result's status and reason.
    """
    return start_input(entry, out_dir, model=model, model_sha=model_sha, config=config, chash=chash,
                       prepared_cache=prepared_cache, show_progress=show_progress,
                       read_options=read_options).finish()


class PendingInput:
    """An input from :func:`start_input`: analysed, its figures maybe still drawing in the background.
    :meth:`finish` waits for them, writes ``summary.json`` and ``done.json`` and puts the staged
    folder in place of ``OUT/<name>/``; :meth:`cancel` drops it all (the previous outputs stay)."""

    def __init__(self, entry: InputEntry, result: InputResult | None = None, *, stage=None, outputs=None,
                 chash: str = "", model_sha: str | None = None, read_options: ReadOptions | None = None) -> None:
        self.entry, self._result, self._stage, self._outputs = entry, result, stage, outputs
        self._chash, self._model_sha, self._read_options = chash, model_sha, read_options

    def finish(self) -> InputResult:
        """The input's result, its outputs complete (never raises for the input's own problems)."""
        if self._result is not None:
            return self._result
        entry, stage = self.entry, self._stage
        try:
            summary = self._outputs.finish()
            write_done(entry, stage.path, summary, chash=self._chash, model_sha=self._model_sha,
                       read_options=self._read_options)
            stage.commit()
        except Exception as exc:  # noqa: BLE001
            self.cancel()
            log.debug("%s failed", entry.rel, exc_info=True)
            self._result = skip_input(entry, stage.target, failure_reason(exc), cache=False, status="failed")
            return self._result
        except BaseException:
            self.cancel()
            raise
        crash_hook("after_done", entry.name)
        self._result = result_from_summary(entry, summary, summary["seconds"])
        return self._result

    def cancel(self) -> None:
        """End figures still drawing and remove the staged folder (nothing of this input is kept)."""
        if self._outputs is not None:
            self._outputs.cancel()
        if self._stage is not None:
            self._stage.discard()


def start_input(entry: InputEntry, out_dir: str | os.PathLike, *, model, model_sha: str | None, config,
                chash: str, prepared_cache: dict | None = None, show_progress: bool = False,
                read_options: ReadOptions | None = None, background_figures: bool = False) -> PendingInput:
    """:func:`process_input` up to its figures, which with ``background_figures`` a 2-D input draws
    in a forked process while the caller goes on (e.g. with the next input); the rest is done by
    :meth:`PendingInput.finish`. Never raises for a bad input."""
    t_start = time.perf_counter()
    d = Path(out_dir) / entry.name
    if d.is_dir():
        clean_dir(d)
    crash_hook("task_start", entry.name)
    try:
        t0 = time.perf_counter()
        mg = read_input(entry.path, read_options)
        read_open = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - any reader failure: report, do not stop the batch
        return PendingInput(entry, skip_input(entry, d, read_failure_reason(exc), cache=True,
                                              read_options=read_options))
    n = count_frames(mg)
    entry.n_frames = n
    try:
        companion = read_companion(entry, mg, read_options)
    except CompanionError as exc:
        return PendingInput(entry, skip_input(entry, d, str(exc), cache=True, read_options=read_options))
    src = InputSource(entry, n, bool(getattr(mg, "is_stack", False)), input_info(entry, mg, config),
                      lambda i: read_frame(mg, i))
    run = RunSettings(config, chash, model_sha)
    stage = None
    try:
        frames = iter_frames(mg, list(range(n)), model=model, config=config, patch_size=patch_size_of(model, config),
                             cache=prepared_cache, cache_key=entry.name, bar=show_progress, desc=entry.name,
                             companion=companion, companion_higher=companion_higher(entry))
        stage = StagedDir(d)
        outputs = start_assemble(src, stage.path, _with_open_time(frames, read_open), run=run, t_start=t_start,
                                 background=background_figures)
    except BaseException as exc:
        if stage is not None:
            stage.discard()
        if isinstance(exc, InputUnreadable):
            return PendingInput(entry, skip_input(entry, d, str(exc), cache=True, read_options=read_options,
                                                  chash=chash))
        if not isinstance(exc, Exception):
            raise
        log.debug("%s failed", entry.rel, exc_info=True)
        return PendingInput(entry, skip_input(entry, d, failure_reason(exc), cache=False, status="failed"))
    finally:
        if prepared_cache is not None:
            for k in [k for k in prepared_cache if k[0] == entry.name]:
                del prepared_cache[k]
    return PendingInput(entry, stage=stage, outputs=outputs, chash=chash, model_sha=model_sha,
                        read_options=read_options)


def input_info(entry: InputEntry, mg, config=None, *, described: dict | None = None) -> dict:
    """What the outputs say about an opened input (:func:`~stemfast.batch.inputs.describe_input`, or
    ``described``: that of the whole file where ``mg`` holds some of its frames), with the note of a
    missing companion (:func:`~stemfast.batch.companions.companion_notes`) and, with the ``config``, of a
    sidecar that names another material than the one analysed (both among its notes and its
    ``read_warnings``)."""
    info = dict(described) if described is not None else describe_input(mg)
    said = companion_notes(entry)  # each qualifies the results: a warning (describe_input's read_warnings)
    side = (getattr(mg, "metadata", None) or {}).get("sidecar") or {}
    used = getattr(getattr(config, "sites", None), "material", None)
    if side.get("material") and used and side["material"] != used:
        said.append(f"the sidecar {side['file']} says {side.get('material_text')!r}: a {side['material']} film, "
                    f"analysed as {used} (its names and lattice constant): set --material {side['material']}")
    if said:
        info["notes"] = list(info.get("notes", [])) + said
        info["read_warnings"] = list(info.get("read_warnings", [])) + said
    return info


def _with_open_time(frames: Iterable[FrameResult], open_s: float) -> Iterator[FrameResult]:
    """The frame results, the time to open the file added to the first frame's reading time."""
    first = True
    for fr in frames:
        if first:
            fr.meta["timings_s"]["read"] = fr.meta["timings_s"].get("read", 0.0) + open_s
            first = False
        yield fr


def process_chunk(entry: InputEntry, out_dir: str | os.PathLike, start: int, stop: int, *, model,
                  model_sha: str | None, config, chash: str, read_options: ReadOptions | None = None) -> str:
    """Analyse frames ``start:stop`` of a stack into ``OUT/<name>/.parts/frames_START_STOP.npz``, with
    the drift views of its first and last frames with a lattice (:class:`~stemfast.batch.frames.DriftEnds`:
    the drift of its first one is measured at assembly, from the chunks before). Only these frames are
    read, in the units of the whole stack where ``entry.described`` knows them (the Dask planner's);
    the part describes the whole input by it.

    A part that already exists for the same input, settings and model is kept (a rerun after a
    crash does not redo it). Returns the part's path. Raises when the file cannot be opened.
    """
    d = Path(out_dir) / entry.name
    path = part_path(d, start, stop)
    key = part_key(entry, start, stop, chash, model_sha, read_options)
    old = part_meta(path) if path.exists() else None
    if old is not None and old.get("key") == key:
        return str(path)
    crash_hook("task_start", f"{entry.name}[{start}:{stop}]")
    # only the chunk's frames are read (compressed stacks are not loaded whole), in the whole stack's units
    rescale = None if entry.described is None else (entry.described.get("rescaled") or False)
    mg = FrameWindow(read_input(entry.path, read_options, frames=slice(start, stop), rescale=rescale), start)
    companion = None
    if entry.companion is not None and entry.companion_used:  # checked when the chunks were planned
        cw = FrameWindow(read_input(entry.companion.path, read_options, frames=slice(start, stop),
                                    rescale=entry.companion.rescale, **entry.companion.read_kwargs()), start)
        companion = cw.frame
    ends = DriftEnds()  # the chunk's drift is linked to the chunks before it at assembly
    results = list(iter_frames(mg, list(range(start, stop)), model=model, config=config,
                               patch_size=patch_size_of(model, config), check_settings=start == 0, ends=ends,
                               desc=f"{entry.name}[{start}:{stop}]", companion=companion,
                               companion_higher=companion_higher(entry)))
    n = entry.n_frames if entry.n_frames is not None else stop
    info = {**input_info(entry, mg.mg, config, described=entry.described), "n_frames": int(n), "is_stack": True,
            "shape": [int(n), *[int(v) for v in np.shape(mg.mg.data)[-2:]]]}
    save_part(path, results, key, info, ends)
    return str(path)


def assemble_parts(entry: InputEntry, out_dir: str | os.PathLike, part_paths: Sequence[str], *, config,
                   chash: str, model_sha: str | None, t_start: float | None = None,
                   read_options: ReadOptions | None = None) -> InputResult:
    """Write the outputs of a stack from its frame-chunk parts (in order), ``done.json`` last, into a
    staging folder that replaces ``OUT/<name>/`` (parts included) as a whole."""
    t_start = time.perf_counter() if t_start is None else t_start
    d = Path(out_dir) / entry.name
    d.mkdir(parents=True, exist_ok=True)
    clean_dir(d)
    parts = [Path(p) for p in part_paths]
    info = (part_meta(parts[0]) or {}).get("info", {}) if parts else {}
    n = int(info.get("n_frames", sum(len((part_meta(p) or {}).get("frames", [])) for p in parts)))
    opened: list = []

    def get_frame(i: int) -> np.ndarray:  # the figures' frames: the file is opened only when one is drawn
        if not opened:
            opened.append(read_input(entry.path, read_options))
        return read_frame(opened[0], i)

    def frames() -> Iterator[FrameResult]:  # each chunk's drift measured from the chunks before it
        return linked_drift(((load_drift_ends(p), load_part(p)) for p in parts), desc=entry.name)

    src = InputSource(entry, n, bool(info.get("is_stack", True)), info, get_frame)
    try:
        with staged_dir(d) as stage:  # the old folder, parts included, goes as a whole
            summary = assemble(src, stage, frames(), run=RunSettings(config, chash, model_sha), t_start=t_start)
            write_done(entry, stage, summary, chash=chash, model_sha=model_sha, read_options=read_options)
    except InputUnreadable as exc:
        return skip_input(entry, d, str(exc), cache=True, read_options=read_options, chash=chash)
    crash_hook("after_done", entry.name)
    return result_from_summary(entry, summary, time.perf_counter() - t_start)
