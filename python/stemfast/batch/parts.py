"""Frame-chunk parts of a stack analysed in pieces (Dask): ``OUT/<name>/.parts/frames_START_STOP.npz``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..config import ReadOptions
from .common import PARTS_DIR
from .frames import DriftEnds, FrameResult
from .inputs import InputEntry

__all__ = ["part_path", "part_key", "save_part", "json_default", "part_meta", "load_part", "load_drift_ends"]

#: the layout of a part: a part of another layout (an earlier version's) is not reused
PART_FORMAT = 2


def part_path(d: Path, start: int, stop: int) -> Path:
    """The file of the part of frames ``start:stop`` in the input folder ``d``."""
    return d / PARTS_DIR / f"frames_{start:06d}_{stop:06d}.npz"


def part_key(entry: InputEntry, start: int, stop: int, chash: str, model_sha: str | None,
             read_options: ReadOptions | None = None) -> dict:
    """What a part must match to be reused: input content (its companion's too, where one is used),
    frames, settings, model, version, read options (``--fill-nonfinite``)."""
    used = entry.companion is not None and entry.companion_used
    return {"sha256": entry.sha256, "start": start, "stop": stop, "config_hash": chash, "model_sha256": model_sha,
            "stemfast_version": __version__, "companion_sha256": entry.companion.sha256 if used else None,
            "read_options": ReadOptions.key_of(read_options), "part_format": PART_FORMAT}


def save_part(path: Path, results: list[FrameResult], key: dict, info: dict, ends: DriftEnds | None = None) -> None:
    """Write the frame results of a chunk (tables, records, top patches) and its drift ends (the drift
    views of its first and last frames with a lattice, :class:`~stemfast.batch.frames.DriftEnds`) into
    one ``.npz``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    drift = _drift_ends_arrays(ends or DriftEnds(), arrays)
    metas = []
    for k, r in enumerate(results):
        cols = []
        if r.table is not None:
            for c in r.table.names:
                a = np.asarray(r.table[c])
                if a.dtype.kind == "O":
                    a = a.astype(str)
                arrays[f"t{k}__{c}"] = a
                cols.append(c)
        if r.top_patches is not None:
            arrays[f"p{k}"] = np.asarray(r.top_patches)
        metas.append({"meta": r.meta, "columns": cols if r.table is not None else None,
                      # the table's own metadata (shape, lattice: the tracker reads the jumped scan-line
                      # bands there to link the sites where the lattice has them, as in one process)
                      "table_meta": getattr(r.table, "meta", None) or {} if r.table is not None else None,
                      "patches": r.top_patches is not None})
    arrays["__meta__"] = np.array(json.dumps({"key": key, "info": info, "frames": metas, "drift_ends": drift},
                                             default=json_default))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _drift_ends_arrays(ends: DriftEnds, arrays: dict) -> dict:
    """The JSON part of ``ends``; its drift views go into ``arrays`` (``drift_first``, ``drift_first_gap``, ...)."""
    out = {"has_lattice": bool(ends.has_lattice), "shape": list(ends.shape) if ends.shape else None}
    for name in ("first", "last"):
        end = getattr(ends, name)
        out[name] = None if end is None else int(end[0])
        if end is not None:
            arrays[f"drift_{name}"], arrays[f"drift_{name}_gap"] = np.asarray(end[1][0]), np.asarray(end[1][1])
    return out


def load_drift_ends(path: Path) -> DriftEnds:
    """The :class:`~stemfast.batch.frames.DriftEnds` of a part."""
    with np.load(path, allow_pickle=False) as z:
        d = json.loads(str(z["__meta__"]))["drift_ends"]
        ends = {name: None if d[name] is None else (int(d[name]), (z[f"drift_{name}"], z[f"drift_{name}_gap"]))
                for name in ("first", "last")}
    return DriftEnds(bool(d["has_lattice"]), ends["first"], ends["last"], tuple(d["shape"]) if d["shape"] else None)


def json_default(o):
    """JSON for NumPy scalars and arrays (anything else as its ``str``)."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def part_meta(path: Path) -> dict | None:
    """The key, input info and frame records of a part, or None when it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"]))
    except (OSError, ValueError, KeyError):
        return None


def load_part(path: Path) -> Iterator[FrameResult]:
    """The frame results of a part, in frame order."""
    from ..table import SiteTable

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        for k, fm in enumerate(meta["frames"]):
            table = None
            if fm["columns"] is not None:
                table = SiteTable({c: z[f"t{k}__{c}"] for c in fm["columns"]}, fm.get("table_meta") or {})
            pats = z[f"p{k}"] if fm["patches"] else None
            yield FrameResult(fm["meta"], table, pats)
