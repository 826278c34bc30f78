"""The names of the STEM detectors whose images stemfast pairs and picks (one list for the readers and
the batch's companion pairing).

Dark-field detectors only: bright field (BF, ABF) is left out -- its contrast follows focus and
thickness, not only the atoms, and no real BF companion was measured.
"""
from __future__ import annotations

import re

__all__ = ["DETECTOR_NAMES", "detector_key"]

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
