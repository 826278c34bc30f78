"""``python -m stemfast``: see :mod:`stemfast.cli`."""
from .cli import main

raise SystemExit(main())
