"""``python -m sparse_grad``: see :mod:`sparse_grad.cli`."""
import os
import sys
from pathlib import Path

from ._source_tree import installed_instead

if not sys.flags.safe_path:  # not already re-run with -P
    _here = Path(__file__).resolve().parent
    _installed = installed_instead(_here, [p for p in sys.path if p and Path(p).resolve() != _here.parent])
    if _installed is not None:
        print(f"sparse_grad: {_here} holds the sources without the built native extension; running the "
              f"installed package ({_installed}) instead", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-P", "-m", "sparse_grad", *sys.argv[1:]])

from .cli import main  # noqa: E402

raise SystemExit(main())
