"""The run configuration as TOML: load (with validation), write, and the resolved ``stemfast.toml``.

Layout (every key optional; missing keys keep their defaults)::

    patch_size = 33            # top level; omit for "derived from the lattice spacing"

    [sites]                    # stemfast.sites.SiteSettings
    spacing = 12.5
    backend = "cpp"

    [sites.lattice]            # stemfast.lattice.LatticeSettings
    max_rms = 0.12

    [model]                    # stemfast.model.RVAEConfig
    epochs = 40
    latent_dim = 4

    [analysis]                 # stemfast.analysis.AnalysisSettings
    n_classes = 3

    [tracking]                 # stemfast.tracking.TrackSettings
    max_gap = 2

TOML has no ``null``: a setting whose value is ``None`` (e.g. ``spacing``, meaning *estimate it*)
is left out when ``None`` is its default (:func:`dump_config` writes it as a comment), and
written as the string ``"none"`` when it is not (``n_classes = "none"``: choose k automatically);
every setting that may be ``None`` accepts ``"none"``. The resolved file written next
to the results (:func:`write_resolved_config`) adds a ``[stemfast]`` table (version, date,
config hash), an ``[inputs]`` table (file -> sha256) and, when inputs have a second detector's
image of the same scan, a ``[companions]`` table; :func:`load_config` ignores those tables, so a
results folder's ``stemfast.toml`` can be passed back as ``--config``.

Values are validated against the type annotations of the frozen settings dataclasses (ints,
floats, bools, strings, ``Literal`` choices, tuples, ``X | None``) and then by the dataclasses'
own ``__post_init__`` checks, which include the ranges of :data:`stemfast.limits.SETTING_LIMITS` (defined
there once, re-exported here); an unknown key is an error that names the key and the valid ones.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from .backend import env_backend
from .errors import SettingsError
from .limits import MAX_CLASSES, MAX_SPACING_PX, SETTING_LIMITS, check_setting

if typing.TYPE_CHECKING:  # the sections of PipelineConfig (imported when a default is made)
    from .analysis import AnalysisSettings
    from .model.settings import RVAEConfig
    from .sites import SiteSettings
    from .tracking import TrackSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "PipelineConfig",
    "parse_toml",
    "ReadOptions",
    "DEFAULT_MAX_NONFINITE",
    "DEFAULT_TRAIN_INPUTS",
    "DEFAULT_TRAIN_FRAMES",
    "load_config",
    "dump_config",
    "write_resolved_config",
    "input_table",
    "config_to_dict",
    "config_hash",
    "pinned_backend",
    "RESULT_NEUTRAL_SETTINGS",
    "neutral_settings",
    "file_sha256",
    "apply_overrides",
    "check_environment",
    "METADATA_TABLES",
    "NONE_STRING",
    "SETTING_LIMITS",
    "MAX_CLASSES",
    "MAX_SPACING_PX",
    "check_limits",
    "read_toml_file",
]


def parse_toml(text: str) -> dict:
    """``text`` parsed as TOML (``tomllib``; ``tomli`` on Python 3.10). Raises ``tomllib.TOMLDecodeError``
    (a ValueError) when it is not TOML.

    Examples
    --------
    >>> parse_toml("a = 1")
    {'a': 1}
    """
    return tomllib.loads(text)


#: Top-level tables of a resolved ``stemfast.toml`` that are metadata, not settings (``run``: how the
#: run read its inputs, paired companions and chose its model -- options, not settings).
METADATA_TABLES = ("stemfast", "inputs", "companions", "run")

#: How ``None`` is written for a setting whose default is not ``None`` (TOML has no null);
#: accepted (any case) by every setting that can be ``None``.
NONE_STRING = "none"

_SECTIONS = ("sites", "model", "analysis", "tracking")
_TOP_KEYS = ("patch_size",)

# ----------------------------------------------------------------------------- reading options

#: Largest fraction of non-finite pixels ``--fill-nonfinite`` fills by default (1 %).
DEFAULT_MAX_NONFINITE = 0.01

#: A batch's training sample by default: inputs sampled (``--train-inputs``) and frames per stack
#: (``--train-frames``) -- options, not settings (:func:`stemfast.batch.model_state.same_sample`).
DEFAULT_TRAIN_INPUTS = 16
DEFAULT_TRAIN_FRAMES = 4


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How micrographs are read: non-finite pixels filled (up to a fraction of each frame) or refused.

    Examples
    --------
    >>> ReadOptions(fill_nonfinite=True).as_read_kwargs()
    {'allow_nonfinite': True, 'max_nonfinite_fraction': 0.01}
    """

    fill_nonfinite: bool = False
    max_nonfinite_fraction: float = DEFAULT_MAX_NONFINITE

    def __post_init__(self) -> None:
        f = self.max_nonfinite_fraction
        if not (isinstance(f, (int, float)) and math.isfinite(f) and 0.0 < f <= 0.5):
            raise SettingsError(f"--nonfinite-limit must be a fraction in (0, 0.5], got {f!r}")

    def as_read_kwargs(self) -> dict:
        """Keyword arguments of :func:`stemfast.io.read`."""
        if not self.fill_nonfinite:
            return {}
        return {"allow_nonfinite": True, "max_nonfinite_fraction": float(self.max_nonfinite_fraction)}

    def key(self) -> dict:
        """What a cached read failure depends on."""
        return {"fill_nonfinite": self.fill_nonfinite,
                "max_nonfinite_fraction": self.max_nonfinite_fraction if self.fill_nonfinite else None}

    @staticmethod
    def key_of(options: "ReadOptions | None") -> dict:
        """:meth:`key` of ``options``, the defaults' where None (as the batch takes no options)."""
        return (options or ReadOptions()).key()


# ----------------------------------------------------------------------------- loading


def _sites_default():
    from .sites import SiteSettings

    return SiteSettings()


def _model_default():
    from .model.settings import RVAEConfig

    return RVAEConfig()


def _analysis_default():
    from .analysis import AnalysisSettings

    return AnalysisSettings()


def _tracking_default():
    from .tracking import TrackSettings

    return TrackSettings()


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """All settings of a run, one section per stage (also the layout of ``stemfast.toml``).

    The sections are the settings dataclasses of their stages (imported when a default is made,
    so this module stays light): ``sites`` :class:`stemfast.sites.SiteSettings`, ``model``
    :class:`stemfast.model.RVAEConfig`, ``analysis`` :class:`stemfast.analysis.AnalysisSettings`,
    ``tracking`` :class:`stemfast.tracking.TrackSettings`; ``patch_size`` in px (None: derived
    from the lattice spacing, :func:`stemfast.patches.default_patch_size`).

    Examples
    --------
    >>> PipelineConfig().patch_size is None
    True
    """

    sites: SiteSettings = dataclasses.field(default_factory=_sites_default)
    model: RVAEConfig = dataclasses.field(default_factory=_model_default)
    analysis: AnalysisSettings = dataclasses.field(default_factory=_analysis_default)
    patch_size: int | None = None
    tracking: TrackSettings = dataclasses.field(default_factory=_tracking_default)

    def to_dict(self) -> dict:
        return {"sites": dataclasses.asdict(self.sites), "model": dataclasses.asdict(self.model),
                "analysis": dataclasses.asdict(self.analysis), "patch_size": self.patch_size,
                "tracking": dataclasses.asdict(self.tracking)}


def _default_config():
    return PipelineConfig()


def _nest(flat: Mapping[str, Any]) -> dict:
    """``{"model.epochs": 2, "sites": {"spacing": 9}}`` -> nested dicts (dotted keys split)."""
    out: dict = {}
    for key, value in flat.items():
        parts = str(key).split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise SettingsError(f"override {key!r}: {p!r} is a value, not a section")
            d = nxt
        leaf = parts[-1]
        if isinstance(value, Mapping):
            existing = d.setdefault(leaf, {})
            if not isinstance(existing, dict):
                raise SettingsError(f"override {key!r}: conflicting value and section")
            _deep_merge(existing, _nest(value))
        else:
            d[leaf] = value
    return out


def _deep_merge(base: dict, new: Mapping) -> dict:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        elif isinstance(v, Mapping):
            base[k] = _deep_merge({}, v)
        else:
            base[k] = v
    return base


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _coerce(value, tp, where: str):
    """Check / convert one value to the annotated type ``tp`` (strict: no str -> number parsing)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() == NONE_STRING and type(None) in args):
            if type(None) in args:
                return None
            raise SettingsError(f"{where}: None is not allowed (expected {_type_name(tp)})")
        errors = []
        # exact type matches first, so that e.g. int | float keeps an int
        ordered = sorted((a for a in args if a is not type(None)),
                         key=lambda a: 0 if isinstance(a, type) and type(value) is a else 1)
        for a in ordered:
            try:
                return _coerce(value, a, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise SettingsError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise SettingsError(f"{where}: expected one of {list(choices)}, got {value!r}")
    if value is None:
        raise SettingsError(f"{where}: None is not allowed (expected {_type_name(tp)})")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise SettingsError(f"{where}: expected an array ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis) or not args:
            el = args[0] if args else Any
            items = [_coerce(v, el, f"{where}[{i}]") for i, v in enumerate(value)]
        else:
            if len(value) != len(args):
                raise SettingsError(f"{where}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise SettingsError(f"{where}: expected a table ([{where}]), got {value!r}")
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, (bool,)):
            return value
        try:
            import numpy as np

            if isinstance(value, np.bool_):
                return bool(value)
        except ImportError:  # pragma: no cover
            pass
        raise SettingsError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if hasattr(value, "__index__"):  # numpy integers
            return int(value.__index__())
        raise SettingsError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise SettingsError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)) or hasattr(value, "__float__") and not isinstance(value, str):
            return float(value)
        raise SettingsError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise SettingsError(f"{where}: expected a string, got {value!r}")
    return value  # unknown annotation: leave it to the dataclass


def _build(cls, data: Mapping, where: str, base=None):
    """Instance of dataclass ``cls`` from ``base`` (or defaults) with the keys of ``data`` replaced."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise SettingsError(
            f"unknown key {where + '.' if where else ''}{unknown[0]!s} in the configuration"
            f"{' (also: ' + ', '.join(map(str, unknown[1:])) + ')' if len(unknown) > 1 else ''}; "
            f"valid keys of [{where}]: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if base is not None:
            cur = getattr(base, name)
        else:
            cur = dataclasses.MISSING
        if name in data:
            tp = hints.get(name, Any)
            val = data[name]
            if dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(val, Mapping):
                val = _build(tp, val, f"{where}.{name}", base=cur if cur is not dataclasses.MISSING else None)
            else:
                val = _coerce(val, tp, f"{where}.{name}")
                _check_value(val, f"{where}.{name}", _field_default(cls, name))
            kwargs[name] = val
        elif cur is not dataclasses.MISSING:
            kwargs[name] = cur
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"invalid [{where}] settings: {exc}") from exc


def _field_default(cls, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def _not_finite(v) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def _check_value(val, where: str, default=None) -> None:
    """Finite numbers (unless the default is not finite; NaN never) and :data:`SETTING_LIMITS`."""
    items = val if isinstance(val, (list, tuple)) else [val]
    dflt = default if isinstance(default, (list, tuple)) else [default]
    for v in items:
        if _not_finite(v) and (math.isnan(v) or not any(_not_finite(d) for d in dflt)):
            raise SettingsError(f"{where} must be a finite number, got {v!r}")
    check_setting(val, where)


def check_limits(config) -> None:
    """Check every setting of a ``PipelineConfig`` against :data:`SETTING_LIMITS` and the finite rule.

    (:func:`load_config` and :func:`apply_overrides` check what they set; this checks a config built
    in Python, whose settings classes checked the ranges when they were made but not the finite rule,
    nor ``patch_size``.) The settings the environment gives are checked too (:func:`check_environment`).
    """
    check_environment()
    d = config_to_dict(config)
    defaults = config_to_dict(_default_config())

    def walk(node, dnode, where):
        for k, v in node.items():
            w = f"{where}.{k}" if where else str(k)
            dv = dnode.get(k) if isinstance(dnode, Mapping) else None
            if isinstance(v, Mapping):
                walk(v, dv or {}, w)
            else:
                _check_value(v, w, dv)

    walk(d, defaults, "")


def check_environment() -> None:
    """Check the settings the environment gives: ``$STEMFAST_BACKEND`` (:func:`stemfast.backend.env_backend`;
    a :class:`SettingsError` naming the variable and its value). :func:`load_config` and :func:`check_limits`
    call it, so a bad value is refused with the other settings, before any work -- also where
    ``sites.backend`` is set (every kernel call of a run is given that setting, but a function of the
    package called without ``backend=`` reads the variable)."""
    env_backend()


def apply_overrides(config, data: Mapping) -> Any:
    """A new ``PipelineConfig`` with the (nested or dotted-key) settings in ``data`` applied."""
    data = _nest(data)
    unknown = [k for k in data if k not in _SECTIONS + _TOP_KEYS]
    if unknown:
        raise SettingsError(
            f"unknown key {unknown[0]!s} in the configuration; valid top-level keys: "
            f"{', '.join(_TOP_KEYS)} and the sections {', '.join('[' + s + ']' for s in _SECTIONS)}"
        )
    kwargs = {}
    for sec in _SECTIONS:
        cur = getattr(config, sec)
        if sec in data:
            if not isinstance(data[sec], Mapping):
                raise SettingsError(f"[{sec}] must be a table, got {data[sec]!r}")
            kwargs[sec] = _build(type(cur), data[sec], sec, base=cur)
        else:
            kwargs[sec] = cur
    patch_size = config.patch_size
    if "patch_size" in data:
        patch_size = _coerce(data["patch_size"], int | None, "patch_size")
        if patch_size is not None and patch_size < 3:
            raise SettingsError(f"patch_size must be >= 3 px, got {patch_size}")
        _check_value(patch_size, "patch_size")
    return PipelineConfig(**kwargs, patch_size=patch_size)


def read_toml_file(path: Path) -> dict:
    """The TOML file ``path`` (UTF-8; a leading byte-order mark, as Windows editors write, is skipped).
    A file that is not UTF-8 text or not TOML is a :class:`SettingsError` naming it; a missing or
    unreadable one an ``OSError``."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not a UTF-8 text file (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                            "a settings file is TOML saved as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: str | os.PathLike | None = None, overrides: Mapping | None = None):
    """The run configuration: defaults < TOML file ``path`` < ``overrides``.

    Parameters
    ----------
    path : TOML file (``None``: defaults only). ``[stemfast]`` and ``[inputs]`` tables (written by
        :func:`write_resolved_config`) are ignored.
    overrides : settings applied on top, as nested dicts (``{"model": {"epochs": 2}}``) or dotted
        keys (``{"model.epochs": 2, "sites.lattice.max_rms": 0.1}``).

    Returns
    -------
    PipelineConfig

    Raises
    ------
    ValueError
        On an unknown key (the message names it and lists the valid keys), a value of the wrong
        type, or a value the settings reject; also a ``$STEMFAST_BACKEND`` that names no backend
        (:func:`check_environment`).
    FileNotFoundError
        When ``path`` does not exist.

    Examples
    --------
    >>> cfg = load_config(None, {"model.epochs": 3, "sites": {"spacing": 9.5}})
    >>> cfg.model.epochs, cfg.sites.spacing
    (3, 9.5)
    """
    config = _default_config()
    if path is not None:
        p = Path(path)
        data = {k: v for k, v in read_toml_file(p).items() if k not in METADATA_TABLES}
        try:
            config = apply_overrides(config, data)
        except ValueError as exc:
            raise SettingsError(f"{p}: {exc}") from exc
    if overrides:
        config = apply_overrides(config, overrides)
    check_environment()
    return config


# ----------------------------------------------------------------------------- writing

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    """``s`` as a TOML basic string; a lone surrogate (a file name's byte that is not UTF-8) is
    written as the text ``\\xNN`` of its byte (:func:`stemfast.atomic.surrogates_shown`; TOML strings
    hold only Unicode scalar values), so such a name is shown, not a crash."""
    from .atomic import surrogates_shown

    out = ['"']
    for ch in s:
        o = ord(ch)
        if 0xD800 <= o <= 0xDFFF:
            out.append(surrogates_shown(ch).replace("\\", "\\\\"))
        elif ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k) -> str:
    k = str(k)
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_value(v, where: str) -> str:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, Path):
        return _toml_str(str(v))
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        if any(x is None for x in v):
            raise ValueError(f"{where}: TOML arrays cannot hold None")
        return "[" + ", ".join(_toml_value(x, where) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{_toml_key(k)} = {_toml_value(x, where)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ValueError(f"{where}: cannot write a {type(v).__name__} as TOML")


def _as_table(obj) -> dict:
    """Dataclass -> dict keeping nested dataclasses as dicts (field order kept)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _as_table(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return obj


def _write_table(lines: list[str], name: str, table: Mapping, comments: Mapping | None = None,
                 defaults: Mapping | None = None) -> None:
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
    subtables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    if name:
        lines.append("")
        if comments and comments.get(name):
            lines.append(f"# {comments[name]}")
        lines.append(f"[{name}]")
    for k, v in scalars:
        if v is None:
            if defaults is not None and k in defaults and defaults[k] is not None:
                # the default is not None: the omission would not round-trip, so spell it out
                lines.append(f"{_toml_key(k)} = {_toml_str(NONE_STRING)}  # None (TOML has no null)")
            else:
                lines.append(f"# {_toml_key(k)} is not set (None: automatic / default behaviour)")
        else:
            lines.append(f"{_toml_key(k)} = {_toml_value(v, f'{name}.{k}' if name else str(k))}")
    for k, v in subtables:
        sub_def = defaults.get(k) if isinstance(defaults, Mapping) and isinstance(defaults.get(k), Mapping) else None
        _write_table(lines, f"{name}.{_toml_key(k)}" if name else _toml_key(k), v, comments, sub_def)


_SECTION_COMMENTS = {
    "sites": "lattice front end: stemfast.sites.SiteSettings",
    "sites.lattice": "local lattice fit and fill-in: stemfast.lattice.LatticeSettings",
    "model": "patch model: stemfast.model.RVAEConfig",
    "analysis": "classes and defect scores: stemfast.analysis.AnalysisSettings",
    "tracking": "defects linked through the frames of a stack: stemfast.tracking.TrackSettings",
}


def config_to_dict(config) -> dict:
    """``PipelineConfig`` -> plain nested dict (tuples kept), in the TOML layout."""
    return {"patch_size": config.patch_size, **{s: _as_table(getattr(config, s)) for s in _SECTIONS}}


def dump_config(config, *, extra: Mapping | None = None, header: str | None = None) -> str:
    """TOML text of ``config`` (a ``PipelineConfig``), readable back by :func:`load_config`.

    Parameters
    ----------
    config : PipelineConfig
    extra : additional top-level entries: scalars are written at the top, tables (dicts) after the
        settings, e.g. ``{"stemfast": {"version": "0.1.0"}, "inputs": {"a.tif": "<sha256>"}}``.
    header : comment lines put at the top of the file.

    Notes
    -----
    ``None`` values are left out (TOML has no null) and written as a comment, or written as
    ``"none"`` where the default is not ``None`` (so the file reads back the same); tuples become
    arrays; nested dataclasses become sub-tables (``[sites.lattice]``).

    Examples
    --------
    >>> text = dump_config(load_config(None, {"model.epochs": 2}))
    >>> load_config_text = __import__("tomllib").loads(text)
    >>> load_config_text["model"]["epochs"]
    2
    """
    extra = dict(extra or {})
    lines: list[str] = []
    for h in (header or "stemfast run configuration").splitlines():
        lines.append(f"# {h}" if h else "#")
    d = config_to_dict(config)
    top = {k: v for k, v in extra.items() if not isinstance(v, Mapping)}
    clash = set(top) & set(d)
    if clash:
        raise ValueError(f"extra entries clash with settings: {sorted(clash)}")
    try:
        defaults = config_to_dict(type(config)())
    except Exception:  # noqa: BLE001 - a config type without defaults: write None as comments
        defaults = {}
    _write_table(lines, "", {"patch_size": d["patch_size"], **top}, defaults=defaults)
    for sec in _SECTIONS:
        _write_table(lines, sec, d[sec], _SECTION_COMMENTS, defaults.get(sec))
    for k, v in extra.items():
        if isinstance(v, Mapping):
            if k in d:
                raise ValueError(f"extra table [{k}] clashes with a settings section")
            _write_table(lines, _toml_key(k), v)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- hashing / resolved file


def _canonical(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj


#: The settings that change no result, only how a run goes: dotted key -> why (measured: the default batch of
#: ``data/real/mos2_vdoped`` and of ``wse2_ti`` with each at several values wrote byte-identical sites.csv,
#: tracks and figures). :func:`config_hash` -- the settings in a batch's resume key -- reads them at their
#: defaults, so a rerun that changes only these reuses the results; ``stemfast.toml`` records them like every
#: setting, and each input's ``summary.json`` the values its results were made with (``neutral_settings``).
RESULT_NEUTRAL_SETTINGS = {
    "model.num_threads": "torch's threads: encoding splits the patches into sub-batches by them, one intra-op "
                         "thread each, and every split gives the same bits (1, 2, 4, 8 threads; torch and compiled "
                         "engine, shipped, given and fine-tuned models). Training's weights do depend on them, "
                         "but the resume key holds the model's SHA-256 and a trained model is reused with the "
                         "results: the results follow the model file (None already lets the machine choose)",
    "model.progress": "the progress bar of training alone (the trained weights are the same bits)",
}


def neutral_settings(config) -> dict:
    """The values of :data:`RESULT_NEUTRAL_SETTINGS` in ``config`` (dotted key -> value).

    Examples
    --------
    >>> neutral_settings(load_config(None, {"model.num_threads": 4}))
    {'model.num_threads': 4, 'model.progress': None}
    """
    out = {}
    for key in RESULT_NEUTRAL_SETTINGS:
        obj = config
        for part in key.split("."):
            obj = getattr(obj, part)
        out[key] = obj
    return out


def _results_dict(config) -> dict:
    """:func:`config_to_dict` with the :data:`RESULT_NEUTRAL_SETTINGS` at their defaults (what the results
    depend on: a configuration that leaves them at their defaults hashes as before they were left out)."""
    d = config_to_dict(config)
    for key in RESULT_NEUTRAL_SETTINGS:
        *sections, leaf = key.split(".")
        node, obj = d, config
        for sec in sections:
            node, obj = node[sec], getattr(obj, sec)
        node[leaf] = _field_default(type(obj), leaf)
    d["sites"]["backend"] = _backend_key(config)
    return d


def pinned_backend(config, *, resolve: bool = False):
    """``config`` with ``sites.backend`` set to the kernels it runs on where the setting leaves them open:
    ``$STEMFAST_BACKEND`` when set, else (``resolve``) the fastest that imports here, else unchanged. Its
    :func:`config_hash` is the same; what changes is that the run's record (``stemfast.toml``) names the
    kernels the environment chose, and processes that read another environment (Dask workers) run the
    kernels the hash stands for.

    Examples
    --------
    >>> pinned_backend(load_config(None, {"sites.backend": "numpy"})).sites.backend
    'numpy'
    """
    from .backend import resolve_backend

    if config.sites.backend is not None:
        return config
    name = env_backend() or (resolve_backend(None) if resolve else None)
    if name is None:
        return config
    return dataclasses.replace(config, sites=dataclasses.replace(config.sites, backend=name.lower()))


def _backend_key(config) -> str | None:
    """The kernel backend a run of ``config`` uses, as :func:`config_hash` reads it (:func:`pinned_backend`:
    the setting, else ``$STEMFAST_BACKEND``, else the fastest that imports here). Backends agree to a
    tolerance, not bit for bit, so the one that runs is part of what the results depend on, whichever
    way it was chosen; the compiled one (the default where it imports) reads as the unset setting, so the
    hash of a run that leaves the backend alone is what it was before the variable was counted."""
    from .backend import BACKENDS

    name = pinned_backend(config, resolve=True).sites.backend.lower()
    return None if name == BACKENDS[0] else name


def config_hash(config) -> str:
    """Short, stable hash (16 hex digits) of every setting of ``config`` that can change a result (all
    but :data:`RESULT_NEUTRAL_SETTINGS`, which it reads at their defaults), with the kernel backend the
    run resolves to (the setting, else ``$STEMFAST_BACKEND``, else the fastest available).

    Two configurations with the same hash give the same results (same version of stemfast and model):
    the settings part of a batch's resume key.

    Examples
    --------
    >>> config_hash(load_config(None, {"model.num_threads": 4})) == config_hash(load_config(None))
    True
    >>> config_hash(load_config(None, {"model.seed": 1})) == config_hash(load_config(None))
    False
    """
    text = json.dumps(_canonical(_results_dict(config)), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _input_keys(inputs: Iterable[Path]) -> list[str]:
    paths = [Path(p) for p in inputs]
    names = [p.name for p in paths]
    dup = {n for n in names if names.count(n) > 1}
    return [str(p) if p.name in dup else p.name for p in paths]


def input_table(inputs: list[Path], checksums: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``[inputs]`` table of :func:`write_resolved_config`: input file name (its path where two
    share a name) -> sha256, taken from ``checksums`` (keyed by ``str(path)``) where known."""
    checksums = dict(checksums or {})
    return {key: checksums.get(str(p)) or file_sha256(p) for key, p in zip(_input_keys(inputs), inputs)}


def write_resolved_config(path: str | os.PathLike, config, *, inputs: list[Path],
                          checksums: Mapping[str, str] | None = None,
                          companions: Mapping[str, Mapping] | None = None,
                          run: Mapping | None = None) -> str:
    """Write the resolved settings of a run (``OUT/stemfast.toml``) atomically; return the text.

    The file holds every setting (defaults included), a ``[stemfast]`` table (version, date,
    config hash) and an ``[inputs]`` table of input file name -> sha256 (computed in chunks, or
    taken from ``checksums`` keyed by ``str(path)`` when already known); ``companions``
    (``str(path)`` -> ``{file, sha256}``: a second detector's image of the same scan, part of the
    input, not a setting) becomes a ``[companions]`` table under the same input names.
    ``run`` (the options of the run that are not settings: ``{"options": [...], ...}``) becomes a
    ``[run]`` table, and the header's hint names those options to repeat. :func:`load_config`
    ignores all four tables (:data:`METADATA_TABLES`).
    """
    from . import __version__
    from .atomic import write_text

    table = input_table(inputs, checksums)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    extra = {
        "stemfast": {"version": __version__, "date": now.isoformat(), "config_hash": config_hash(config)},
        "inputs": table,
    }
    if companions:
        extra["companions"] = {key: dict(companions[str(p)]) for key, p in zip(_input_keys(inputs), inputs)
                               if str(p) in companions}
    if run:
        extra["run"] = dict(run)
    again = " ".join(["python -m stemfast batch DIR --config stemfast.toml", *(run or {}).get("options", [])])
    text = dump_config(config, extra=extra, header=(
        "stemfast: resolved settings of this run (every setting, defaults included).\n"
        f"Reuse with: {again}\n"
        "([run] records the options above, which are not settings: --config does not read it)"))
    write_text(path, text)
    return text
