"""The pretrained default model shipped with stemfast (package data) and its load-time checks.

stemfast ships one rVAE trained on synthetic 2H monolayers (MoS2, WS2, MoSe2, WSe2; 5-25 px site
spacing, a wide range of dose, probe size, contamination and scan artefacts) by
:mod:`stemfast.model.train_default` -- retrain it with one command::

    PYTHONPATH=python python -m stemfast.model.train_default

The weights live in ``stemfast/model/data/default_rvae.pt`` next to a manifest
``default_rvae.json`` (name, version, SHA-256 of the weights, input contract). Before the model
is used, :func:`load_default_model` checks

1. the weights' SHA-256 against the manifest (a damaged or replaced file is refused);
2. name and version tag in the weights against the manifest;
3. the **input contract**: the patches the model was trained on must be the patches the current
   code cuts. The contract holds :data:`INPUT_CONTRACT_VERSION` (bump it when patch cutting or
   normalisation changes on purpose) and a *probe*: quantiles of the patches that
   :func:`stemfast.frontend.prepare` cuts from a fixed synthetic image, computed at training time.
   If today's code gives different quantiles (e.g. a new patch normalisation), the model would see
   inputs unlike its training data, so it is refused.

A refused model raises :class:`ShippedModelError` (with the reason and the retraining command);
:func:`default_model` turns that into a warning and returns None, and the callers (``batch``,
``analyze``, :func:`stemfast.pipeline.run_image`) then train on the inputs as before.

The shipped model cuts its patches relative to each image's lattice spacing
(:func:`stemfast.patches.default_patch_size`; no fixed ``patch_size`` in its ``extra``), so one
model serves every magnification.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ShippedModelError", "DATA_DIR", "MODEL_PATH", "MANIFEST_PATH", "ARRAYS_PATH", "write_arrays",
           "load_compiled_default", "compiled_default_or_none", "shipped_for_run", "INPUT_CONTRACT_VERSION",
           "RETRAIN_COMMAND", "input_contract", "check_contract", "manifest", "load_default_model",
           "default_model", "usable_manifest", "describe_model", "compatible_settings", "ARCH_OPTIONS",
           "architecture", "asked_architecture", "settings_text", "with_architecture", "check_finetune_settings",
           "warn_refused"]

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).with_name("data")
MODEL_PATH = DATA_DIR / "default_rvae.pt"
MANIFEST_PATH = DATA_DIR / "default_rvae.json"
#: the same weights as plain arrays (the network's ``state_dict``), for the compiled engine
#: (:mod:`stemfast.model.engine`), which runs the shipped model without torch
ARRAYS_PATH = DATA_DIR / "default_rvae.npz"
#: Version of the patch input contract (normalisation, extent, resampling). Bump it together with any
#: deliberate change of how :func:`stemfast.frontend.prepare` cuts or normalises patches; a shipped
#: model trained under another version is refused until it is retrained.
INPUT_CONTRACT_VERSION = 1
RETRAIN_COMMAND = "python -m stemfast.model.train_default"
#: largest allowed difference of a probe quantile (patch values are normalised: background 0, metal ~1)
PROBE_TOLERANCE = 0.05
_PROBE_QUANTILES = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 99.0)
#: RVAEConfig fields that define the network and its input; user settings that change one of them
#: ask for a different model than the shipped one (then the model is trained on the inputs)
ARCH_FIELDS = ("model", "latent_dim", "input_size", "resample", "channels", "stn_channels", "stn_downsample",
               "rotation_symmetry", "symmetrize", "mask_radius")
#: the command-line options of architecture settings, to name them in messages (the others: ``--set model.FIELD``)
ARCH_OPTIONS = {"model": "--plain-vae", "latent_dim": "--latent-dim"}


class ShippedModelError(RuntimeError):
    """The shipped default model is missing, damaged, or does not fit the current code."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _probe_image() -> tuple[np.ndarray, float]:
    """A fixed, noise-free synthetic MoS2 image (192 x 192 px, 9 px spacing) and its spacing."""
    from ..synthetic import make_mos2

    s = make_mos2(shape=(192, 192), pixel_size_A=3.16 / np.sqrt(3.0) / 9.0, rotation_deg=17.0, noise=False,
                  rates=(0.0, 0.0, 0.0, 0.0), contamination=0, holes=0, background=0.2, texture=0.0, seed=7)
    return s.image, float(s.meta["nn_px"])


@functools.lru_cache(maxsize=4)
def _probe(input_size: int, backend: str | None = None) -> tuple[float, ...]:
    from ..config import PipelineConfig
    from ..frontend import prepare
    from ..sites import SiteSettings
    from .settings import RVAEConfig

    image, _ = _probe_image()
    cfg = PipelineConfig(sites=SiteSettings(backend=backend), model=RVAEConfig(input_size=int(input_size)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prep = prepare(image, config=cfg)
    keep = ~np.asarray(prep.edge, bool)
    if len(prep.patches) == 0 or not keep.any():
        raise ShippedModelError("input-contract probe: the patch path found no sites on the probe image")
    p = np.asarray(prep.patches[np.flatnonzero(keep)], np.float64)
    q = np.percentile(p, _PROBE_QUANTILES)
    ratio = prep.patch_size / float(prep.sites.meta.get("spacing_px", np.nan))
    return tuple(float(v) for v in q) + (float(ratio),)


def input_contract(input_size: int = 32, *, backend: str | None = None) -> dict[str, Any]:
    """What the patch path of the current code feeds a model of ``input_size``: version and probe
    (run on the kernels of ``backend``: the run's ``sites.backend``).

    Stored in a shipped model's ``extra["contract"]`` at training time and compared with the
    running code by :func:`check_contract`.

    Examples
    --------
    >>> c = input_contract(32)
    >>> c["version"] == INPUT_CONTRACT_VERSION, len(c["probe_quantiles"])
    (True, 7)
    """
    probe = _probe(int(input_size), backend)
    return {"version": INPUT_CONTRACT_VERSION, "input_size": int(input_size),
            "patch_extent": "per-image: stemfast.patches.default_patch_size(spacing)",
            "normalisation": "stemfast.patches.PatchNorm.from_image (per image)",
            "probe_percentiles": list(_PROBE_QUANTILES), "probe_quantiles": list(probe[:-1]),
            "probe_patch_over_spacing": probe[-1]}


def check_contract(stored: dict | None, input_size: int, *, backend: str | None = None) -> None:
    """Raise :class:`ShippedModelError` when ``stored`` (a model's contract) does not match the code
    (its probe run on the kernels of ``backend``, the run's ``sites.backend``)."""
    if not stored:
        raise ShippedModelError("the model records no input contract")
    if int(stored.get("version", -1)) != INPUT_CONTRACT_VERSION:
        raise ShippedModelError(f"the model was trained for input contract {stored.get('version')}, the code "
                                f"implements {INPUT_CONTRACT_VERSION} (patch cutting or normalisation changed)")
    if int(stored.get("input_size", -1)) != int(input_size):
        raise ShippedModelError(f"contract input size {stored.get('input_size')} != model input size {input_size}")
    now = input_contract(input_size, backend=backend)
    a = np.asarray(stored.get("probe_quantiles", []), float)
    b = np.asarray(now["probe_quantiles"], float)
    if a.shape != b.shape or not np.all(np.abs(a - b) <= PROBE_TOLERANCE):
        raise ShippedModelError(
            "the patches the current code cuts differ from those the model was trained on (probe quantiles "
            f"{np.round(b, 3).tolist()} now vs {np.round(a, 3).tolist()} at training; patch normalisation "
            "changed?)")
    ra, rb = float(stored.get("probe_patch_over_spacing", np.nan)), float(now["probe_patch_over_spacing"])
    if not abs(ra - rb) <= 0.05 * rb:
        raise ShippedModelError(f"patch extent changed: {rb:.3f} spacings now vs {ra:.3f} at training")


def manifest(path: str | Path | None = None) -> dict:
    """The manifest of the shipped model (name, version, sha256, ...); ShippedModelError when missing."""
    path = Path(MANIFEST_PATH if path is None else path)
    if not path.is_file():
        raise ShippedModelError(f"no shipped model manifest at {path} (train one: {RETRAIN_COMMAND})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShippedModelError(f"unreadable shipped model manifest {path}: {exc}") from exc


def load_default_model(*, map_location=None, model_path: str | Path | None = None,
                       manifest_path: str | Path | None = None, probe: bool = True, backend: str | None = None):
    """Load the shipped model after checking checksum, version tag and input contract.

    ``probe=False``: the input contract was checked against the manifest's copy already
    (:func:`usable_manifest`, in the process that cuts the patches); the model's own contract must
    then equal the manifest's. ``backend``: the kernels of the probe (the run's ``sites.backend``).

    Raises
    ------
    ShippedModelError
        With the reason, when any check fails.

    Examples
    --------
    >>> m = load_default_model()  # doctest: +SKIP
    >>> m.extra["shipped"]["name"]  # doctest: +SKIP
    'stemfast-2h-rvae'
    """
    from .api import RVAE
    from .training import resolve_device

    man = manifest(MANIFEST_PATH if manifest_path is None else manifest_path)
    model_path = Path(MODEL_PATH if model_path is None else model_path)
    sha = _check_weights(model_path, man)
    device = resolve_device("auto" if map_location is None else map_location)  # not a fault of the model
    try:
        model = RVAE.load(model_path, map_location=device)
    except Exception as exc:  # noqa: BLE001 - any load failure means: not usable
        raise ShippedModelError(f"shipped model {model_path.name} cannot be loaded: {exc}") from exc
    tag = model.extra.get("shipped") or {}
    if tag.get("name") != man.get("name") or str(tag.get("version")) != str(man.get("version")):
        raise ShippedModelError(f"shipped model tag {tag.get('name')} {tag.get('version')} does not match the "
                                f"manifest {man.get('name')} {man.get('version')}")
    if probe:
        check_contract(model.extra.get("contract"), model.config.input_size, backend=backend)
    elif model.extra.get("contract") != man.get("contract"):
        raise ShippedModelError("the model's input contract differs from its manifest's")
    model.extra["sha256"] = sha
    return model


def _check_weights(model_path: Path, man: dict) -> str:
    """The SHA-256 of the weights file, checked against the manifest (ShippedModelError if missing or different)."""
    return _check_file(model_path, man.get("sha256"), "weights")


def _check_file(path: Path, expected: str | None, what: str) -> str:
    """The SHA-256 of the shipped model's file ``path``, which must exist and equal ``expected``
    (ShippedModelError otherwise; ``what`` names the file in the message)."""
    if not path.is_file():
        raise ShippedModelError(f"shipped model {what} missing: {path}")
    sha = _sha256(path)
    if sha != expected:
        raise ShippedModelError(f"shipped model {path.name}: SHA-256 {sha[:12]}... does not match the "
                                f"manifest ({str(expected)[:12]}...): damaged or replaced file")
    return sha


def write_arrays(state: dict, path: str | Path) -> dict:
    """Write a network's ``state_dict`` (arrays) as an ``.npz`` with fixed zip timestamps (the same
    weights give the same bytes); returns the manifest entry ``{"file", "sha256", "bytes"}``."""
    import io
    import zipfile

    from ..atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(state):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(np.asarray(state[name], np.float32)),
                                      allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    return {"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size}


def load_compiled_default(man: dict | None = None, *, backend: str | None = None):
    """The shipped model as a :class:`~stemfast.model.engine.CompiledModel` (no torch): its arrays
    file checked against the manifest ``man`` (default: the package's, with the checks of
    :func:`usable_manifest` done by the caller). Raises ShippedModelError when the arrays file is
    missing or differs from the manifest."""
    from .engine import CompiledModel, state_arrays
    from .settings import RVAEConfig

    man = manifest() if man is None else man
    entry = man.get("arrays") or {}
    if not entry:
        raise ShippedModelError(f"the shipped model's manifest names no arrays file (retrain with: {RETRAIN_COMMAND})")
    path = ARRAYS_PATH.with_name(str(entry.get("file", ARRAYS_PATH.name)))
    _check_file(path, entry.get("sha256"), "arrays")
    extra = {"shipped": {"name": man.get("name"), "version": man.get("version")}, "sha256": man.get("sha256"),
             "contract": man.get("contract"), "engine": "compiled"}
    try:
        return CompiledModel(state_arrays(path), RVAEConfig.from_dict(man.get("config") or {}), extra=extra,
                             backend=backend)
    except (KeyError, ValueError, OSError) as exc:
        raise ShippedModelError(f"shipped model arrays {path.name} cannot be used: {exc}") from exc


def compiled_default_or_none(man: dict, *, backend: str | None = None):
    """:func:`load_compiled_default`, or None with a warning when its arrays cannot be used (the
    callers then run the shipped model on torch)."""
    try:
        model = load_compiled_default(man, backend=backend)
    except ShippedModelError as exc:
        log.warning("compiled engine not used (%s); the shipped model runs on torch", exc)
        return None
    log.info("shipped model on the compiled engine (no torch)")
    return model


def shipped_for_run(config, *, on_torch=None, refused: list | None = None):
    """The shipped model for a run with ``config`` (a PipelineConfig): on the compiled engine when its
    ``model.engine`` resolves to it, else -- or when its arrays cannot be used -- from ``on_torch(config)``
    (default :func:`default_model`: loaded with torch here); None when it is not usable for this run
    (a warning says why, and the reason it was refused is appended to ``refused``; ``on_torch`` records
    its own). The compiled engine runs on the run's ``sites.backend``."""
    from .engine import engine_for

    if engine_for(config) == "compiled":
        man = usable_manifest(config, refused=refused)
        if man is None:
            return None
        model = compiled_default_or_none(man, backend=config.sites.backend)
        if model is not None:
            return model
    if on_torch is not None:
        return on_torch(config)
    return default_model(config, refused=refused)


def compatible_settings(model_config, requested) -> list[str]:
    """Names of the architecture fields where ``requested`` (the run's RVAEConfig) differs from the model's."""
    return [f for f in ARCH_FIELDS if getattr(model_config, f, None) != getattr(requested, f, None)]


def asked_architecture(model_config, requested, given=()) -> list[str]:
    """The architecture fields (:data:`ARCH_FIELDS`) where ``requested`` (the run's RVAEConfig) asks for
    another network than ``model_config``'s: it differs from the model's value and from the default,
    or it differs from the model's value and was set explicitly (``given``: the settings the caller
    knows were set, dotted keys such as ``"model.latent_dim"``; the command line knows which options
    were typed, a config object cannot tell a default set from one left alone).

    Examples
    --------
    >>> from stemfast.model.settings import RVAEConfig
    >>> asked_architecture(RVAEConfig(input_size=32), RVAEConfig())  # the default is no request
    []
    >>> asked_architecture(RVAEConfig(input_size=32), RVAEConfig(model="vae", latent_dim=7))
    ['model', 'latent_dim']
    >>> asked_architecture(RVAEConfig(latent_dim=7), RVAEConfig(), given={"model.latent_dim"})  # typed
    ['latent_dim']
    """
    from .settings import RVAEConfig

    default = RVAEConfig()
    return [f for f in compatible_settings(model_config, requested)
            if getattr(requested, f) != getattr(default, f) or f"model.{f}" in given]


def settings_text(fields, requested) -> str:
    """``"model.model = 'vae' (--plain-vae), ..."``: the architecture settings ``fields`` of ``requested``
    with the option that sets each (:data:`ARCH_OPTIONS`)."""
    return ", ".join(f"model.{f} = {getattr(requested, f)!r} ({ARCH_OPTIONS.get(f, '--set model.' + f)})"
                     for f in fields)


def architecture(model_config) -> dict:
    """The architecture fields (:data:`ARCH_FIELDS`) of a model's RVAEConfig, as JSON values."""
    return {f: list(v) if isinstance(v, tuple) else v for f in ARCH_FIELDS
            for v in [getattr(model_config, f, None)]}


def with_architecture(config, model_config):
    """``config`` (a PipelineConfig) with the architecture fields of its ``[model]`` section taken from
    ``model_config`` (a loaded model's): the settings a run with that model has."""
    import dataclasses

    arch = {f: getattr(model_config, f) for f in ARCH_FIELDS if hasattr(model_config, f)}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **arch))


def check_finetune_settings(requested, steps: int) -> None:
    """:class:`~stemfast.errors.SettingsError` when ``--finetune steps`` (> 0) meets settings
    (``requested``, the run's RVAEConfig) asking for another architecture than the shipped model's:
    fine-tuning adapts that network, it cannot change it (a new model was trained silently instead).
    A shipped model that cannot be read is left to the run (refused there with a warning)."""
    from ..errors import SettingsError
    from .settings import RVAEConfig

    if not steps or requested is None:
        return
    try:
        man = manifest()
    except ShippedModelError:
        return
    diff = compatible_settings(RVAEConfig.from_dict(man.get("config") or {}), requested)
    if diff:
        raise SettingsError(f"--finetune {steps} adapts the shipped model ({man.get('name')} {man.get('version')}), "
                            f"whose architecture is fixed, but the settings ask for another one: "
                            f"{settings_text(diff, requested)}; leave them out to fine-tune, or train a model "
                            "of that architecture with --train")


def usable_manifest(config=None, *, probe: bool = True, refused: list | None = None) -> dict | None:
    """The checks of :func:`default_model` that need no torch, on the manifest and the weights file:
    the run's model settings, the weights' SHA-256 and (``probe``) the input contract (the
    manifest's copy of the model's; probed on the run's ``sites.backend``). Returns the manifest, or
    None -- with the warning :func:`default_model` gives -- when the shipped model would not be used (a
    refusal's reason is appended to ``refused``; settings asking for another architecture are no
    refusal).
    :func:`load_default_model` with ``probe=False`` then loads it (in another process:
    :mod:`stemfast.batch.encode_worker`) and checks its tag.
    """
    requested = getattr(config, "model", None)
    try:
        man = manifest()
        if requested is not None and _settings_differ(man, requested):
            return None
        _check_weights(MODEL_PATH, man)
        if probe:
            check_contract(man.get("contract"), int((man.get("config") or {}).get("input_size", -1)),
                           backend=getattr(getattr(config, "sites", None), "backend", None))
    except ShippedModelError as exc:
        warn_refused(exc, refused)
        return None
    return man


def _settings_differ(man: dict, requested) -> bool:
    from .settings import RVAEConfig

    diff = compatible_settings(RVAEConfig.from_dict(man.get("config") or {}), requested)
    if diff:
        log.info("model settings %s differ from the shipped model's: training a model on the inputs", diff)
    return bool(diff)


def warn_refused(exc: ShippedModelError, refused: list | None = None) -> str:
    """Warn that the shipped model is refused (``exc`` says why) and a model is trained instead;
    the reason is appended to ``refused`` (for the run's records). Returns the warning."""
    msg = f"shipped default model not used: {exc}; training a model on the inputs instead " \
          f"(retrain the shipped model with: {RETRAIN_COMMAND})"
    log.warning("%s", msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if refused is not None:
        refused.append(str(exc))
    return msg


def default_model(config=None, *, map_location=None, refused: list | None = None):
    """The shipped model for a run with ``config`` (a PipelineConfig), or None with a warning.

    None when the shipped model is refused (:class:`ShippedModelError`: missing, damaged, or the
    patch contract changed; the reason is appended to ``refused``) or when the run's model settings
    ask for another architecture (e.g. ``--plain-vae``, another ``latent_dim``); the caller then
    trains on its inputs. Loaded onto ``map_location``, by default the run's ``model.device``.
    """
    requested = getattr(config, "model", None)
    if map_location is None and requested is not None:
        map_location = requested.device
    try:
        # settings asking for another network: decided from the manifest alone
        if requested is not None and _settings_differ(manifest(), requested):
            return None
        model = load_default_model(map_location=map_location,
                                   backend=getattr(getattr(config, "sites", None), "backend", None))
    except ShippedModelError as exc:
        warn_refused(exc, refused)
        return None
    if requested is not None and compatible_settings(model.config, requested):
        return None
    return model


def describe_model(model, sha256: str | None = None) -> dict:
    """``{name, version, sha256, source, architecture}`` of a model (shipped, fine-tuned or trained on
    the inputs; ``architecture``: :func:`architecture` of its settings, None when it has none)."""
    extra = getattr(model, "extra", None) or {}
    tag = extra.get("shipped") or {}
    sha = sha256 or extra.get("sha256")
    cfg = getattr(model, "config", None)
    arch = {"architecture": architecture(cfg) if cfg is not None else None}
    if tag and not extra.get("finetuned_from"):
        return {"name": tag.get("name"), "version": tag.get("version"), "sha256": sha, "source": "shipped", **arch}
    if extra.get("finetuned_from"):
        base = extra["finetuned_from"]
        return {"name": f"{base.get('name')} (fine-tuned)", "version": base.get("version"), "sha256": sha,
                "source": f"fine-tuned for {extra.get('finetune_steps')} steps on the inputs", **arch}
    return {"name": "trained on the inputs", "version": None, "sha256": sha, "source": "trained", **arch}
