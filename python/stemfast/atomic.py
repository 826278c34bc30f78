"""Atomic file output: write to a temporary file in the target directory, then ``os.replace``.

A reader never sees a half-written file, and an interrupted run leaves either the old file or
none -- so a rerun can trust every output file that exists.

:func:`staged_dir` does the same for a whole folder of outputs: they are written into a hidden
staging folder next to the target, which then replaces the target in one step (an atomic
exchange of the two folders where the system has one, ``renameat2(RENAME_EXCHANGE)`` on Linux;
else two renames, which :func:`recover_staged` completes or undoes after a crash). A failed or
interrupted write (disk full, Ctrl-C) leaves the previous folder as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_path", "atomic_open", "write_text", "write_json", "surrogates_shown", "staged_dir", "StagedDir", "swap_dir",
           "recover_staged"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> with atomic_path(os.path.join(d, "a.npy")) as tmp:
    ...     np.save(tmp, np.arange(3))
    >>> np.load(os.path.join(d, "a.npy")).tolist()
    [0, 1, 2]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes[-1:]), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` that commits the file atomically when the block exits without an exception."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogates_shown(text: str) -> str:
    """``text`` with each lone surrogate -- a byte of a file name that is not UTF-8 (``caf\\xe9.npy``
    from a Latin-1 share), which Python decodes as U+DC80-U+DCFF -- written as the text ``\\xNN`` of
    that byte (any other surrogate as U+FFFD), so it can be written as UTF-8.

    Examples
    --------
    >>> surrogates_shown("caf\\udce9.npy")
    'caf\\\\xE9.npy'
    """
    def one(m: re.Match) -> str:
        o = ord(m.group())
        return f"\\x{o - 0xDC00:02X}" if o >= 0xDC80 else "\ufffd"
    return _SURROGATE.sub(one, text)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8; a file name's undecodable byte as ``\\xNN``,
    :func:`surrogates_shown`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(surrogates_shown(text))


def write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically; NumPy scalars and arrays are converted."""
    write_text(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- folders

_STAGE_TAG = ".staging-"
_OLD_TAG = ".replaced-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_dir(stage: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put folder ``stage`` in place of ``target`` (replacing it as a whole) and delete the old one."""
    import shutil

    stage, target = Path(stage), Path(target)
    if not target.exists():
        os.rename(stage, target)
        return
    if _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # now holds the old content
        return
    old = target.parent / f".{target.name}{_OLD_TAG}{os.getpid()}"
    os.rename(target, old)
    os.rename(stage, target)
    shutil.rmtree(old, ignore_errors=True)


class StagedDir:
    """An empty hidden folder next to ``target`` that replaces ``target`` as a whole on
    :meth:`commit` or is removed on :meth:`discard` (``target`` then stays as it was): the two ends of
    :func:`staged_dir`, for a caller that finishes the folder later than it fills it.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()) / "res"
    >>> st = StagedDir(d)
    >>> _ = (st.path / "a.txt").write_text("new")
    >>> d.exists()
    False
    >>> st.commit()
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt']
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}{_STAGE_TAG}", dir=self.target.parent))
        os.chmod(self.path, 0o777 & ~_umask())

    def commit(self) -> None:
        """Put the staged folder in place of ``target`` (:func:`swap_dir`)."""
        swap_dir(self.path, self.target)

    def discard(self) -> None:
        """Remove the staged folder; ``target`` is left as it was."""
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder next to ``target``; on success it replaces ``target`` as a whole.

    On an exception (or Ctrl-C) the staging folder is removed and ``target`` is left as it was.

    Examples
    --------
    >>> import tempfile, os
    >>> d = Path(tempfile.mkdtemp()) / "res"
    >>> with staged_dir(d) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> sorted(p.name for p in d.iterdir())
    ['a.txt']
    """
    stage = StagedDir(target)
    try:
        yield stage.path
        stage.commit()
    except BaseException:
        stage.discard()
        raise


def recover_staged(folder: str | os.PathLike) -> list[str]:
    """Clean up after a crash inside ``folder``: remove staging folders, restore a replaced folder
    whose replacement never arrived. Returns what was done (for the log). Call it only while no
    other process writes into ``folder`` (the batch holds its lock)."""
    import shutil

    folder = Path(folder)
    done = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done
    for p in entries:
        name = p.name
        if name.startswith(".") and _OLD_TAG in name and p.is_dir():
            target = folder / name[1:name.index(_OLD_TAG)]
            if not target.exists():
                os.rename(p, target)
                done.append(f"restored {target.name}")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {name}")
        elif name.startswith(".") and _STAGE_TAG in name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {name}")
    return done
