"""``format_csv_rows`` of the numba backend: the reference itself (Numba has no printf-style float
formatting; the bytes must be Python's)."""
from ..numpy_ref.text import format_csv_rows

__all__ = ["format_csv_rows"]
