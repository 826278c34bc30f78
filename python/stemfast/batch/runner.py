"""The batch run: find and fingerprint the inputs, settle the model, analyse what is not current
(in this process, :mod:`stemfast.batch.local`, or on Dask, :mod:`stemfast.batch.dask`), and write
``stemfast.toml``, ``batch_summary.json`` and ``report.html``."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

from .. import __version__
from ..atomic import recover_staged, write_json, write_text
from ..config import DEFAULT_TRAIN_FRAMES, DEFAULT_TRAIN_INPUTS, ReadOptions
from ..config import (apply_overrides, config_hash, input_table, load_config, neutral_settings, parse_toml,
                      pinned_backend, write_resolved_config)
from ..config import METADATA_TABLES, PipelineConfig
from ..errors import SettingsError, describe_os_error
from .common import (BATCH_SUMMARY_FILE, CONFIG_FILE, DONE_FILE, KEPT_CONFIG_PATTERN, MODEL_FILE, MODEL_INFO_FILE,
                     REPORT_FILE, STAGES, now, peak_memory_mib, read_json)
from .companions import CompanionRule, pair_companions, parse_companion_name
from .inputs import InputEntry, discover_inputs, fingerprint_input
from .model_state import (ModelState, asked_sample, given_for_run, kept_models, record_refusal, resolve_model,
                          save_trained_model, train_batch_model, use_shipped, writing)
from .results import BatchReport, InputResult
from .status import cached_skip, current_done, skip_input

__all__ = ["run_batch", "BatchOptions"]

log = logging.getLogger("stemfast.batch")

#: The whole-number options of a batch, checked by :class:`BatchOptions`: field -> (its command-line
#: option, lowest value).
BATCH_LIMITS = {
    "max_train_inputs": ("--train-inputs; stemfast train: --max-inputs", 1),  # inputs sampled for training
    "train_frames": ("--train-frames", 1),  # frames per stack sampled for training
    "frames_per_task": ("--frames-per-task", 1),
    "finetune": ("--finetune", 0),  # optimiser steps (0: no fine-tuning)
}


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs: the keyword arguments of :func:`run_batch` other than the settings.

    Out-of-range options (:data:`BATCH_LIMITS`; ``cache_mb`` >= 0 or None) raise :class:`SettingsError`
    when made, before any work.

    Examples
    --------
    >>> BatchOptions(train_frames=0)
    Traceback (most recent call last):
    ...
    stemfast.errors.SettingsError: train_frames (--train-frames) must be an integer >= 1, got 0
    """

    model_path: object = None
    scheduler: object = None
    force: bool = False
    max_train_inputs: int = DEFAULT_TRAIN_INPUTS
    train_frames: int = DEFAULT_TRAIN_FRAMES
    frames_per_task: int = 16
    cache_mb: float | None = None
    show_progress: bool = True
    read_options: ReadOptions = ReadOptions()
    train: bool = False
    finetune: int = 0
    companions: CompanionRule = CompanionRule()

    def __post_init__(self) -> None:
        for name, (option, low) in BATCH_LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < low:
                raise SettingsError(f"{name} ({option}) must be an integer >= {low}, got {v!r}")
        if self.model_path is not None and (self.train or self.finetune):
            raise SettingsError(f"a model file (--model {self.model_path}) is used as it is: it cannot be combined "
                                f"with {'--train' if self.train else '--finetune'} (train or fine-tune without --model)")
        mb = self.cache_mb
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, (int, float)) or not math.isfinite(mb)
                               or mb < 0):
            raise SettingsError(f"cache_mb must be a number of MiB >= 0 or None, got {mb!r}")

    @property
    def cache_budget_bytes(self) -> int:
        """Memory for the frames prepared for training, kept for their analysis (in-process only)."""
        mb = self.cache_mb if self.cache_mb is not None else float(os.environ.get("STEMFAST_PREPARED_CACHE_MB", 2048))
        return int(mb * 2**20)


def run_batch(inputs, out_dir, *, config=None, model_path=None, scheduler: str | None = None, force: bool = False,
              max_train_inputs: int = DEFAULT_TRAIN_INPUTS, train_frames: int = DEFAULT_TRAIN_FRAMES,
              frames_per_task: int = 16,
              cache_mb: float | None = None, show_progress: bool = True, train: bool = False,
              finetune: int = 0, read_options: ReadOptions | None = None, companions=None,
              companion_name: str | tuple[str, str] | None = None, auto_companion: bool = True,
              given_settings=()) -> BatchReport:
    """Run the whole pipeline on every micrograph of ``inputs`` (folders and/or files) into ``out_dir``.

    Parameters
    ----------
    inputs : a folder (searched recursively), a file, or a list of them.
    out_dir : results folder (created). See :mod:`stemfast.batch` for its layout.
    config : ``PipelineConfig`` (default: :func:`stemfast.config.load_config` defaults).
    model_path : use this model file (``RVAE.save`` format) instead of the shipped model, as it is: the
        run's ``[model]`` architecture settings become the file's (settings asking for another
        architecture are a SettingsError).
    scheduler : ``None`` (in-process), ``"local:N"`` (a local Dask cluster of N worker processes),
        a Dask scheduler address ``"tcp://host:8786"``, or a ``dask.distributed.Client``.
    force : redo every input, retrain the model, retry cached read failures.
    max_train_inputs, train_frames : how many inputs / frames per stack the training sample draws on
        (with ``read_options``, part of a trained model's reuse key: a rerun that changes the sample
        trains again, :func:`stemfast.batch.model_state.same_sample`).
    frames_per_task : frames per Dask task for stacks.
    cache_mb : memory (MiB) for keeping the images prepared for training until their analysis
        (in-process only; default ``STEMFAST_PREPARED_CACHE_MB`` or 2048).
    train : train a model on the inputs instead of using the shipped one.
    finetune : adapt the shipped model to the inputs for this many optimiser steps (settings asking for
        another architecture, e.g. ``model.model = "vae"``, are a SettingsError: its network is fixed).
    read_options : :class:`~stemfast.config.ReadOptions` (``--fill-nonfinite``).
    companions : ``{input path: companion path}``: a second detector's image of the same scan for
        these inputs (``stemfast analyze --companion``; :mod:`stemfast.batch.companions`).
    companion_name : ``"MAIN=COMPANION"`` (or a pair): the companion of every input whose file name
        contains ``MAIN`` is the file of the same folder whose name has it replaced by ``COMPANION``
        (``--companion-name ADF1=ADF2``: ``X_ADF1.dm4`` -> ``X_ADF2.dm4``); files whose name contains
        ``COMPANION`` are not analysed as inputs of their own (:mod:`stemfast.batch.companions`).
    auto_companion : without ``companions`` and ``companion_name``, pair each input with the file beside
        it whose name differs in the detector's name alone (``s_HAADF.dm4`` and ``s_MAADF.dm4``), where it
        is of the same scan (:func:`stemfast.batch.companions.automatic_companion`); False: each alone.
    given_settings : the settings (dotted keys, e.g. ``"model.latent_dim"``) the caller set explicitly:
        with ``model_path``, an architecture setting among them must equal the file's even at its
        default value (``config`` alone cannot tell a default set from one left alone). The command
        line passes the options typed (:func:`stemfast.cli.options.typed_settings`).

    Returns
    -------
    BatchReport
        Per input its status (``done``, ``current``, ``partial``, ``skipped``, ``failed``) and
        reason; ``exit_code`` is 0 when every input has full results, 3 otherwise.

    Raises
    ------
    stemfast.errors.SettingsError
        Invalid settings (before any work).
    stemfast.errors.OutputLocked
        Another run writes into ``out_dir``.
    stemfast.errors.OutputError, ModelFileError, SchedulerError
        The output folder, the ``model_path`` or the scheduler cannot be used (message with the
        path / address and the cause).

    Examples
    --------
    >>> from stemfast.batch import run_batch
    >>> report = run_batch("micrographs/", "results/")  # doctest: +SKIP
    >>> report.exit_code, [r.status for r in report.results]  # doctest: +SKIP
    (0, ['done', 'done'])
    """
    from ..backend import check_backend
    from ..config import check_limits
    from ..model.engine import check_device
    from ..model.shipped import check_finetune_settings
    from ..outlock import OutputLock

    if scheduler:
        from .dask import check_scheduler, require_dask

        require_dask()  # fail before any work when the extra is missing
        if isinstance(scheduler, str):
            check_scheduler(scheduler)
    # kernels chosen by $STEMFAST_BACKEND: named in the settings, so the record says which ran (same hash)
    config = pinned_backend(config if config is not None else load_config(None))
    check_limits(config)
    check_device(config.model.device)  # CUDA asked for where there is none: a settings error, before any work
    if not scheduler:  # (a cluster's workers may hold kernels this client lacks)
        check_backend(config.sites.backend)  # kernels asked for by name that do not import here: the same
    opts = BatchOptions(model_path=model_path, scheduler=scheduler, force=force, max_train_inputs=max_train_inputs,
                        train_frames=train_frames, frames_per_task=frames_per_task, cache_mb=cache_mb,
                        show_progress=show_progress, read_options=read_options or ReadOptions(), train=train,
                        finetune=finetune, companions=companion_rule(companions, companion_name, auto_companion))
    check_finetune_settings(config.model, opts.finetune)
    given = None
    if opts.model_path is not None:  # loaded and checked before the output folder is touched
        given, config = given_for_run(opts.model_path, config, worker=opts.scheduler is None,
                                      given_settings=frozenset(given_settings))
    out = Path(out_dir)
    try:
        with OutputLock(out, command=f"stemfast batch -> {out}"):
            for what in recover_staged(out):
                log.info("%s: %s (left by an interrupted run)", out, what)
            return _run_batch_locked(inputs, out, config=config, opts=opts, given=given)
    finally:
        if given is not None and callable(getattr(given, "close", None)):
            given.close()  # (idempotent: also closed when the run ends)


def companion_rule(companions, companion_name, auto: bool = True) -> CompanionRule:
    """The :class:`~stemfast.batch.companions.CompanionRule` of :func:`run_batch`'s arguments."""
    if isinstance(companion_name, str):
        companion_name = parse_companion_name(companion_name)
    return CompanionRule(name=tuple(companion_name) if companion_name else None,
                         explicit={Path(k): Path(v) for k, v in (companions or {}).items()}, auto=bool(auto))


def _run_batch_locked(inputs, out: Path, *, config, opts: BatchOptions, given=None) -> BatchReport:
    """:func:`run_batch` while holding the output folder's lock (``given``: the ``--model`` file's model)."""
    t_start = time.perf_counter()
    problems: list[tuple[Path, str]] = []
    entries = pair_companions(discover_inputs(inputs, exclude=out, problems=problems), opts.companions, problems)
    extra_results = problem_results(problems)
    chash = config_hash(config)
    sched = opts.scheduler
    report = BatchReport(out, [], chash, scheduler=sched if isinstance(sched, str) or sched is None else repr(sched),
                         problems=extra_results, neutral_settings=neutral_settings(config))
    if not entries:
        log.error("no micrographs found in %s", ", ".join(str(p) for p in inputs))
        report.results = extra_results
        if extra_results:  # entries that could not be looked at: said in the batch's records too
            report.seconds = time.perf_counter() - t_start
            write_settings_record(out / CONFIG_FILE, config, [], chash)
            write_batch_outputs(report, [], None)
        return report
    log.info("%d inputs, settings %s", len(entries), chash)

    results: dict[str, InputResult] = {}
    good = fingerprint_all(entries, out, results, opts=opts, chash=chash)
    cache: dict | None = {} if sched is None else None
    ms, train_info = settle_model(good, out, results, report, config=config, chash=chash, opts=opts, cache=cache,
                                  given=given)
    try:
        todo = not_current(good, out, results, chash=chash, model_sha=ms.sha256, force=opts.force,
                           read_options=opts.read_options)
        write_settings_record(out / CONFIG_FILE, config, entries, chash, run=run_record(opts, ms, out))
        if todo:
            results.update({r.name: r for r in analyse(todo, out, ms, config=config, chash=chash, opts=opts,
                                                        cache=cache)})
    finally:
        ms.close()  # an encode worker stops here
    if cache:
        cache.clear()
    report.results = [results[e.name] for e in entries] + extra_results
    summaries = input_summaries(out, report.results)
    log_neutral_reuse(report, summaries)
    report.stage_table = batch_stage_table(summaries)
    report.seconds = time.perf_counter() - t_start

    old = read_json(out / BATCH_SUMMARY_FILE) or {}
    if (report.did_work or not old or not (out / REPORT_FILE).exists()
            or old.get("neutral_settings") != report.neutral_settings
            or not same_skips(old.get("skipped"), skipped_list(report))
            or (old.get("model") or {}).get("refused") != report.model_refused
            or [(d.get("name"), d.get("path")) for d in old.get("inputs") or []]
            != [(r.name, r.path) for r in report.results]):  # inputs removed, renamed, or a subset run
        write_batch_outputs(report, summaries, train_info)
    return report


def made_with_other_neutral(summaries: list[dict], neutral: dict) -> dict[str, dict]:
    """The inputs whose results were made with other values of the settings that change no result
    (:data:`stemfast.config.RESULT_NEUTRAL_SETTINGS`) than ``neutral``, this run's: ``{name: {key: value
    it was made with}}``, from their summaries' ``neutral_settings`` (results that record none are left out)."""
    out = {}
    for s in summaries:
        made = s.get("neutral_settings")
        if isinstance(made, dict):
            other = {k: made.get(k) for k in neutral if made.get(k) != neutral[k]}
            if other:
                out[str(s.get("name"))] = other
    return out


def log_neutral_reuse(report: BatchReport, summaries: list[dict]) -> None:
    """Say which current inputs were kept although made with other values of settings that change no
    result (their records stay: ``summary.json`` names the values they were made with)."""
    current = {r.name for r in report.results if r.status == "current"}
    other = made_with_other_neutral([s for s in summaries if s.get("name") in current], report.neutral_settings)
    for name, made in other.items():
        log.info("%s: current (reused): made with %s; this run asks for %s -- settings that change no result",
                 name, ", ".join(f"{k} = {v!r}" for k, v in made.items()),
                 ", ".join(f"{k} = {report.neutral_settings[k]!r}" for k in made))


def problem_results(problems: list[tuple[Path, str]]) -> list[InputResult]:
    """Entries of the input folders that could not be looked at, as skipped results."""
    out = []
    for p, reason in problems:
        log.error("%s: skipped: %s", p, reason)
        out.append(InputResult(p.name or str(p), str(p), "skipped", reason))
    return out


def fingerprint_all(entries: list[InputEntry], out: Path, results: dict[str, InputResult], *,
                    opts: BatchOptions, chash: str) -> list[InputEntry]:
    """Fingerprint every input by its content (a changed file is redone even with the same size and
    mtime); inputs that cannot be read, now or -- same content -- in an earlier run, go to ``results``
    as skipped. Returns the inputs that could be fingerprinted."""
    unreadable: dict[str, str] = {}
    for e in entries:
        try:
            fingerprint_input(e)
        except OSError as exc:
            unreadable[e.name] = f"cannot read: {exc}"
    for e in entries:
        if e.name in unreadable:
            results[e.name] = skip_input(e, out / e.name, unreadable[e.name], cache=False)
        elif not opts.force:
            sk = cached_skip(e, out / e.name, opts.read_options, chash)
            if sk:
                log.error("%s: skipped: %s", e.rel, sk.get("reason"))
                results[e.name] = InputResult(e.name, str(e.path), "skipped", f"(cached) {sk.get('reason')}")
    return [e for e in entries if e.name not in unreadable]


def settle_model(good: list[InputEntry], out: Path, results: dict[str, InputResult], report: BatchReport, *,
                 config, chash: str, opts: BatchOptions, cache: dict | None,
                 given=None) -> tuple[ModelState, dict | None]:
    """The batch's model: ``--model FILE`` (``given``: loaded already), else the shipped default model
    (fine-tuned with ``--finetune N``), else (``--train``, or the shipped model refused: a warning says
    why, and ``report.model_refused``, ``model.json`` and so the summaries and the report record it)
    one trained on the batch. Inputs that fail while sampled for training go to ``results``. Returns
    the model and the training record (None when nothing was trained)."""
    base = None
    refused: list[str] = []
    if opts.model_path is None and not opts.train:
        base = shipped_model(config, opts, refused)
    elif opts.model_path is None or opts.scheduler:
        from ..encode_worker import discard_prestarted

        discard_prestarted()
    report.model_refused = refused[0] if refused else None
    ft = opts.finetune if base is not None else 0
    if base is not None and not opts.finetune:
        ms = use_shipped(base, out)
        from ..model.engine import engine_for, engine_of

        # what this run chose; on Dask the workers pick the engine for the shipped model as this process
        # would (batch.dask), and each input's summary names the one that ran it (the batch summary's label)
        report.model_engine = engine_for(config) if opts.scheduler else engine_of(base)
    else:
        ms = resolve_model(good, out, config=config, chash=chash, model_path=opts.model_path, force=opts.force,
                           finetune=ft, worker=opts.scheduler is None, given=given,
                           sample=asked_sample(opts.max_train_inputs, opts.train_frames, opts.read_options))
        report.model_engine = "torch"  # model files, fine-tuned and trained models run on torch
    train_info: dict | None = None
    if ms.sha256 is None:
        ms, train_info = _train_now(good, out, results, report, config=config, chash=chash, opts=opts,
                                    cache=cache, base=base if ft else None, ms=ms)
    record_refusal(ms, out, report.model_refused)
    report.model_path = ms.path if ms.sha256 else None
    report.model_sha256 = ms.sha256
    report.model_source = ms.source
    return ms, train_info


def _train_now(good: list[InputEntry], out: Path, results: dict[str, InputResult], report: BatchReport, *,
               config, chash: str, opts: BatchOptions, cache: dict | None, base, ms: ModelState):
    """:func:`settle_model`'s training (fine-tuning ``base`` when given): the model saved in OUT and the
    training record. When no input had a lattice, no model: ``report.model_trained`` stays False and
    the model's source says why."""
    def on_skip(e: InputEntry, reason: str) -> None:
        results[e.name] = skip_input(e, out / e.name, reason, cache=True, read_options=opts.read_options)

    ft = opts.finetune if base is not None else 0
    cand = [e for e in good if e.name not in results]
    log.info("training the model on a sample of %d inputs", min(len(cand), opts.max_train_inputs))
    model, train_info = train_batch_model(cand, config, max_train_inputs=opts.max_train_inputs,
                                          train_frames=opts.train_frames, prepared_cache=cache,
                                          cache_budget_bytes=opts.cache_budget_bytes, on_skip=on_skip,
                                          show_progress=opts.show_progress, init_model=base,
                                          finetune_steps=ft, read_options=opts.read_options,
                                          reads_left_out=len(cand) < len(good))
    report.train_seconds = float(train_info.get("seconds", 0.0))
    if model is None:
        log.error("no input had a lattice: no model could be trained")
        report.model_engine = None  # nothing to run
        return ModelState(out / MODEL_FILE, None, "none: no input of the training sample had a lattice, "
                                                  "no model could be trained"), train_info
    report.model_trained, report.model_finetuned_steps = True, ft
    return save_trained_model(model, train_info, out, config=config, chash=chash,
                              inputs_key=ms.info["inputs_key"], finetune=ft), train_info


def shipped_model(config, opts: BatchOptions, refused: list | None = None):
    """The shipped model, or None (a warning says why; the reason it was refused, if it was, is
    appended to ``refused``): on the compiled engine in this process when ``model.engine``
    resolves to it (:func:`stemfast.model.shipped.shipped_for_run`), else on torch -- in an encode
    worker process (:mod:`stemfast.encode_worker`) when it is used as is in this process and the
    worker can run, else loaded here."""
    from ..model.shipped import shipped_for_run
    from ..encode_worker import discard_prestarted

    if opts.finetune or opts.scheduler:
        return _shipped_on_torch(config, opts, refused)
    model = shipped_for_run(config, on_torch=lambda c: _shipped_on_torch(c, opts, refused), refused=refused)
    discard_prestarted()  # a worker nobody took (the torch route takes or closes its own)
    return model


def _shipped_on_torch(config, opts: BatchOptions, refused: list | None = None):
    """The shipped model on torch: in a worker when the run allows one, else loaded here (a refusal's
    reason appended to ``refused``)."""
    from ..model.shipped import default_model, usable_manifest
    from ..encode_worker import discard_prestarted, shipped_worker_model, unavailable

    why = "training or fine-tuning" if opts.finetune else "the Dask runner" if opts.scheduler else unavailable()
    if why is not None:
        discard_prestarted()
        log.info("encoding in this process (%s)", why)
        return default_model(config, refused=refused)
    man = usable_manifest(config, probe=False, refused=refused)
    if man is None:
        discard_prestarted()
        return None
    model = shipped_worker_model(man, config.model.device)
    if usable_manifest(config, refused=refused) is None:  # the input-contract probe, while the worker starts
        model.close()
        return None
    from ..figures import pyplot

    pyplot()  # import the plotting modules while the worker imports torch
    return _loaded_or_refused(model, refused)


def _loaded_or_refused(model, refused: list | None = None):
    """``model`` (the shipped model in an encode worker) once the worker has loaded it; None when the
    worker's checks of the file refused it (``ShippedModelError``: a version tag or input contract that
    differs from the manifest's, a file torch cannot load) -- a refusal as where it is loaded in this
    process: a warning, the reason appended to ``refused`` (the run's records), a model trained
    instead; it failed every input before. A worker that died is left to fail the inputs, as before."""
    from ..model.shipped import ShippedModelError, warn_refused

    try:
        model.worker.ready()
    except ShippedModelError as exc:
        warn_refused(exc, refused)
        return None
    except Exception:  # noqa: BLE001 - the worker died or hung: raised again by each encode, failing the inputs
        log.debug("the encode worker did not load the shipped model", exc_info=True)
    return model


def not_current(good: list[InputEntry], out: Path, results: dict[str, InputResult], *, chash: str,
                model_sha: str | None, force: bool, read_options: ReadOptions | None = None) -> list[InputEntry]:
    """The inputs to analyse: those without a result yet whose outputs are not current (finished
    with the same content, settings, model and version); the current ones go to ``results``."""
    todo: list[InputEntry] = []
    for e in good:
        if e.name in results:
            continue
        done = None if force else current_done(e, out / e.name, chash=chash, model_sha=model_sha,
                                               read_options=read_options)
        if done is not None:
            st = done.get("status", "ok")
            results[e.name] = InputResult(e.name, str(e.path), "partial" if st == "partial" else "current",
                                          done.get("reason"), int(done.get("n_sites", 0)),
                                          int(done.get("n_defects", 0)), 0.0, done.get("n_frames"))
        else:
            todo.append(e)
    log.info("%d inputs to process, %d current", len(todo), sum(r.status == "current" for r in results.values()))
    return todo


def run_record(opts: BatchOptions, ms: ModelState | None, out: Path) -> dict:
    """The ``[run]`` table of ``stemfast.toml``: what made the run other than its settings -- the model
    (``shipped``, ``trained``, ``fine-tuned``, ``given``; its SHA-256), the read options and the
    companion pairing -- and ``options``, the command-line options that repeat them."""
    again: list[str] = []
    kind = ("given" if opts.model_path is not None else "trained" if opts.train
            else "fine-tuned" if opts.finetune else "shipped")
    rec: dict = {"model": kind, "model_sha256": ms.sha256 if ms is not None else None}
    if kind != "shipped" and ms is not None and ms.sha256:
        again.append(f"--model {out / MODEL_FILE}")
    ro = opts.read_options
    rec["fill_nonfinite"] = ro.fill_nonfinite
    if ro.fill_nonfinite:
        rec["nonfinite_limit"] = ro.max_nonfinite_fraction
        again.append("--fill-nonfinite")
        if ro.max_nonfinite_fraction != ReadOptions().max_nonfinite_fraction:
            again.append(f"--nonfinite-limit {ro.max_nonfinite_fraction:g}")
    rule = opts.companions
    if rule.name:
        rec["companions"] = f"name rule {rule.name[0]}={rule.name[1]}"
        again.append(f"--companion-name {rule.name[0]}={rule.name[1]}")
    elif rule.explicit:
        rec["companions"] = "given (--companion)"
        again.extend(f"--companion {c}" for c in rule.explicit.values())
    else:
        rec["companions"] = "automatic" if rule.auto else "none"
        if not rule.auto:
            again.append("--no-companion")
    rec["options"] = again
    return rec


def write_settings_record(toml_path: Path, config, entries: list[InputEntry], chash: str,
                          run: dict | None = None) -> None:
    """``OUT/stemfast.toml``: the resolved settings, version, input checksums, companions (a second
    detector's image, ``[companions]``) and the run's other options (``[run]``, :func:`run_record`)
    -- rewritten only when they or the inputs changed, so a rerun with nothing to do touches nothing."""
    old = None
    if toml_path.exists():
        try:
            old = parse_toml(toml_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            old = None
    ents = [e for e in entries if e.sha256]
    comps = {str(e.path): {"file": str(e.companion.path), "sha256": e.companion.sha256}
             for e in ents if e.companion is not None}
    old_comps = [(v.get("file"), v.get("sha256")) for v in (old or {}).get("companions", {}).values()
                 if isinstance(v, dict)]
    old_hash = ((old or {}).get("stemfast") or {}).get("config_hash")
    if old_hash and old_hash != chash and old_hash in _done_hashes(toml_path.parent):
        _keep_settings_record(toml_path, old_hash)
    if (old is None or (old.get("stemfast") or {}).get("config_hash") != chash
            or _recorded_neutral(old) != neutral_settings(config)  # the record says what this run asked for
            or (old.get("stemfast") or {}).get("version") != __version__
            or (old.get("inputs") or {}) != input_table([e.path for e in ents], {str(e.path): e.sha256 for e in ents})
            or sorted(old_comps) != sorted((v["file"], v["sha256"]) for v in comps.values())
            or (old.get("run") or None) != _toml_round_trip(run)):
        with writing(toml_path):
            write_resolved_config(toml_path, config, inputs=[e.path for e in ents],
                                  checksums={str(e.path): e.sha256 for e in ents}, companions=comps, run=run)


def _recorded_neutral(toml: dict) -> dict | None:
    """The values of the settings that change no result a ``stemfast.toml`` (parsed) records, None when
    its settings do not read."""
    try:
        return neutral_settings(apply_overrides(PipelineConfig(), {k: v for k, v in toml.items()
                                                                   if k not in METADATA_TABLES}))
    except ValueError:
        return None


def _done_hashes(out: Path) -> dict[str, list[str]]:
    """The config hashes the results in ``out`` were made with: ``{hash: [folder, ...]}`` (from their
    ``done.json``)."""
    found: dict[str, list[str]] = {}
    for done in sorted(out.glob(f"*/{DONE_FILE}")):
        h = (read_json(done) or {}).get("config_hash")
        if isinstance(h, str):
            found.setdefault(h, []).append(done.parent.name)
    return found


def _keep_settings_record(toml_path: Path, old_hash: str) -> None:
    """Keep ``stemfast.toml`` of configuration ``old_hash`` as ``stemfast.<hash12>.toml`` before a run
    with other settings rewrites it: results in OUT were made with it (a partial rerun with other
    settings left them without any record of their settings)."""
    kept = toml_path.with_name(KEPT_CONFIG_PATTERN.format(hash12=old_hash[:12]))
    if not kept.exists():
        write_text(kept, toml_path.read_text(encoding="utf-8"))
        log.warning("%s: results in %s were made with other settings (config %s): their settings are kept "
                    "as %s", toml_path.name, toml_path.parent, old_hash[:12], kept.name)


def other_results(out: Path, shown: set[str], chash: str) -> list[dict]:
    """The result folders in ``out`` that this run does not show (an earlier run's inputs): ``{name,
    config_hash, settings}`` each, ``settings`` the record of the settings they were made with
    (``stemfast.toml`` for this run's, a kept ``stemfast.<hash12>.toml``, or None where none is left)."""
    rows = []
    for h, names in _done_hashes(out).items():
        kept = out / KEPT_CONFIG_PATTERN.format(hash12=h[:12])
        settings = CONFIG_FILE if h == chash else (kept.name if kept.exists() else None)
        rows += [{"name": n, "config_hash": h, "settings": settings} for n in names if n not in shown]
    return sorted(rows, key=lambda r: r["name"])


def _toml_round_trip(table: dict | None) -> dict | None:
    """``table`` as it reads back from ``stemfast.toml`` (None values left out, as TOML has no null)."""
    return {k: v for k, v in table.items() if v is not None} or None if table else None


def analyse(todo: list[InputEntry], out: Path, ms: ModelState, *, config, chash: str, opts: BatchOptions,
            cache: dict | None) -> list[InputResult]:
    """Analyse the inputs in ``todo``: on Dask with a scheduler, else in this process."""
    if opts.scheduler:
        from .dask import run_distributed

        return run_distributed(todo, out, scheduler=opts.scheduler, model_path=ms.path if ms.sha256 else None,
                               model_sha=ms.sha256, config=config, chash=chash, frames_per_task=opts.frames_per_task,
                               show_progress=opts.show_progress, read_options=opts.read_options)
    from .local import run_local

    return run_local(todo, out, model=ms.get() if ms.sha256 else None, model_sha=ms.sha256, config=config,
                     chash=chash, prepared_cache=cache, show_progress=opts.show_progress,
                     read_options=opts.read_options)


def input_summaries(out: Path, results: list[InputResult]) -> list[dict]:
    """``summary.json`` of every input with results; an input whose rerun failed keeps showing its
    previous complete results (still in place: outputs are replaced as a whole), marked as such."""
    out_s = []
    for r in results:
        if r.status in ("done", "current", "partial"):
            s = read_json(out / r.name / "summary.json")
            if s:
                s["status"] = s.get("status", r.status)
                out_s.append(s)
        elif r.status == "failed":
            done = read_json(out / r.name / DONE_FILE)
            s = read_json(out / r.name / "summary.json") if done else None
            if s:
                s["status"] = "previous results (this run failed)"
                s["warnings"] = [f"this run failed ({r.reason}); shown are the complete results of the run "
                                 f"finished {done.get('finished', '?')}, still in place"] + list(s.get("warnings") or [])
                out_s.append(s)
    return out_s


def batch_stage_table(summaries: list[dict]) -> list[dict]:
    """Seconds and sites/s of every pipeline stage, over all inputs."""
    from ..report import stage_table_rows

    secs: dict[str, float] = {}
    n = 0
    for s in summaries:
        n += int(s.get("n_sites", 0))
        for k, v in (s.get("timings_s") or {}).items():
            if k in STAGES:
                secs[k] = secs.get(k, 0.0) + float(v)
    return stage_table_rows(secs, n)


def skipped_list(report: BatchReport) -> list[dict]:
    """The inputs without full results, for ``batch_summary.json``."""
    return [{"name": r.name, "path": r.path, "status": r.status, "reason": r.reason} for r in report.skipped]


def same_skips(old: list | None, new: list[dict]) -> bool:
    """The same inputs skipped for the same reasons (a reason remembered from a run is "(cached) ...")."""
    def key(items):
        return sorted((str(d.get("name")), str(d.get("status")), str(d.get("reason") or "").removeprefix("(cached) "))
                      for d in items or [])
    return old is not None and key(old) == key(new)


def write_batch_outputs(report: BatchReport, summaries: list[dict], train_info: dict | None) -> None:
    """``batch_summary.json`` and ``report.html`` (a failing report never loses the results)."""
    from ..errors import OutputError
    from ..model.engine import combined_engine
    from ..report import write_html_report

    out = report.out_dir
    # a run that settled on no model (none could be trained) shows none, not an earlier run's model.json
    model_info = (read_json(out / MODEL_INFO_FILE) or {}) if report.model_sha256 or not report.model_source else {}
    old = read_json(out / BATCH_SUMMARY_FILE) or {}
    train = None
    if train_info is not None:
        train = {"seconds": train_info.get("seconds"), "train_s": train_info.get("train_s"),
                 "n_patches": train_info.get("n_patches"), "inputs": train_info.get("inputs"),
                 "prepare_s": train_info.get("prepare_s")}
    elif old.get("train"):
        train = old["train"]
    batch = {
        "stemfast_version": __version__,
        "date": now(),
        "out_dir": str(out),
        "config_hash": report.config_hash,
        # this run's settings that change no result (stemfast.config.RESULT_NEUTRAL_SETTINGS), and the inputs
        # shown whose results were made with other values of them ({name: {setting: value made with}})
        "neutral_settings": report.neutral_settings,
        "made_with_other_neutral_settings": made_with_other_neutral(summaries, report.neutral_settings),
        "scheduler": report.scheduler,
        # the engine: what ran the model on the inputs shown (their summaries), else what this run chose;
        # refused: why the shipped model was not used this run and a model was trained instead (None: it was not)
        "model": {**model_info, "source": model_info.get("source", report.model_source),
                  "refused": report.model_refused,
                  "engine": combined_engine((s.get("model") or {}).get("engine") for s in summaries)
                  or report.model_engine or (old.get("model") or {}).get("engine"),
                  "device": combined_engine((s.get("model") or {}).get("device") for s in summaries)
                  or (old.get("model") or {}).get("device")},
        # what ran the kernels on the inputs shown (their summaries: stemfast.backend.backend_used)
        "backend": combined_engine(s.get("backend") for s in summaries),
        "model_trained_this_run": report.model_trained,
        # earlier models that results in OUT were made with, kept when another model replaced model.pt
        "earlier_models": kept_models(out),
        # result folders in OUT this report does not show (an earlier run's inputs) and their settings
        "other_results": other_results(out, {r.name for r in report.results}, report.config_hash),
        "train": train,
        "n_inputs": len(report.results),
        "counts": {st: sum(r.status == st for r in report.results)
                   for st in ("done", "current", "partial", "skipped", "failed")},
        "inputs": [dataclasses.asdict(r) for r in report.results],
        "skipped": skipped_list(report),
        "stage_table": report.stage_table,
        "seconds": report.seconds,
        "peak_memory_mib": peak_memory_mib(),
        "exit_code": report.exit_code,
    }
    write_json(out / BATCH_SUMMARY_FILE, batch)
    try:
        write_html_report(out / REPORT_FILE, batch=batch, summaries=summaries, out_dir=out)
    except OSError as exc:  # disk full, ...: the previous report stays (atomic write); say so
        raise OutputError(f"cannot write the report: {describe_os_error(exc, out / REPORT_FILE)} (the results "
                          f"and {BATCH_SUMMARY_FILE} are written; the previous report is unchanged)") from None
    except Exception:  # noqa: BLE001 - a report bug must not lose the results
        log.exception("could not write %s", out / REPORT_FILE)
