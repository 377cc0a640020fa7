"""The checks of a call's arguments (targets, directories, the agent's socket), before any I/O."""

from __future__ import annotations

import os

from qemu.qmp import QMPClient


def check_save_dir(save_dir: object) -> str | None:
    """*save_dir* as a path string, or None; TypeError for anything else."""
    if save_dir is None:
        return None
    if isinstance(save_dir, (str, os.PathLike)):
        path = os.fspath(save_dir)
        if isinstance(path, str) and path:
            return os.path.abspath(path)
    raise TypeError(f"save_dir must be a directory path or None, not {save_dir!r}")


def check_evidence_dir(directory: object) -> str | None:
    """*directory* as a path string (None stays None); a missing one is the step's failure."""
    if directory is None:
        return None
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"evidence_dir must be a path or None, not {type(directory).__name__}")
    path = os.fspath(directory)
    if not isinstance(path, str) or not path:
        raise TypeError(f"evidence_dir must be a non-empty str path, not {directory!r}")
    return os.path.abspath(path)  # QEMU resolves relative names against its own cwd


def check_target(target: object) -> None:
    """Raise TypeError unless *target* is something :func:`shutdown` accepts."""
    if not isinstance(target, QMPClient):
        check_address(target)


def check_agent(agent: object) -> str | None:
    """*agent* as a path string, or None; TypeError for anything else."""
    if agent is None:
        return None
    path = os.fspath(agent) if isinstance(agent, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise TypeError(f"agent is the path of the guest agent's unix socket, not {agent!r}")
    return path


def check_address(target: object) -> str | tuple[str, int]:
    """*target* (not a client) as a socket path or ``(host, port)``; TypeError, ValueError."""
    if isinstance(target, tuple):
        if (
            len(target) != 2
            or not isinstance(target[0], str)
            or isinstance(target[1], bool)
            or not isinstance(target[1], int)
        ):
            raise TypeError(f"a TCP target is a (host, port) tuple, not {target!r}")
        if not 0 < target[1] < 65536:
            raise ValueError(f"a TCP port is 1 to 65535, not {target[1]}")
        return target[0], target[1]
    if isinstance(target, (str, os.PathLike)):
        path = os.fspath(target)
        if not isinstance(path, str) or not path:
            raise TypeError(f"a unix socket target is a non-empty path, not {target!r}")
        return path
    raise TypeError(
        "target must be a unix socket path, a (host, port) tuple or a QMPClient, "
        f"not {type(target).__name__}"
    )
