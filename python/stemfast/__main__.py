"""``python -m stemfast``: see :mod:`stemfast.cli`."""
from .cli import run

run()
