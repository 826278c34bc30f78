"""Everything the subcommands share, defined once: options, their parsing, exit codes, error prints.

``batch``, ``analyze``, ``train`` and ``bench`` take the same settings options
(:func:`add_settings_options`); ``sites`` takes the lattice ones (:func:`add_spacing_option`,
:func:`add_backend_option`); every command reading micrographs takes the input options
(:func:`add_input_options`). :func:`config_from_args` turns parsed arguments into a checked
``PipelineConfig`` and raises :class:`stemfast.errors.SettingsError` (exit status 2) before any
work is done. The exit codes and the ``error: ...`` print are those of :mod:`stemfast.errors`
(re-exported here); :func:`guarded` runs a command handler with them.

Examples
--------
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_settings_options(p)
>>> cfg = config_from_args(p.parse_args(["--epochs", "3", "--set", "analysis.top_n=5"]))
>>> cfg.model.epochs, cfg.analysis.top_n
(3, 5)
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from ..backend import BACKENDS
from ..config import DEFAULT_MAX_NONFINITE, ReadOptions
from ..errors import (EXIT_BUSY, EXIT_CODES, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_SETTINGS, EXIT_SKIPPED,
                      SettingsError, describe_os_error, report_cli_error)
from ..materials import add_material_argument

__all__ = [
    "typed_settings",
    "start_encode_worker_early",
    "add_settings_options",
    "add_spacing_option",
    "add_backend_option",
    "add_input_options",
    "add_companion_options",
    "companions_from_args",
    "add_verbose_option",
    "AtLeast",
    "synthetic_min_side",
    "config_from_args",
    "overrides_from_args",
    "settings_given",
    "SHORTCUTS",
    "read_options_from_args",
    "parse_set",
    "exit_status_epilog",
    "add_model_choice_arguments",
    "guarded",
    "ReadOptions",
    "DEFAULT_MAX_NONFINITE",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_SETTINGS",
    "EXIT_SKIPPED",
    "EXIT_BUSY",
    "EXIT_INTERRUPTED",
    "EXIT_CODES",
    "report_cli_error",
]

log = logging.getLogger("stemfast.cli")

class AtLeast:
    """An argparse ``type``: an integer of at least ``low``; anything else is the parser's error naming
    the option and the range (exit status 2), e.g. ``argument --size: must be an integer >= 16, got 0``.

    ``low`` may be a callable giving the bound when first needed (:func:`synthetic_min_side`: its
    module is not imported for every command). ``%(type)s`` in the option's help reads
    ``an integer >= LOW``.

    Examples
    --------
    >>> p = argparse.ArgumentParser(prog="demo")
    >>> _ = p.add_argument("--n-images", type=AtLeast(1), default=2, help="images (%(type)s)")
    >>> p.parse_args(["--n-images", "3"]).n_images
    3
    >>> AtLeast(1)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be an integer >= 1, got 0
    """

    def __init__(self, low) -> None:
        self._low = low

    @property
    def low(self) -> int:
        """The smallest value allowed."""
        return int(self._low() if callable(self._low) else self._low)

    @property
    def __name__(self) -> str:  # argparse's name of the type (%(type)s in a help text)
        return f"an integer >= {self.low}"

    def __call__(self, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.__name__}, got {text!r}") from None
        if value < self.low:
            raise argparse.ArgumentTypeError(f"must be {self.__name__}, got {value}")
        return value


def synthetic_min_side() -> int:
    """The smallest image side the synthetic generator draws (:data:`stemfast.synthetic.MIN_SIDE`), the
    bound of the demo's and the bench's ``--size``."""
    from ..synthetic import MIN_SIDE

    return MIN_SIDE


def add_verbose_option(p) -> None:
    """``-v`` / ``-vv``: more log output."""
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug)")


def add_spacing_option(g) -> None:
    """``--spacing PX`` (``sites.spacing``)."""
    g.add_argument("--spacing", type=float, default=None, metavar="PX",
                   help="nearest-neighbour column spacing in px (sites.spacing; default: estimated per image)")


def add_backend_option(g) -> None:
    """``--backend`` (``sites.backend``), its choices from :data:`stemfast.backend.BACKENDS`."""
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="kernel backend of the whole run (sites.backend; default: STEMFAST_BACKEND or the fastest "
                        "available)")


def add_settings_options(p: argparse.ArgumentParser, *, model: bool = True,
                         title: str = "settings (override the --config file)") -> None:
    """``--config`` and the setting overrides (``--set`` and the shortcuts), plus ``-v``."""
    g = p.add_argument_group(title)
    g.add_argument("--config", metavar="FILE.toml", default=None,
                   help="settings file (TOML: [sites], [sites.lattice], [model], [analysis], patch_size); a "
                        "results folder's stemfast.toml works too. Options below override it")
    if model:
        g.add_argument("--plain-vae", action="store_true",
                       help="plain VAE instead of the rotation-invariant rVAE (model.model = 'vae')")
        g.add_argument("--latent-dim", type=int, default=None, metavar="N", help="latent size (model.latent_dim)")
        g.add_argument("--epochs", type=int, default=None, metavar="N", help="maximal training epochs (model.epochs)")
    add_spacing_option(g)
    add_material_argument(g)
    add_backend_option(g)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set analysis.defect_cutoff=6 --set model.device='\"cpu\"' "
                        "(VALUE is parsed as TOML, else taken as a string); repeatable")
    add_verbose_option(p)


def add_input_options(p: argparse.ArgumentParser) -> None:
    """``--fill-nonfinite`` / ``--nonfinite-limit``."""
    g = p.add_argument_group("inputs")
    g.add_argument("--fill-nonfinite", action="store_true",
                   help="images with scattered NaN/infinite pixels: replace them by the frame median (with a "
                        "warning in the summary) instead of skipping the image. A margin of them (an aligned "
                        "frame's NaN padding) is filled without it: no site is placed there")
    g.add_argument("--nonfinite-limit", type=float, default=DEFAULT_MAX_NONFINITE, metavar="FRACTION",
                   help=f"with --fill-nonfinite: the largest fraction of a frame's pixels that may be scattered "
                        f"non-finite ones and be filled (outside a margin; default {DEFAULT_MAX_NONFINITE:g}). "
                        "A frame over it is not filled: the whole input (every frame of a stack) is skipped, "
                        "and the reason names that frame")


def add_companion_options(p: argparse.ArgumentParser, *, single_file: bool = False) -> None:
    """``--companion-name MAIN=COMPANION`` (and, for one file, ``--companion FILE``): a second
    detector's image of the same scan per input (:mod:`stemfast.batch.companions`)."""
    g = p.add_argument_group(
        "second detector of the same scan",
        "a second image recorded simultaneously (e.g. HAADF = ADF1 with MAADF = ADF2), of the same shape\n"
        "(a series: as many frames of the same size):\n"
        "its column intensity is read at the sites, the defect scores weigh the two images' local z together")
    x = g.add_mutually_exclusive_group()
    if single_file:
        x.add_argument("--companion", metavar="FILE", default=None,
                       help="the second detector's image of FILE's scan (any format stemfast reads)")
    x.add_argument("--companion-name", metavar="MAIN=COMPANION", default=None,
                   help="pair inputs by file name: the companion of an input whose name contains MAIN is the file "
                        "of the same folder and extension with the last MAIN replaced by COMPANION, e.g. "
                        "ADF1=ADF2 pairs X_ADF1.dm4 with X_ADF2.dm4 (case-sensitive); files whose name contains "
                        "COMPANION are companions, not inputs; an input whose companion is missing is analysed "
                        "alone with a warning")
    x.add_argument("--no-companion", action="store_true",
                   help=f"analyse each image alone. Without this{', --companion' if single_file else ''} or "
                        "--companion-name, the companion "
                        "of an input is the file beside it whose name differs in the detector's name alone "
                        "(s_HAADF.dm4 and s_MAADF.dm4, X_ADF1_2.dm4 and X_ADF2_2.dm4; any case; dark-field "
                        "detectors), used where it is of the same scan (shape, calibration, exposure, columns on "
                        "the same pixels)")


def companions_from_args(args) -> dict:
    """The companion keyword arguments of :func:`stemfast.batch.run_batch` from parsed arguments
    (:func:`add_companion_options`); :class:`SettingsError` for a bad rule."""
    from pathlib import Path

    from ..batch.companions import parse_companion_name

    out: dict = {}
    if getattr(args, "companion_name", None) is not None:
        out["companion_name"] = parse_companion_name(args.companion_name)
    if getattr(args, "companion", None) is not None:
        out["companions"] = {Path(args.file): Path(args.companion)}
    if getattr(args, "no_companion", False):
        out["auto_companion"] = False
    return out


def parse_set(items: Sequence[str] | None) -> dict:
    """``["model.epochs=3", "sites.backend=numba"]`` -> ``{"model.epochs": 3, ...}`` (values parsed as TOML)."""
    from ..config import parse_toml

    out = {}
    for it in items or []:
        if "=" not in it:
            raise SettingsError(f"--set needs KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            val = parse_toml(f"v = {v}")["v"]
        except ValueError:  # tomllib.TOMLDecodeError: not a TOML value, taken as a string
            val = v
        out[k.strip()] = val
    return out


#: The options that are shortcuts of one setting each: argparse destination -> setting (``--set KEY``).
#: ``--train-patches`` is ``stemfast bench``'s.
SHORTCUTS = {"latent_dim": "model.latent_dim", "epochs": "model.epochs", "spacing": "sites.spacing",
             "material": "sites.material", "backend": "sites.backend", "train_patches": "model.max_train_patches"}


def overrides_from_args(args) -> dict:
    """The settings the options name: ``--set`` and the shortcuts (``--epochs``, ``--spacing``, ...,
    :data:`SHORTCUTS`; ``--plain-vae``), as dotted keys. A shortcut and a ``--set`` of the same setting
    with other values is a :class:`SettingsError` (neither would win silently)."""
    o: dict = parse_set(getattr(args, "set", []) or [])
    short: dict = {"model.model": ("--plain-vae", "vae")} if getattr(args, "plain_vae", False) else {}
    for dest, key in SHORTCUTS.items():
        v = getattr(args, dest, None)
        if v is not None and v != "":
            short[key] = ("--" + dest.replace("_", "-"), v)
    for key, (option, v) in short.items():
        if key in o and o[key] != v:
            raise SettingsError(f"--set {key}={o[key]!r} and {option} {v!r} disagree: give the setting once")
        o[key] = v
    return o


def config_from_args(args) -> object:
    """The checked ``PipelineConfig`` of parsed arguments (``--config`` < options); :class:`SettingsError`."""
    from ..config import load_config

    o = overrides_from_args(args)
    try:
        return load_config(getattr(args, "config", None), o)
    except SettingsError:
        raise
    except OSError as exc:  # a missing / unreadable --config file
        raise SettingsError(f"--config {describe_os_error(exc, getattr(args, 'config', None))}") from exc
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def _dotted_keys(d: dict, pre: str = "") -> set[str]:
    """Every key of the nested settings ``d`` as a dotted key, a table's own key included
    (``{"model": {"latent_dim": 4}}`` -> ``{"model", "model.latent_dim"}``)."""
    out: set[str] = set()
    for k, v in d.items():
        out.add(f"{pre}{k}")
        if isinstance(v, dict):
            out |= _dotted_keys(v, f"{pre}{k}.")
    return out


def typed_settings(args) -> set[str]:
    """The settings (dotted keys) the options set (:func:`overrides_from_args`), a TOML inline table of
    ``--set`` (``--set 'model={latent_dim=4}'``) read key by key as its dotted form is."""
    return _dotted_keys(overrides_from_args(args))


def settings_given(args) -> set[str]:
    """The settings (dotted keys, e.g. ``"model.epochs"``) the user set: in the ``--config`` file or by
    the options (:func:`typed_settings`) -- where a command's own fallback must not apply."""
    from ..config import METADATA_TABLES, read_toml_file

    given = typed_settings(args)
    path = getattr(args, "config", None)
    if path:
        try:
            data = read_toml_file(path)
        except (OSError, ValueError):  # reported by config_from_args
            data = {}
        given |= _dotted_keys({k: v for k, v in data.items() if k not in METADATA_TABLES})
    return given


def read_options_from_args(args) -> ReadOptions:
    """The :class:`~stemfast.config.ReadOptions` of parsed arguments (:func:`add_input_options`)."""
    return ReadOptions(fill_nonfinite=bool(getattr(args, "fill_nonfinite", False)),
                       max_nonfinite_fraction=getattr(args, "nonfinite_limit", DEFAULT_MAX_NONFINITE))


def exit_status_epilog() -> str:
    """The ``exit status`` paragraph of ``--help`` (from :data:`stemfast.errors.EXIT_CODES`)."""
    return "exit status:\n" + "\n".join(f"  {k:<4d} {v}" for k, v in EXIT_CODES.items())


def add_model_choice_arguments(p: argparse.ArgumentParser) -> None:
    """``--model FILE`` / ``--train`` / ``--finetune N``, one at most (which model; the default is the
    shipped pretrained model): a given model is used as it is, neither trained nor fine-tuned."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", metavar="MODEL.pt", default=None,
                   help="use this trained model as it is (default: the pretrained model shipped with stemfast)")
    g.add_argument("--train", action="store_true",
                   help="train a model on the inputs instead of using the shipped pretrained model")
    g.add_argument("--finetune", type=int, default=0, metavar="N",
                   help="adapt the shipped pretrained model to the inputs for N optimiser steps")


def start_encode_worker_early(args) -> None:
    """Start the encode worker (:mod:`stemfast.encode_worker`) first thing, before the pipeline is
    imported, for the model the options name: the shipped one, or a ``--model`` file; none with
    ``--train``, ``--finetune``, ``--scheduler``, ``--print-config``, nor for the shipped model on the
    compiled engine (``model.engine``). The run takes it or closes it."""
    if any(getattr(args, name, None) for name in ("train", "finetune", "scheduler", "print_config")):
        return
    from .. import encode_worker
    from ..model.engine import check_device

    try:
        config = config_from_args(args)
        check_device(config.model.device)
    except (SettingsError, ValueError):  # reported when the run reads its settings
        return
    device = config.model.device
    if getattr(args, "model", None):
        from functools import partial

        encode_worker.prestart_file(args.model, partial(_load_model_file, args.model), device)
    elif not _shipped_runs_compiled(config):
        encode_worker.prestart_shipped(device)


def _shipped_runs_compiled(config) -> bool:
    """Whether the run's settings put the shipped model on the compiled engine (no torch, no worker)."""
    from ..model.engine import engine_for

    try:
        return engine_for(config) == "compiled"
    except ValueError:  # reported when the run reads its settings
        return False


def _load_model_file(path: str):
    """The ``--model`` file's model, checked as the batch checks it (run in the worker)."""
    from ..batch.model_state import check_model_file

    return check_model_file(path)


def guarded(fn, args) -> int:
    """Run a command handler ``fn(args)``; an expected failure becomes its ``error: ...`` message and
    exit status (:func:`stemfast.errors.report_cli_error`), never a traceback. A bug is re-raised."""
    try:
        return fn(args)
    except BaseException as exc:  # noqa: BLE001 - every expected failure becomes a message and an exit status
        log.debug("%s failed", getattr(fn, "__name__", "command"), exc_info=True)
        code = report_cli_error(exc)
        if code is None:
            raise
        return code
