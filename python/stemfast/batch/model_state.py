"""The batch's model: the shipped one, a given ``--model`` file, the one trained by an earlier run
(reused while current), or one trained now on a sample of the inputs -- and its record
``OUT/model.json``."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..atomic import atomic_path, write_json
from ..config import DEFAULT_TRAIN_FRAMES, DEFAULT_TRAIN_INPUTS, ReadOptions
from ..config import config_to_dict, file_sha256
from ..readbase import ReadError
from ..errors import ModelFileError, describe_os_error
from ..patchextent import cut_of, extent_record
from .common import DONE_FILE, MODEL_FILE, MODEL_INFO_FILE, now, progress_bar, read_json
from .frames import read_frame
from .inputs import (InputEntry, filled_by_read_options, inputs_key, note_whole_read, read_failure_reason,
                     read_input)

__all__ = ["ModelState", "load_model", "check_model_file", "train_batch_model", "save_trained_model",
           "resolve_model", "use_shipped", "model_identity", "sample_frames", "writing", "keep_named_model",
           "kept_models", "KEPT_MODEL_PATTERN", "given_for_run", "record_refusal", "asked_sample",
           "same_sample", "sample_record"]

#: The name an earlier ``OUT/model.pt`` is kept under when another model replaces it while results
#: in OUT were made with it (:func:`keep_named_model`); ``{sha12}``: the first 12 hex digits of its SHA-256.
KEPT_MODEL_PATTERN = "model.{sha12}.pt"

log = logging.getLogger("stemfast.batch")


@dataclass
class ModelState:
    """The batch's model: its file in OUT, SHA-256 (None: still to be trained), where it comes from,
    its ``model.json`` record, and the model itself once loaded (:meth:`get`)."""

    path: Path
    sha256: str | None
    source: str
    trained: bool = False
    info: dict = field(default_factory=dict)
    _model: object = None

    def get(self):
        """The model (loaded from :attr:`path` on first use), or None when there is none."""
        if self._model is None and self.sha256 is not None:
            self._model = load_model(self.path)
        return self._model

    def close(self) -> None:
        """Release what the model holds outside this process (an encode worker)."""
        close = getattr(self._model, "close", None)
        if callable(close):
            close()


def load_model(path: str | os.PathLike):
    """``RVAE.load(path)``, tolerating model files that store ``torch.__version__`` as a ``TorchVersion``.

    (``torch.load(weights_only=True)`` rejects that str subclass; it is harmless, so it is allowed here.)
    """
    import torch

    from ..model import RVAE

    try:
        from torch.torch_version import TorchVersion

        ctx = torch.serialization.safe_globals([TorchVersion])
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        ctx = contextlib.nullcontext()
    with ctx:
        return RVAE.load(path)


@contextlib.contextmanager
def writing(path: Path):
    """Turn an OSError while writing ``path`` (disk full, read-only, ...) into an OutputError naming it."""
    try:
        yield
    except OSError as exc:
        from ..errors import OutputError

        raise OutputError(f"cannot write {describe_os_error(exc, path)}") from None


def check_model_file(path: str | os.PathLike):
    """Load a ``--model`` file; :class:`~stemfast.errors.ModelFileError` (path and cause) when it is
    missing, unreadable or not a stemfast model. Returns the model."""
    src = Path(path)
    if not src.exists():
        raise ModelFileError(f"model not found: {src}")
    if not src.is_file():
        raise ModelFileError(f"--model {src}: not a file")
    try:
        model = load_model(src)
    except OSError as exc:
        raise ModelFileError(f"--model {describe_os_error(exc, src)}") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling / format error: not a model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFileError(f"--model {src}: not a stemfast model file ({type(exc).__name__}: {first[:200]}); "
                             "write one with `stemfast train` or use OUT/model.pt of an earlier batch") from None
    if not hasattr(model, "encode") and not hasattr(model, "extra"):
        raise ModelFileError(f"--model {src}: not a stemfast model file (loaded a {type(model).__name__})")
    return model


def given_model(src: Path, device: str = "auto"):
    """:func:`check_model_file` of a ``--model`` file in an encode worker, on ``device`` (the same
    errors, raised here), the plotting modules imported while it loads; in this process when no
    worker can run (the pipeline then moves it to the run's device)."""
    from functools import partial

    from ..encode_worker import file_worker_model, unavailable

    why = unavailable()
    if why is not None:
        log.info("encoding in this process (%s)", why)
        return check_model_file(src)
    from ..figures import pyplot

    pyplot()
    return file_worker_model(src, partial(check_model_file, src), device)


def sample_frames(n: int, k: int) -> list[int]:
    """At most ``k`` of ``range(n)``, evenly spread (all of them when ``n <= k``)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def train_batch_model(entries: Sequence[InputEntry], config, *, max_train_inputs: int = DEFAULT_TRAIN_INPUTS,
                      train_frames: int = DEFAULT_TRAIN_FRAMES,
                      prepared_cache: dict | None = None, cache_budget_bytes: int = 0,
                      on_skip: Callable[[InputEntry, str], None] | None = None, show_progress: bool = True,
                      init_model=None, finetune_steps: int = 0, read_options: ReadOptions | None = None,
                      reads_left_out: bool = False):
    """Train one model on patches sampled from ``entries``; returns ``(model, info)``.

    With ``init_model`` (the shipped model), that model is fine-tuned for ``finetune_steps`` steps
    instead (:meth:`stemfast.model.RVAE.finetune`) and patches keep their per-image size.

    At most ``max_train_inputs`` inputs (evenly spread over the list) and ``train_frames`` frames
    per stack are prepared; each contributes a random sample of its non-edge patches (about
    ``2 * max_train_patches / units``), and :func:`stemfast.pipeline.train_model` draws the final
    training set. Every frame is cut by its own spacing (images of different magnification pool
    patches of one extent in spacings), or at ``config.patch_size`` when the settings fix one; ``info``
    records how (``patch_size``: the fixed size or None; ``patch_extent``:
    :func:`stemfast.patchextent.extent_record`), and the model keeps it; ``sample`` what the sample
    depended on (:func:`sample_record`: the part of the trained model's reuse key, :func:`same_sample`).
    ``reads_left_out``: inputs were left out of ``entries`` for a read failure remembered under these read
    options (so the sample depends on them too).
    Prepared frames are kept in ``prepared_cache`` (key ``(name, frame)``) while their total size
    stays below ``cache_budget_bytes``, so the analysis does not prepare them again.
    Returns ``(None, info)`` when no input had a lattice.
    """
    from ..pipeline import Prepared, train_model
    from ..table import SiteTable

    t_start = time.perf_counter()
    ents = list(entries)
    n_candidates = len(ents)
    if len(ents) > max_train_inputs:
        pick = sample_frames(len(ents), max_train_inputs)
        ents = [ents[i] for i in pick]
    cap = getattr(config.model, "max_train_patches", None) or 20000
    pool = _PatchPool(config=config, patch_size=config.patch_size,
                      per_unit=max(256, int(math.ceil(2.0 * cap / max(1, len(ents))))),
                      cache=prepared_cache, cache_budget_bytes=cache_budget_bytes)
    for i, e in enumerate(progress_bar(ents, show_progress, desc="train: prepare", unit="file")):
        pool.add_input(i, e, train_frames=train_frames, on_skip=on_skip, read_options=read_options)
    patch_size = pool.patch_size
    record = extent_record([p for p, _ in pool.cuts], [s for _, s in pool.cuts], patch_size)
    if record.get("warning"):
        log.warning("training: %s", record["warning"])
    info = {"n_inputs_sampled": len(ents), "inputs": sorted(set(pool.used)), "patch_size": patch_size,
            "patch_extent": record,
            "norm": {"kind": "per-image robust (median -> 0, 99.5th percentile -> 1)", "images": pool.norms},
            "prepare_s": pool.stage_s,
            "sample": sample_record(asked_sample(max_train_inputs, train_frames, read_options),
                                    n_candidates=n_candidates, max_frames=pool.max_frames,
                                    read_dependent=pool.read_dependent or reads_left_out)}
    if not pool.patches:
        info["seconds"] = time.perf_counter() - t_start
        return None, info
    allp = np.concatenate(pool.patches)
    pool.patches.clear()
    slim = Prepared(image=np.zeros((0, 0), np.float32), sites=SiteTable({}), patches=allp,
                    edge=np.zeros(len(allp), bool), norm=None, patch_size=int(patch_size or 0), timings={})
    t0 = time.perf_counter()
    model = train_model([slim], config=config, init=init_model, steps=finetune_steps, patch_extent=record)
    info["train_s"] = time.perf_counter() - t0
    info["n_patches_pool"] = int(len(allp))
    info["n_patches"] = int(min(len(allp), cap))
    info["seconds"] = time.perf_counter() - t_start
    return model, info


def asked_sample(max_train_inputs: int = DEFAULT_TRAIN_INPUTS, train_frames: int = DEFAULT_TRAIN_FRAMES,
                 read_options: ReadOptions | None = None) -> dict:
    """What a run asks of the training sample: ``{max_train_inputs, train_frames, read_options}`` (the
    options of :func:`train_batch_model` that change the trained model and are no setting; the read
    options as :meth:`stemfast.config.ReadOptions.key_of`)."""
    return {"max_train_inputs": int(max_train_inputs), "train_frames": int(train_frames),
            "read_options": ReadOptions.key_of(read_options)}


def sample_record(asked: dict, *, n_candidates: int, max_frames: int, read_dependent: bool) -> dict:
    """The record of a training sample (``model.json``'s ``train_sample``): ``asked`` (:func:`asked_sample`)
    with ``n_candidates`` (the inputs it was drawn from), ``max_frames`` (the most frames of an input read)
    and ``read_options`` None where no read depended on them (no pixel filled, no read refused)."""
    return {**asked, "read_options": asked["read_options"] if read_dependent else None,
            "n_candidates": int(n_candidates), "max_frames": int(max_frames)}


def same_sample(made: dict | None, asked: dict) -> bool:
    """Whether the options ``asked`` (:func:`asked_sample`) draw the training sample ``made``
    (:func:`sample_record`) was drawn with: the same inputs (``max_train_inputs`` the same, or both at
    least the candidates), the same frames (``train_frames`` the same, or both at least the longest
    stack's frames) and read options the same where a read depended on them.

    ``made`` None (a ``model.json`` written before the sample was recorded): it was made with the
    defaults, the options of every run that did not name them -- the same when ``asked`` are the defaults.

    Examples
    --------
    >>> made = sample_record(asked_sample(16, 4), n_candidates=3, max_frames=1, read_dependent=False)
    >>> same_sample(made, asked_sample(8, 1, ReadOptions(fill_nonfinite=True)))
    True
    >>> same_sample(made, asked_sample(2, 4))
    False
    """
    if made is None:
        return asked == asked_sample()
    try:  # a damaged record (not a table, a count missing, not a whole number >= 1): not the same
        counts = [made[key] for key in ("n_candidates", "max_frames", "max_train_inputs", "train_frames")]
        if any(isinstance(c, bool) or float(c) != int(c) or int(c) < 1 for c in counts):
            return False
        n, f, i, k = map(int, counts)
        return (min(asked["max_train_inputs"], n) == min(i, n) and min(asked["train_frames"], f) == min(k, f)
                and made.get("read_options") in (None, asked["read_options"]))
    except (AttributeError, KeyError, TypeError, ValueError):
        return False


@dataclass
class _PatchPool:
    """The training patches sampled so far, with the images' normalisations, the inputs used, the
    preparation times and the prepared frames kept for the analysis."""

    config: object
    patch_size: int | None  # the settings' fixed size; None: every frame by its own spacing
    per_unit: int  # patches to sample per input (all its sampled frames together)
    cache: dict | None
    cache_budget_bytes: int
    patches: list = field(default_factory=list)
    norms: dict = field(default_factory=dict)
    used: list = field(default_factory=list)
    cuts: list = field(default_factory=list)  # (patch px, spacing px) of every frame used
    stage_s: dict = field(default_factory=dict)
    cached_bytes: int = 0
    max_frames: int = 0  # the most frames of an input read (a stack's frames sampled: at most train_frames)
    read_dependent: bool = False  # a read depended on the read options: pixels filled, or a read refused

    def add_input(self, i: int, e: InputEntry, *, train_frames: int, on_skip, read_options) -> None:
        """Sample patches of input ``e`` (the ``i``-th sampled input); a problem goes to ``on_skip``."""
        from ..sanity import check_spacing_fits

        try:
            mg = read_input(e.path, read_options)
        except Exception as exc:  # noqa: BLE001
            # a refused read (e.g. NaN pixels) may read with other read options: the sample depends on them
            self.read_dependent = self.read_dependent or isinstance(exc, ReadError)
            if on_skip:
                on_skip(e, read_failure_reason(exc))
            return
        if filled_by_read_options(getattr(mg, "metadata", None) or {}):
            self.read_dependent = True  # scattered non-finite pixels filled by the read options
        try:
            check_spacing_fits(self.config.sites.spacing, np.shape(mg.data)[-2:])
        except ValueError as exc:  # the settings do not fit this image: say why, not "no lattice"
            if on_skip:
                on_skip(e, str(exc))
            return
        note_whole_read(e, mg)  # the frame count, and what a chunk of a stack needs of the whole file (Dask)
        n = e.n_frames
        self.max_frames = max(self.max_frames, int(n))
        frames = sample_frames(n, train_frames)
        upf = max(64, self.per_unit // len(frames))
        for f in frames:
            prep = self._prepare(mg, e, f)
            if prep is not None:
                self._add_frame(prep, e, i, f, n, upf)

    def _prepare(self, mg, e: InputEntry, f: int):
        from ..pipeline import prepare

        try:
            t0 = time.perf_counter()
            img = read_frame(mg, f)
            self.stage_s["read"] = self.stage_s.get("read", 0.0) + time.perf_counter() - t0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prep = prepare(img, config=self.config, pixel_size=mg.pixel_size, unit=mg.unit,
                               patch_size=self.patch_size)
        except Exception as exc:  # noqa: BLE001 - a bad frame: leave it out of the training set
            log.info("training: %s frame %d left out: %s", e.rel, f, exc)
            return None
        for k, v in prep.timings.items():
            self.stage_s[k] = self.stage_s.get(k, 0.0) + float(v)
        return prep

    def _add_frame(self, prep, e: InputEntry, i: int, f: int, n: int, upf: int) -> None:
        good = np.flatnonzero(~prep.edge)
        if len(good) == 0:
            return
        self.cuts.append(cut_of(prep))
        rng = np.random.default_rng(getattr(self.config.model, "seed", 0) * 100003 + i * 1009 + f)
        if len(good) > upf:
            good = np.sort(rng.choice(good, upf, replace=False))
        self.patches.append(np.ascontiguousarray(prep.patches[good]))
        if prep.norm is not None and len(self.norms) < 32:
            self.norms[f"{e.name}[{f}]" if n > 1 else e.name] = (
                dataclasses.asdict(prep.norm) if dataclasses.is_dataclass(prep.norm) else repr(prep.norm))
        self.used.append(e.name)
        if self.cache is not None:
            # lazily cut patches (a large image) hold no memory of their own
            nbytes = prep.image.nbytes + getattr(prep.patches, "nbytes", 0) + 200 * len(prep.sites)
            if self.cached_bytes + nbytes <= self.cache_budget_bytes:
                self.cache[(e.name, f)] = prep
                self.cached_bytes += nbytes


def keep_named_model(out: Path, new_sha: str | None) -> Path | None:
    """Before ``OUT/model.pt`` is replaced by another model (SHA-256 ``new_sha``; None: not known yet):
    when an input's ``done.json`` in OUT names the model now there, keep a copy of it as
    ``OUT/model.<sha12>.pt`` (:data:`KEPT_MODEL_PATTERN`, with its ``model.json`` record as
    ``model.<sha12>.json``) and say so, so that those results keep the model they were made with.
    Returns the kept file, or None when nothing needed keeping."""
    target = out / MODEL_FILE
    if not target.is_file():
        return None
    old = file_sha256(target)
    if old == new_sha:
        return None
    n = sum((read_json(d) or {}).get("model_sha256") == old for d in out.glob(f"*/{DONE_FILE}"))
    if not n:
        return None
    keep = out / KEPT_MODEL_PATTERN.format(sha12=old[:12])
    if not keep.is_file() or file_sha256(keep) != old:
        with writing(keep), atomic_path(keep) as tmp:
            shutil.copyfile(target, tmp)
    info = read_json(out / MODEL_INFO_FILE)
    if info and info.get("sha256") == old:
        write_json(keep.with_suffix(".json"), info)
    log.warning("%s: the results of %d input(s) here were made with the model now replaced (sha256 %s...); "
                "it is kept as %s (use it again with --model %s)", out, n, old[:12], keep.name, keep)
    return keep


def kept_models(out: Path) -> list[dict]:
    """The earlier models kept in OUT (:func:`keep_named_model`): ``{file, sha256}`` each, for the
    batch summary (``sha256`` from its kept record, else the 12 digits of its name)."""
    found = []
    for p in sorted(out.glob(KEPT_MODEL_PATTERN.format(sha12="*"))):
        info = read_json(p.with_suffix(".json")) or {}
        found.append({"file": p.name, "sha256": info.get("sha256") or p.name.split(".")[1]})
    return found


def save_trained_model(model, train_info: dict, out: Path, *, config, chash: str, inputs_key: str,
                       finetune: int = 0) -> ModelState:
    """Save a model just trained (or fine-tuned for ``finetune`` steps) to ``OUT/model.pt`` with its
    provenance, and record it in ``OUT/model.json``."""
    from ..model.shipped import describe_model

    fixed = train_info.get("patch_size")
    extra = {"patch_size": int(fixed) if fixed else None, "patch_extent": train_info.get("patch_extent"),
             "norm": train_info["norm"],
             "config": json.loads(json.dumps(config_to_dict(config), default=str)),
             "config_hash": chash, "inputs_key": inputs_key, "stemfast_version": __version__,
             "n_train_patches": train_info.get("n_patches"), "train_inputs": train_info["inputs"]}
    if finetune and not fixed:  # fine-tuned: patches stay cut per image from its spacing, as for the shipped model
        del extra["patch_size"]
        model.extra.pop("patch_size", None)
    keep_named_model(out, None)
    with writing(out / MODEL_FILE):
        model.save(out / MODEL_FILE, extra=extra)  # atomic (temp file + os.replace)
    sha = file_sha256(out / MODEL_FILE)
    info = {"sha256": sha, "source": "trained", "config_hash": chash, "inputs_key": inputs_key,
            "stemfast_version": __version__, "patch_size": extra.get("patch_size"),
            "patch_extent": extra.get("patch_extent"),
            "n_train_patches": extra["n_train_patches"], "train_inputs": extra["train_inputs"],
            "train_seconds": train_info.get("seconds"), "date": now(), "finetune_steps": finetune,
            "train_sample": train_info.get("sample"),
            **{k: v for k, v in describe_model(model, sha).items() if k in ("name", "version", "architecture")}}
    write_json(out / MODEL_INFO_FILE, info)
    return ModelState(out / MODEL_FILE, sha, "trained", trained=True, info=info, _model=model)


def resolve_model(entries: list[InputEntry], out: Path, *, config, chash: str, model_path, force: bool,
                  finetune: int = 0, worker: bool = False, given=None, sample: dict | None = None) -> ModelState:
    """The model of the batch: given, current in OUT, or (to be) trained (``sha256`` None).

    A model trained (or fine-tuned) by an earlier run is current when its settings, inputs, version,
    fine-tuning steps and training sample (:func:`same_sample` of ``sample``, what this run asks:
    :func:`asked_sample`, the defaults when None) are this run's.

    ``worker``: a given model is loaded (and checked) in an encode worker process when one can run
    (:mod:`stemfast.encode_worker`), so this process does not import torch. ``given``: the model of
    ``model_path`` loaded already (:func:`given_for_run`).
    """
    target = out / MODEL_FILE
    if model_path is not None:
        src = Path(model_path)
        device = config.model.device if config is not None else "auto"
        loaded = given if given is not None else given_model(src, device) if worker else check_model_file(src)
        sha = file_sha256(src)  # (loaded before anything is copied into OUT)
        if src.resolve() != target.resolve():
            if not target.exists() or file_sha256(target) != sha:
                keep_named_model(out, sha)
                with writing(target), atomic_path(target) as tmp:
                    shutil.copyfile(src, tmp)
        info = {"sha256": sha, "source": str(src), "stemfast_version": __version__, **given_identity(loaded, src)}
        old = read_json(out / MODEL_INFO_FILE)
        if old != info:
            write_json(out / MODEL_INFO_FILE, info)
        return ModelState(target, sha, f"given: {src}", info=info, _model=loaded)
    info = read_json(out / MODEL_INFO_FILE)
    key = inputs_key(entries)
    if (not force and info and target.exists() and info.get("config_hash") == chash
            and info.get("inputs_key") == key and info.get("stemfast_version") == __version__
            and info.get("source") == "trained" and int(info.get("finetune_steps") or 0) == finetune):
        asked = sample or asked_sample()
        if not same_sample(info.get("train_sample"), asked):
            log.info("%s: the model there was trained on another sample of the inputs (%s); this run asks for "
                     "%s: training again", out, info.get("train_sample") or "made before the sample was "
                     "recorded: the defaults", asked)
        elif file_sha256(target) == info.get("sha256"):
            made = f"fine-tuned for {finetune} steps" if finetune else "trained"
            return ModelState(target, info["sha256"], f"{made} (reused, current)", info=info)
    return ModelState(target, None, "trained", info={"inputs_key": key})


def given_identity(model, src: Path) -> dict:
    """``{name, version, architecture}`` of a ``--model`` file's model, from the file: the shipped
    model's tag, a fine-tuned model's base, else ``trained model FILE`` (no version)."""
    from ..model.shipped import describe_model

    d = describe_model(model)
    name = d["name"] if d["source"] != "trained" else f"trained model {src.name}"
    return {"name": name, "version": d["version"], "architecture": d["architecture"]}


def given_for_run(model_path, config, *, worker: bool = False, given_settings=()):
    """The ``--model`` file's model (:func:`check_model_file`; in an encode worker with ``worker``,
    :func:`given_model`) and ``config`` with the model's own architecture
    (:func:`stemfast.model.shipped.with_architecture`): the file is used as it is, so its network is
    the run's. ``given_settings``: the settings set explicitly (dotted keys; the command line's
    options), whose architecture values must equal the file's even where they are the defaults.
    Returns ``(model, config)``.

    Raises
    ------
    stemfast.errors.SettingsError
        When the settings ask for another architecture (``--plain-vae``, ``--latent-dim``, ...:
        values that differ from the model's and either from the defaults or are among
        ``given_settings``), which the file cannot give.
    stemfast.errors.ModelFileError
        The file is missing or not a stemfast model.
    """
    from ..errors import SettingsError
    from ..model.shipped import architecture, asked_architecture, settings_text, with_architecture

    src = Path(model_path)
    model = given_model(src, config.model.device) if worker else check_model_file(src)
    own = getattr(model, "config", None)
    if own is None:
        return model, config
    asked = asked_architecture(own, config.model, given_settings)
    if asked:
        close = getattr(model, "close", None)
        if callable(close):
            close()
        arch = ", ".join(f"{k} {v}" for k, v in architecture(own).items() if k in ("model", "latent_dim", "input_size"))
        raise SettingsError(f"--model {src} is used as it is ({arch}): it cannot be combined with settings for "
                            f"another architecture: {settings_text(asked, config.model)}; leave them out, or "
                            "train a model of that architecture with --train")
    return model, with_architecture(config, own)


def record_refusal(ms: ModelState, out: Path, reason: str | None) -> None:
    """Record in ``OUT/model.json`` (``refused``) why the shipped model was not used for this run and a
    model was trained instead (None: it was not refused; an earlier run's note is removed)."""
    info = read_json(out / MODEL_INFO_FILE)
    if not ms.sha256 or not info or info.get("sha256") != ms.sha256 or info.get("refused") == reason:
        return
    info = {k: v for k, v in info.items() if k != "refused"}
    if reason:
        info["refused"] = reason
    write_json(out / MODEL_INFO_FILE, info)
    ms.info = info


def use_shipped(model, out: Path) -> ModelState:
    """The shipped default model as the batch's model: copied to ``OUT/model.pt`` and named in model.json."""
    from ..model.shipped import MODEL_PATH, describe_model

    target = out / MODEL_FILE
    sha = model.extra.get("sha256") or file_sha256(MODEL_PATH)
    if not target.exists() or file_sha256(target) != sha:
        keep_named_model(out, sha)
        with atomic_path(target) as tmp:
            shutil.copyfile(MODEL_PATH, tmp)
    info = {**describe_model(model, sha), "stemfast_version": __version__}
    if read_json(out / MODEL_INFO_FILE) != info:
        write_json(out / MODEL_INFO_FILE, info)
    return ModelState(target, sha, f"shipped: {info['name']} {info['version']}", info=info, _model=model)


def model_identity(out: Path, model_sha: str | None) -> dict:
    """``{name, version, sha256, source, architecture, refused}`` of the batch's model (from OUT/model.json)
    for summary.json."""
    info = read_json(out / MODEL_INFO_FILE) or {}
    if not model_sha or info.get("sha256") != model_sha:
        return {"name": None, "version": None, "sha256": model_sha, "source": None, "architecture": None,
                "refused": None}
    # refused: why the shipped model was not used and this one trained instead (None: not refused)
    return {"name": info.get("name"), "version": info.get("version"), "sha256": model_sha,
            "source": info.get("source"), "architecture": info.get("architecture"), "refused": info.get("refused")}
