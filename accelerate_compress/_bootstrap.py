"""Worker entry of ``accelerate-compress launch``: instrument Accelerate, then run the user's script unchanged.

``python -m accelerate_compress._bootstrap script.py args...`` runs ``script.py`` as ``python script.py args...``
would (``__name__ == "__main__"``, ``sys.argv == ["script.py", *args]``, the script's folder first on
``sys.path``); ``--module name args...`` runs it as ``python -m name args...``.
"""

from __future__ import annotations

import os
import runpy
import sys

from accelerate_compress._autoinstrument import install


def main(argv: list[str]) -> None:
    """Run the script or module in ``argv`` after :func:`install`."""
    if not argv:
        raise SystemExit("usage: python -m accelerate_compress._bootstrap (script.py | --module name) [args...]")
    install()
    if argv[0] == "--module":
        if len(argv) < 2:
            raise SystemExit("accelerate_compress._bootstrap: --module needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = argv[0]
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
