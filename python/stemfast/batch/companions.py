"""A second detector of the same scan per input (``--companion``, ``--companion-name``).

A STEM scan is often recorded by two detectors at once (HAADF and MAADF: ``X_ADF1.dm4`` and
``X_ADF2.dm4``). The second image of an input, its *companion*, is read at the input's sites
(:func:`stemfast.sites.companion_intensity`) and the defect scores average the two images' local z
(:func:`stemfast.analysis.analyze_sites`; docs/RESULTS.md, "Two detectors of the same scan").

The companion is part of the input, not a setting: its content is in the input's fingerprint
(a changed, added or removed companion redoes the input), ``OUT/stemfast.toml`` lists it under
``[companions]`` next to the input checksums, and it does not change the settings hash.

Pairing
-------
- Explicitly, file by file: :class:`CompanionRule` ``explicit={input: companion}``
  (``stemfast analyze HAADF.dm4 --companion MAADF.dm4``).
- By the file name, ``MAIN=COMPANION`` (``--companion-name ADF1=ADF2``): the companion of an input
  whose name (without its last extension) contains ``MAIN`` is the file of the same folder, with
  the same extension, whose name has the last ``MAIN`` replaced by ``COMPANION`` (``X_ADF1.dm4`` ->
  ``X_ADF2.dm4``, ``1028_ADF1_11.dm4`` -> ``1028_ADF2_11.dm4``, ``s_haadf.tif`` -> ``s_maadf.tif`` with
  ``haadf=maadf``; case-sensitive). Files whose name contains ``COMPANION`` are companions, never
  inputs of their own; one whose input is not among the inputs is listed as skipped. An input
  containing ``MAIN`` whose companion does not exist is analysed alone, with a warning
  (``summary.json``: ``detectors`` 1). Files containing neither are analysed alone, without one.
  An empty ``MAIN`` (``=_maadf``) appends ``COMPANION`` to every input's name (``X`` -> ``X_maadf``).

Only 2-D images have companions: an input that is a stack, or a companion that is one or has another
shape than its input, is skipped with the reason (a frame-by-frame pairing of two stacks is not
supported).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import ReadOptions
from ..errors import SettingsError
from .inputs import CompanionFile, InputEntry, read_failure_reason, read_input

__all__ = ["CompanionRule", "CompanionError", "parse_companion_name", "pair_companions", "companion_refusal",
           "read_companion", "companion_notes"]

log = logging.getLogger("stemfast.batch")


class CompanionError(ValueError):
    """An input's companion cannot be used (unreadable, a stack, another shape): the input is skipped."""


def parse_companion_name(spec: str) -> tuple[str, str]:
    """``"ADF1=ADF2"`` -> ``("ADF1", "ADF2")``; :class:`~stemfast.errors.SettingsError` when it is not a
    usable rule (see the module docstring).

    Examples
    --------
    >>> parse_companion_name("_ADF1=_ADF2"), parse_companion_name("=_maadf")
    (('_ADF1', '_ADF2'), ('', '_maadf'))
    """
    main, sep, comp = str(spec).partition("=")
    if not sep or not comp:
        raise SettingsError(f"--companion-name needs MAIN=COMPANION (e.g. ADF1=ADF2 pairs X_ADF1.dm4 with "
                            f"X_ADF2.dm4), got {spec!r}")
    for part in (main, comp):
        if "/" in part or "\\" in part or "." in part:
            raise SettingsError(f"--companion-name {spec!r}: parts of a file name without its extension, "
                                "not paths or extensions")
    if main and (main in comp or comp in main):
        raise SettingsError(f"--companion-name {spec!r}: neither part may contain the other (a file name "
                            "could match both)")
    return main, comp


@dataclass(frozen=True)
class CompanionRule:
    """How the batch's inputs find their companions: ``explicit`` {input path: companion path} and/or
    ``name`` (``MAIN``, ``COMPANION``); see the module docstring."""

    name: tuple[str, str] | None = None
    explicit: Mapping = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.name or self.explicit)

    def describe(self) -> str:
        if self.name:
            return f"--companion-name {self.name[0]}={self.name[1]}"
        return "--companion"


def _key(p: Path) -> Path:
    return Path(p).resolve()


def _companion_of(path: Path, main: str, comp: str) -> Path | None:
    """The companion the rule names for an input (None when its name does not contain ``main``)."""
    stem = path.stem
    if not main:
        return path.with_name(stem + comp + path.suffix)
    i = stem.rfind(main)
    return None if i < 0 else path.with_name(stem[:i] + comp + stem[i + len(main):] + path.suffix)


def _input_of(path: Path, main: str, comp: str) -> Path | None:
    """The input a companion belongs to (None when its name does not contain ``comp``)."""
    stem = path.stem
    if not main:
        return path.with_name(stem[:-len(comp)] + path.suffix) if stem.endswith(comp) else None
    i = stem.rfind(comp)
    return None if i < 0 else path.with_name(stem[:i] + main + stem[i + len(comp):] + path.suffix)


def pair_companions(entries: list[InputEntry], rule: CompanionRule | None,
                    problems: list[tuple[Path, str]]) -> list[InputEntry]:
    """Give the inputs their companions (``entry.companion`` / ``entry.companion_missing``) by ``rule``;
    returns the inputs without the companion files. A companion whose main file is not an input is
    appended to ``problems`` (listed as skipped)."""
    if rule is None or not rule.active:
        return entries
    explicit = {_key(k): Path(v) for k, v in (rule.explicit or {}).items()}
    taken = {_key(v) for v in explicit.values()}
    main_keys = {_key(e.path) for e in entries}
    kept: list[InputEntry] = []
    for e in entries:
        k = _key(e.path)
        own = _input_of(e.path, *rule.name) if rule.name else None
        if k in explicit:
            e.companion = CompanionFile(explicit[k])
        elif own is not None:  # a companion itself
            if _key(own) not in main_keys:
                problems.append((e.path, f"a companion file ({rule.describe()}) without its input {own.name}: "
                                         "not analysed"))
            continue
        elif k in taken:  # given as the companion of another input
            continue
        elif rule.name and (comp := _companion_of(e.path, *rule.name)) is not None:
            if comp.is_file():
                e.companion = CompanionFile(comp)
            else:
                e.companion_missing = str(comp)
        kept.append(e)
    return kept


def companion_refusal(entry: InputEntry, n_frames: int) -> str | None:
    """Why the input cannot have its companion (it is a stack), or None."""
    if entry.companion is None or n_frames <= 1:
        return None
    return (f"a companion image (second detector, {entry.companion.path.name}) is supported for 2-D images only; "
            f"this input is a stack of {n_frames} frames (analyse it without the companion)")


def read_companion(entry: InputEntry, mg, read_options: ReadOptions | None = None) -> np.ndarray | None:
    """The companion image of ``entry`` (read with the batch's read options), checked against the input
    ``mg`` (2-D, same shape); None without one. Raises :class:`CompanionError` with the reason."""
    if entry.companion is None:
        return None
    from .frames import count_frames

    why = companion_refusal(entry, count_frames(mg))
    if why:
        raise CompanionError(why)
    path = entry.companion.path
    try:
        cm = read_input(path, read_options)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the companion's reason
        raise CompanionError(f"companion {path}: {read_failure_reason(exc)}") from None
    if getattr(cm, "is_stack", False):
        raise CompanionError(f"companion {path} is a stack of {getattr(cm, 'n_frames', '?')} frames; "
                             "a companion must be one 2-D image like its input")
    img = np.asarray(cm.data)
    want = tuple(np.shape(mg.data))
    if img.shape != want:
        raise CompanionError(f"companion {path} has shape {img.shape[0]} x {img.shape[1]}, the input "
                             f"{want[0]} x {want[1]}: not two detectors of the same scan")
    return img


def companion_notes(entry: InputEntry) -> list[str]:
    """The warning of an input whose companion the pairing rule expected but did not find (else none)."""
    if entry.companion is None and entry.companion_missing is not None:
        return [f"no companion image: {entry.companion_missing} (the second detector the pairing rule expects) "
                "does not exist; analysed with this image alone (detectors 1)"]
    return []
