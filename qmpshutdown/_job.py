"""One VM to stop, and everything that VM needs: the one value every layer is given."""

from __future__ import annotations

import os
from typing import Any, Union

import attrs
from qemu.qmp import QMPClient

from ._arguments import check_target
from ._policy import ShutdownPolicy

#: What :func:`~qmpshutdown.shutdown` accepts: a unix socket path, ``(host, port)``, or a
#: connected client.
Target = Union[str, "os.PathLike[str]", tuple[str, int], QMPClient]


def _target(instance: Any, attribute: Any, value: Any) -> None:
    check_target(value)  # TypeError / ValueError, as shutdown() would raise


def _policy(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, ShutdownPolicy):
        raise TypeError(f"policy must be a ShutdownPolicy or None, not {type(value).__name__}")


def _pid(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31
    ):
        raise ValueError(f"pid must be a positive int (a Linux pid) or None, not {value!r}")


def _path(what: str) -> Any:
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if value is None:
            return
        path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
        if not isinstance(path, str) or not path:
            raise TypeError(f"{attribute.name} must be {what} or None, not {value!r}")

    return check


def _name(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"name must be a non-empty str or None, not {value!r}")


def _group(instance: Any, attribute: Any, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"group must be an int >= 0, not {value!r}")


def _str_or_none(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _abs_or_none(value: str | os.PathLike[str] | None) -> str | None:
    # QEMU resolves relative names against its own working directory: make them ours.
    return None if value is None else os.path.abspath(os.fspath(value))


@attrs.frozen
class Job:
    """One VM to stop, with every option that VM takes (the call-wide ones aside).

    :func:`~qmpshutdown.shutdown` and :func:`~qmpshutdown.shutdown_sync` take one as
    their target, :func:`~qmpshutdown.shutdown_many` a list of them; the keyword
    forms of those calls build one. Adding an option for one VM is one field here.

    :param target: what :func:`~qmpshutdown.shutdown` accepts.
    :param policy: this VM's policy; None uses the call's (``shutdown_many()``'s
        *policy*, else the default policy).
    :param pid: QEMU's pid (see :func:`~qmpshutdown.shutdown`), e.g. for a TCP monitor.
    :param agent: the guest agent's socket, for the ``agent`` rung and the
        freeze before force (see :func:`~qmpshutdown.shutdown`).
    :param name: how progress, log lines and errors name the VM (default: the
        address; a QMPClient keeps its own name).
    :param save_dir: where this VM's ``save`` rung keeps its state (None: the
        one given to ``shutdown_many()``, else the rung is skipped).
    :param evidence_dir: where a PNG of the guest's screen goes when it has to
        be forced (None: the one given to ``shutdown_many()``, else none is taken).
    :param console_log: the serial console's log file, whose last lines a forced
        record keeps (``launch(console_log=True)`` gives it), or None.
    :param group: the order of stopping in a fleet: every VM of group 0 is done
        before group 1 starts, and so on.
    :raises TypeError, ValueError: a field that makes no sense (at construction).
    """

    target: Target = attrs.field(validator=_target)
    policy: ShutdownPolicy | None = attrs.field(default=None, kw_only=True, validator=_policy)
    pid: int | None = attrs.field(default=None, kw_only=True, validator=_pid)
    agent: str | os.PathLike[str] | None = attrs.field(
        default=None, kw_only=True, validator=_path("a guest agent socket path")
    )
    name: str | None = attrs.field(default=None, kw_only=True, validator=_name)
    group: int = attrs.field(default=0, kw_only=True, validator=_group)
    save_dir: str | os.PathLike[str] | None = attrs.field(
        default=None, kw_only=True, validator=_path("a directory path")
    )
    evidence_dir: str | os.PathLike[str] | None = attrs.field(
        default=None, kw_only=True, validator=_path("a directory path")
    )
    console_log: str | os.PathLike[str] | None = attrs.field(
        default=None, kw_only=True, validator=_path("a file path")
    )

    @property
    def label(self) -> str | None:
        """The name to give the ladder, when it can take one (not for a QMPClient)."""
        return None if isinstance(self.target, QMPClient) else self.name

    @property
    def agent_path(self) -> str | None:
        """``agent`` as a string."""
        return _str_or_none(self.agent)

    @property
    def save_path(self) -> str | None:
        """``save_dir`` as an absolute path."""
        return _abs_or_none(self.save_dir)

    @property
    def evidence_path(self) -> str | None:
        """``evidence_dir`` as an absolute path."""
        return _abs_or_none(self.evidence_dir)

    @property
    def console_path(self) -> str | None:
        """``console_log`` as a string."""
        return _str_or_none(self.console_log)

    def under(
        self,
        policy: ShutdownPolicy,
        *,
        save_dir: str | os.PathLike[str] | None = None,
        evidence_dir: str | os.PathLike[str] | None = None,
    ) -> Job:
        """This job with the call's settings filled in where it names none of its own."""
        return attrs.evolve(
            self,
            policy=self.policy or policy,
            save_dir=self.save_dir if self.save_dir is not None else save_dir,
            evidence_dir=self.evidence_dir if self.evidence_dir is not None else evidence_dir,
        )

    @property
    def the_policy(self) -> ShutdownPolicy:
        """``policy``, which the engine requires set (see ``under()``)."""
        assert self.policy is not None, "a job reaches the engine with its policy"
        return self.policy
