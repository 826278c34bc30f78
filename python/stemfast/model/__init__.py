"""Rotation-invariant patch model (STN + VAE) for site-centred STEM patches.

Public API: :class:`RVAE` (``fit`` / ``encode`` / ``save`` / ``load``), :class:`RVAEConfig`,
:class:`Encoding`. Building blocks: :mod:`.functional` (warps, masks, losses; states the angle
convention), :mod:`.modules` (``nn.Module`` s), :mod:`.training` (training loops).

The names are loaded on first use: ``RVAEConfig`` and ``Encoding`` (:mod:`.settings`) without
torch, ``RVAE`` with it -- so making or reading the settings never imports torch.
"""
from __future__ import annotations

import importlib
import typing

if typing.TYPE_CHECKING:
    from .api import RVAE
    from .settings import Encoding, RVAEConfig

__all__ = ["RVAE", "RVAEConfig", "Encoding"]

_WHERE = {"RVAE": ".api", "RVAEConfig": ".settings", "Encoding": ".settings"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))
