"""The batch runner: every micrograph of a folder through the whole pipeline with one model.

``python -m stemfast batch DIR/ -o OUT/`` (see ``--help``) or :func:`run_batch`.

Modules
-------
- :mod:`~stemfast.batch.runner`: :func:`run_batch` -- the steps below, in order.
- :mod:`~stemfast.batch.inputs`: finding, naming, fingerprinting and reading the inputs.
- :mod:`~stemfast.batch.model_state`: the batch's model (shipped, given, reused or trained).
- :mod:`~stemfast.batch.tasks`: the task layer -- one input, or one chunk of a stack, to its outputs.
- :mod:`~stemfast.batch.local` / :mod:`~stemfast.batch.dask`: the two runners of the tasks
  (in this process / on a Dask cluster).
- :mod:`~stemfast.batch.frames`: frames read one ahead and analysed one by one (drift:
  :mod:`stemfast.drift`).
- :mod:`~stemfast.batch.outputs`, :mod:`~stemfast.batch.tables`: ``sites.csv``, figures,
  ``summary.json``; :mod:`~stemfast.batch.parts`: a stack's frame-chunk parts (Dask).
- :mod:`~stemfast.batch.status`: ``done.json`` / ``skipped.json`` and what is current;
  :mod:`~stemfast.batch.results`: :class:`InputResult`, :class:`BatchReport`;
  :mod:`~stemfast.batch.common`: file names and small shared helpers.

The command line (``stemfast batch``) is :mod:`stemfast.cli.batch`.

Steps
-----
1. **Find** every micrograph under the inputs (recursively, by extension,
   :func:`stemfast.io.find_micrographs`). Each input gets a folder ``OUT/<name>/`` (``name`` = file
   stem; duplicate stems are told apart by their relative path).
2. **Fingerprint** every input by its content (:mod:`stemfast.fingerprint`: a full SHA-256 up to
   256 MiB, a sampled one beyond), so a file whose content changed is redone even when its size
   and modification time did not change.
3. **Model.** ``--model FILE`` is used as given. Otherwise ``OUT/model.pt`` is reused when it is
   current (``OUT/model.json``: same settings hash, same input set, same stemfast version, same
   file hash, same fine-tuning steps and training sample -- ``train_sample``: ``max_train_inputs``,
   ``train_frames``, and the read options where a read of the sample depended on them,
   :func:`~stemfast.batch.model_state.same_sample`); else one model is trained on patches sampled
   from the whole batch (at most ``max_train_inputs`` inputs, evenly spread over the sorted list,
   and ``train_frames`` frames of each stack) and saved atomically to ``OUT/model.pt``. One model
   serves every input and every frame, so class ids mean the same thing across the batch.
4. **Analyse** every input that is not current: read, for every frame ``prepare`` (sites +
   patches) -> ``analyze`` (encode, classes, defect scores), and write
   ``OUT/<name>/sites.csv, classes.png, defects.png, summary.json`` and, **last**,
   ``OUT/<name>/done.json`` (input SHA-256, size, mtime, settings hash, model hash, stemfast
   version, output files and sizes). Stacks (3-D time series) are read frame by frame from the
   reader's lazy frames and the site table is streamed to disk, so memory does not grow with the
   number of frames; the drift between consecutive frames is measured by phase correlation
   (:mod:`stemfast.drift`). In this process, a 2-D input's two figures are drawn in forked
   processes while the next input is analysed, and the input is finished (``summary.json``,
   ``done.json``) once they are drawn (:mod:`~stemfast.batch.local`): a batch of 512^2 images
   spends ~40 % of its time on figures when they are drawn in turn.
5. **Report**: ``OUT/stemfast.toml`` (resolved settings + version + input checksums),
   ``OUT/batch_summary.json`` (statuses, skipped inputs with reasons, the stage table) and
   ``OUT/report.html`` (everything, images embedded; opens offline).

Reliability
-----------
One run at a time writes into an output folder (``OUT/.stemfast.lock``, :mod:`stemfast.outlock`;
a second run is refused with exit status 75, a lock left by a dead process is taken over). The
outputs of one input are written into a staging folder that replaces ``OUT/<name>/`` as a whole
(:func:`stemfast.atomic.staged_dir`), so a rerun that fails (disk full, Ctrl-C) leaves the previous
complete set, and the report keeps showing it. Settings are checked before any work (exit
status 2), and against each image (a ``--spacing`` that does not fit it is an error, one that
disagrees with the image's own estimate a warning in the summary). Entries of the input folders
that cannot be looked at (unreadable sub-folders, dangling links) are listed as skipped.
Every file is written atomically (:mod:`stemfast.atomic`), and an input counts as finished only
when its ``done.json`` exists and matches the input, the settings and the model. Rerunning the
same command therefore skips finished inputs without reading them (and without training), and a
run that was interrupted resumes where it stopped. An input that cannot be read (corrupt,
truncated, unsupported) is reported with the reason (console, ``batch_summary.json``, report) and
the others finish; the exit code is then 3 (:data:`stemfast.errors.EXIT_SKIPPED`). Read
failures are remembered in ``OUT/<name>/skipped.json`` (keyed by the file's fingerprint) so they
are not retried until the file changes (or ``--force``).

With ``--scheduler`` the analysis runs on a Dask cluster (:mod:`stemfast.batch.dask`).

Testing hooks (environment, used by the test-suite to simulate crashes):
``STEMFAST_TEST_CRASH="POINT:NAME"`` kills the process (SIGKILL) at ``POINT`` (``task_start``,
``before_done``, ``after_done``) of input ``NAME`` (``*`` = any; a Dask frame-chunk task of a stack
is ``NAME[START:STOP]``); with
``STEMFAST_TEST_CRASH_ONCE=FILE`` only the first time (the file is created as the marker);
``STEMFAST_TEST_SIGNAL=INT`` sends SIGINT (as Ctrl-C does) instead of SIGKILL.
"""
from __future__ import annotations

from ..config import ReadOptions
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_SKIPPED
from .common import STACK_OUTPUT_FILES, OUTPUT_FILES
from .inputs import InputEntry, discover_inputs
from .model_state import check_model_file, load_model, train_batch_model
from .results import BatchReport, InputResult
from .runner import run_batch
from .tables import LEADING_COLUMNS
from .tasks import assemble_parts, process_chunk, process_input

__all__ = [
    "InputEntry",
    "InputResult",
    "BatchReport",
    "run_batch",
    "discover_inputs",
    "process_input",
    "process_chunk",
    "assemble_parts",
    "train_batch_model",
    "load_model",
    "check_model_file",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_SKIPPED",
    "OUTPUT_FILES",
    "STACK_OUTPUT_FILES",
    "LEADING_COLUMNS",
    "ReadOptions",
]
