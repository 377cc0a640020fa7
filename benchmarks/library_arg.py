"""``--library DIR`` for a benchmark: measure the qmpshutdown package of another checkout.

Called before ``import qmpshutdown`` (e.g. with ``git worktree add /tmp/before HEAD~1``),
so that one script measures before and after, each against the baselines of its own run.
"""

from __future__ import annotations

import os
import sys


def use_library_from_argv() -> None:
    """``--library DIR`` in ``sys.argv``: import the qmpshutdown package in DIR, not the
    installed one."""
    if "--library" not in sys.argv[:-1]:
        return
    where = os.path.abspath(sys.argv[sys.argv.index("--library") + 1])
    # An editable install finds its own checkout first: take its finder out.
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder)]
    sys.path.insert(0, where)
