"""The names of the STEM detectors whose images stemfast pairs and picks (one list for the readers and
the batch's companion pairing).

Dark-field detectors only: bright field (BF, ABF) is left out -- its contrast follows focus and
thickness, not only the atoms, and no real BF companion was measured.
"""
from __future__ import annotations

import re

__all__ = ["ANGLE_ORDERS", "DETECTOR_NAMES", "NAME_WORDS", "detector_key", "higher_angle"]

#: the dark-field detectors' names (lower case, letters and digits; compared in any case), in the order a
#: companion is chosen among several and an image among a file's several
DETECTOR_NAMES = ("haadf", "adf1", "maadf", "adf2", "laadf", "adf3", "adf4", "adf", "df", "df1", "df2", "df3",
                  "df4", "dfi", "dfo", "dfs")


def detector_key(title: str) -> str:
    """A detector's title as :data:`DETECTOR_NAMES` spells it: lower case, letters and digits only (a
    Spectra's "DF-I", "DF-O", "DF-S" are ``dfi``, ``dfo``, ``dfs``; a DF4 segment "DF4-A" is ``df4a``, no
    name: a quarter of the detector is not its image).

    >>> detector_key("DF-S"), detector_key("HAADF"), detector_key("DF4-A")
    ('dfs', 'haadf', 'df4a')
    """
    return re.sub(r"[^a-z0-9]", "", title.lower())


#: detectors whose collection angles rank by their names alone, highest first: a high-angle annular
#: dark-field detector collects above every other dark-field one; medium above low angle; a JEOL's ADF1
#: above its ADF2 (the labelled WSe2 scans: ADF1 is the HAADF, ADF2 the MAADF)
ANGLE_ORDERS = (("haadf", "maadf", "laadf"), ("adf1", "adf2"))

#: splits a file name or title into its words (even items) and the separators between them
NAME_WORDS = re.compile(r"([^A-Za-z0-9]+)")


def higher_angle(name: str, other: str) -> bool | None:
    """Whether the detector in ``name`` (a file name without its extension, or an image's title)
    collects at higher angles than the one in ``other``, where the two names differ in one word that
    names a detector on each side and :data:`ANGLE_ORDERS` ranks the two; None where the names do not
    tell.

    Examples
    --------
    >>> higher_angle("1028_ADF1_11", "1028_ADF2_11"), higher_angle("scan_MAADF", "scan_HAADF")
    (True, False)
    >>> higher_angle("s_df4", "s_df2") is None, higher_angle("a_HAADF", "b_MAADF") is None
    (True, True)
    """
    a, b = NAME_WORDS.split(name), NAME_WORDS.split(other)
    if len(a) != len(b):
        return None
    differ = [(x.lower(), y.lower()) for x, y in zip(a, b) if x.lower() != y.lower()]
    if len(differ) != 1:
        return None
    x, y = differ[0]
    if x not in DETECTOR_NAMES or y not in DETECTOR_NAMES:
        return None
    if "haadf" in (x, y):
        return x == "haadf"
    for order in ANGLE_ORDERS:
        if x in order and y in order:
            return order.index(x) < order.index(y)
    return None
