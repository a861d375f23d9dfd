"""``python -m sparse_grad``: see :mod:`sparse_grad.cli`."""
from .cli import main

raise SystemExit(main())
