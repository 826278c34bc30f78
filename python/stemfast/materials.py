"""The materials stemfast knows: 2H transition-metal dichalcogenide monolayers.

A 2H monolayer (MoS2, WS2, MoSe2, WSe2, ...) seen along c has three kinds of site on **one
triangular lattice** of spacing ``a / sqrt(3)`` (``a`` = the metal-metal distance, the in-plane
lattice constant): the metal columns, the chalcogen-pair columns (two chalcogen atoms on top of
each other) and the empty hexagon centres ("hollow"). The metal sites alone form a triangular
lattice of spacing ``a``; so do the chalcogen sites and the hollow sites. In HAADF a column's
intensity grows as ``Z^n`` of its atoms (``n`` ~ 1.7, :data:`HAADF_Z_EXPONENT`): the metal is the
brightest on MoS2, WS2 and WSe2 (an S2 pair ~0.4 of Mo, a Se2 pair ~0.5 of W), the Se2 pair on
MoSe2 (~1.4 times Mo); the hollow is the background. Metal and chalcogen sites differ only in
brightness, so which is which is read from it (:func:`brightness_order`), in the order the material
gives in HAADF (:attr:`Material.chalcogen_brighter_haadf`); at lower detector angles a Se2 pair can
outshine the W too (``sites.chalcogen_brighter`` says so).

The material fixes two things: the geometry (what the site lattice is, whatever peaks stand out)
and the names (``vacancy_Se`` on WSe2, never ``vacancy_S``).

Sublattice indices used everywhere: 0 = metal, 1 = chalcogen pair, 2 = hollow.

Examples
--------
>>> m = get_material("wse2")
>>> m.formula, m.sublattice_names
('WSe2', ('W', 'Se2', 'hollow'))
>>> round(m.site_spacing_nm, 4)
0.1895
>>> get_material("mos2").defect_kinds[1:4]
('vacancy_Mo', 'vacancy_S2', 'vacancy_S')
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Material", "MATERIALS", "HAADF_Z_EXPONENT", "MATERIAL_NAMES", "get_material", "materials_fitting",
           "fitting_hint", "METAL", "CHALCOGEN", "HOLLOW", "add_material_argument", "brightness_order",
           "name_by_brightness"]

#: sublattice indices
METAL, CHALCOGEN, HOLLOW = 0, 1, 2

#: HAADF (high-angle, Z-contrast) intensity of a column ~ the sum over its atoms of ``Z ** n``; ``n`` is
#: 1.6-2 depending on the detector's inner angle. Which column of a 2H monolayer is the brighter does not
#: depend on where in that range ``n`` is: S2 / Mo 0.43-0.29, Se2 / W 0.58-0.42, Se2 / Mo 1.43-1.31
HAADF_Z_EXPONENT = 1.7


def brightness_order(chalcogen_brighter: bool = False) -> np.ndarray:
    """The sublattice of the brightest, middle and darkest lattice colour [3]: metal, chalcogen pair,
    hollow in HAADF (Z-contrast: the metal column is the brightest); chalcogen pair, metal, hollow
    with ``chalcogen_brighter`` (a medium- or low-angle ADF image of a selenide can show the Se2 pairs
    brighter than the W: the shared WSe2 scan's second detector does).

    Examples
    --------
    >>> brightness_order().tolist(), brightness_order(True).tolist()
    ([0, 1, 2], [1, 0, 2])
    """
    return np.array([CHALCOGEN, METAL, HOLLOW] if chalcogen_brighter else [METAL, CHALCOGEN, HOLLOW], np.int64)


def name_by_brightness(rank: np.ndarray, chalcogen_brighter: bool = False) -> np.ndarray:
    """Sublattice indices from brightness ranks (0 brightest, 1, 2; -1 unknown stays -1).

    Examples
    --------
    >>> name_by_brightness(np.array([0, 1, 2, -1]), True).tolist()
    [1, 0, 2, -1]
    """
    rank = np.asarray(rank, np.int64)
    return np.where(rank >= 0, brightness_order(chalcogen_brighter)[np.clip(rank, 0, 2)], -1).astype(np.int64)


@dataclass(frozen=True)
class Material:
    """A 2H monolayer: names of its sites and its lattice constant.

    Attributes
    ----------
    name : key in :data:`MATERIALS` (``"mos2"``).
    formula : ``"MoS2"``.
    metal, chalcogen : element symbols (``"Mo"``, ``"S"``); ``"M"``, ``"X"`` for the generic 2H.
    a_nm : in-plane lattice constant (metal-metal distance) in nm; ``None`` for the generic 2H
        (the lattice then comes from the image alone and a calibration cannot be checked).
    metal_z, chalcogen_z : atomic numbers (``None`` for the generic 2H): which column a HAADF image
        shows brighter (:attr:`chalcogen_brighter_haadf`).
    """

    name: str
    formula: str
    metal: str
    chalcogen: str
    a_nm: float | None
    metal_z: int | None = None
    chalcogen_z: int | None = None

    @property
    def chalcogen_brighter_haadf(self) -> bool:
        """Whether a chalcogen pair outshines the metal column in HAADF: ``2 Zx^n > Zm^n``
        (:data:`HAADF_Z_EXPONENT`). True for MoSe2 only of the four; False for the generic 2H.

        >>> [get_material(m).chalcogen_brighter_haadf for m in ("mos2", "ws2", "mose2", "wse2", "2h")]
        [False, False, True, False, False]
        """
        if self.metal_z is None or self.chalcogen_z is None:
            return False
        return 2 * self.chalcogen_z ** HAADF_Z_EXPONENT > self.metal_z ** HAADF_Z_EXPONENT

    @property
    def site_spacing_nm(self) -> float | None:
        """Nearest-neighbour distance of the site lattice (metal, chalcogen, hollow), ``a / sqrt(3)``."""
        return None if self.a_nm is None else self.a_nm / math.sqrt(3.0)

    @property
    def sublattice_names(self) -> tuple[str, str, str]:
        """Names of sublattices 0, 1, 2: metal, chalcogen pair, hollow."""
        return (self.metal, f"{self.chalcogen}2", "hollow")

    @property
    def defect_kind_meanings(self) -> dict[str, str]:
        """``defect_kind`` value -> what it says of the site (one line, for tables and the report),
        in a fixed order.

        A kind names the *site* and how its column deviates, never more than one image's
        intensity shows: ``substitution_<X>`` is a chalcogen column brighter than its pair (a metal
        antisite, a heavier chalcogen such as Se implanted in MoS2, and an adatom on the column read
        alike); ``substitution_<M>`` a metal site brighter or darker than the metal.
        """
        m, x = self.metal, self.chalcogen
        return {
            "none": "normal site",
            f"vacancy_{m}": f"empty {m} site (about as dark as a hexagon centre)",
            f"vacancy_{x}2": f"empty {x}2 column (both {x} missing)",
            f"vacancy_{x}": f"one {x} of the {x}2 pair missing",
            f"substitution_{x}": f"{x}2 column brighter than its pair: something heavier in or on it "
                                 "(a metal antisite, a heavier chalcogen or an adatom; intensity cannot tell which)",
            f"substitution_{m}": f"foreign atom on the {m} site (brighter or darker than {m})",
            "off_lattice": "peak on no lattice node (adatom, contamination)",
            "other": "something at a hexagon centre, or a site without local references",
        }

    @property
    def defect_kinds(self) -> tuple[str, ...]:
        """``defect_kind`` values, in a fixed order (the keys of :attr:`defect_kind_meanings`)."""
        return tuple(self.defect_kind_meanings)


#: Lattice constants of the bulk 2H crystals (room temperature), nm.
MATERIALS: dict[str, Material] = {
    "mos2": Material("mos2", "MoS2", "Mo", "S", 0.3160, 42, 16),
    "ws2": Material("ws2", "WS2", "W", "S", 0.3153, 74, 16),
    "mose2": Material("mose2", "MoSe2", "Mo", "Se", 0.3288, 42, 34),
    "wse2": Material("wse2", "WSe2", "W", "Se", 0.3282, 74, 34),
    "2h": Material("2h", "MX2", "M", "X", None),
}

MATERIAL_NAMES: tuple[str, ...] = tuple(MATERIALS)


def get_material(name: str | Material) -> Material:
    """The :class:`Material` called ``name`` (case-insensitive); a clear error for an unknown name.

    Examples
    --------
    >>> get_material("MoSe2").chalcogen
    'Se'
    """
    if isinstance(name, Material):
        return name
    key = str(name).strip().lower()
    if key not in MATERIALS:
        raise ValueError(f"unknown material {name!r}; known: {', '.join(MATERIAL_NAMES)}")
    return MATERIALS[key]


def materials_fitting(site_spacing_nm: float, tolerance: float) -> list[str]:
    """The materials whose site spacing ``a / sqrt(3)`` is within ``tolerance`` (a share) of
    ``site_spacing_nm``, closest first (the generic 2H, which has no lattice constant, never).

    What a calibrated image's spacing fits, for a warning that the chosen material does not. The
    sulphides (a 0.315-0.316 nm) and the selenides (0.328-0.329 nm) are only 4 % apart, about what a
    file's pixel size is good to: this can hint at the chalcogen, never tell the metal.

    Examples
    --------
    >>> materials_fitting(0.3282 / 3 ** 0.5, 0.02)
    ['wse2', 'mose2']
    """
    d = {k: abs(m.site_spacing_nm / site_spacing_nm - 1) for k, m in MATERIALS.items()
         if m.site_spacing_nm is not None and site_spacing_nm > 0}
    return [k for k in sorted(d, key=d.get) if d[k] <= tolerance]


def fitting_hint(fits) -> str:
    """The end of a calibration warning naming the materials the image fits (:func:`materials_fitting`);
    empty for none.

    >>> fitting_hint(["mose2", "wse2"])
    ' (with this pixel size it fits mose2 or wse2: --material)'
    """
    return f" (with this pixel size it fits {' or '.join(fits)}: --material)" if fits else ""


def add_material_argument(group) -> None:
    """Add the ``--material`` option (one definition for every command that finds sites).

    ``group``: an ``argparse`` parser or argument group. The value lands in ``args.material``
    (``None`` when not given: the settings' own default, ``mos2``, applies).

    Examples
    --------
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_material_argument(p)
    >>> p.parse_args(["--material", "WSe2"]).material
    'wse2'
    """
    group.add_argument(
        "--material", type=lambda v: get_material(v).name, default=None, metavar="NAME",
        help="the 2H monolayer (" + ", ".join(MATERIAL_NAMES) + "; default mos2): its lattice constant checks "
             "the file's pixel size, its names label sites and defects")
