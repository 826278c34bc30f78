"""Rotation-invariant patch model (STN + VAE) for site-centred STEM patches.

Public API: :class:`RVAE` (``fit`` / ``encode`` / ``save`` / ``load``), :class:`RVAEConfig`,
:class:`Encoding`. Building blocks: :mod:`.functional` (warps, masks, losses; states the angle
convention), :mod:`.modules` (``nn.Module`` s), :mod:`.training` (training loops).
"""
from __future__ import annotations

from .api import RVAE, Encoding
from .training import RVAEConfig

__all__ = ["RVAE", "RVAEConfig", "Encoding"]
