"""The in-process runner: the inputs one after the other through :func:`stemfast.batch.tasks.process_input`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..config import ReadOptions
from .common import progress_bar
from .inputs import InputEntry
from .results import InputResult
from .tasks import process_input

__all__ = ["run_local"]


def run_local(entries: Sequence[InputEntry], out_dir: str | os.PathLike, *, model, model_sha: str | None, config,
              chash: str, prepared_cache: dict | None = None, show_progress: bool = True,
              read_options: ReadOptions | None = None) -> list[InputResult]:
    """Analyse ``entries`` in this process, in order; returns their results (see
    :func:`~stemfast.batch.tasks.process_input`). ``prepared_cache`` holds frames prepared for
    training, used (and dropped) by their analysis."""
    out = Path(out_dir)
    return [process_input(e, out, model=model, model_sha=model_sha, config=config, chash=chash,
                          prepared_cache=prepared_cache, show_progress=show_progress, read_options=read_options)
            for e in progress_bar(entries, show_progress, desc="analyse", unit="file")]
