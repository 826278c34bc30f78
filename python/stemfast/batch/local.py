"""The in-process runner: the inputs one after the other through :func:`stemfast.batch.tasks.start_input`,
each input's figures drawn in a forked process while the next input is analysed."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..config import ReadOptions
from .common import progress_bar
from .inputs import InputEntry
from .results import InputResult
from .tasks import PendingInput, start_input

__all__ = ["run_local"]


def run_local(entries: Sequence[InputEntry], out_dir: str | os.PathLike, *, model, model_sha: str | None, config,
              chash: str, prepared_cache: dict | None = None, show_progress: bool = True,
              read_options: ReadOptions | None = None) -> list[InputResult]:
    """Analyse ``entries`` in this process, in order; returns their results (see
    :func:`~stemfast.batch.tasks.process_input`). ``prepared_cache`` holds frames prepared for
    training, used (and dropped) by their analysis.

    A 2-D input's figures are drawn in a forked process (where forking is safe) while the next input
    is analysed; its ``summary.json`` and ``done.json`` are written, and its folder put in place, once
    they are drawn -- also when the batch is interrupted (Ctrl-C) during the next input. An input
    whose finishing is interrupted has no ``done.json`` and is redone by a rerun, as any other
    unfinished input.
    """
    out = Path(out_dir)
    entries = list(entries)
    results: list[InputResult] = []
    pending: list[PendingInput] = []
    try:
        for i, e in enumerate(progress_bar(entries, show_progress, desc="analyse", unit="file")):
            p = start_input(e, out, model=model, model_sha=model_sha, config=config, chash=chash,
                            prepared_cache=prepared_cache, show_progress=show_progress, read_options=read_options,
                            background_figures=i + 1 < len(entries))  # the last one has nothing to overlap
            pending.append(p)
            while len(pending) > 1:  # the previous input's figures were drawn while this one was analysed
                results.append(pending.pop(0).finish())
    finally:
        # also when interrupted (Ctrl-C while the next input was analysed): an input analysed is finished
        try:
            while pending:
                results.append(pending.pop(0).finish())
        finally:
            for p in pending:  # interrupted again: nothing half-done is kept
                p.cancel()
    return results
