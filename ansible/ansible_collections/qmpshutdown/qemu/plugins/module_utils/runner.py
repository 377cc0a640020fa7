# Copyright: The qmpshutdown authors
# MIT License (see LICENSE in the qmpshutdown repository)
"""What the modules of qmpshutdown.qemu share: the library, run on the managed host.

The modules are thin: the library stops the VMs, validates the policy and
finds the host's QEMUs; this file turns the module's options into the
library's values and its outcomes into the module's return values.
"""

from __future__ import annotations

import logging
import os
import traceback

from ansible.module_utils.basic import missing_required_lib

#: The library's version this collection is made with: it uses the library's own parsing
#: of targets, discovery and connection, which came with it.
NEEDS = "0.4.1"

try:
    import qmpshutdown
except ImportError:
    LIBRARY_IMPORT_ERROR = traceback.format_exc()
    LIBRARY_TOO_OLD = None
else:
    LIBRARY_IMPORT_ERROR = None
    try:
        import anyio
        import attrs

        from qmpshutdown._cli import parse_target
        from qmpshutdown._connect import connect_socket, handshake
        from qmpshutdown._discover import scan
        from qmpshutdown._fleet import check_deadline
        from qmpshutdown._monitor import HandshakeFailed, HandshakeTimeout
        from qmpshutdown._policy import Stage, with_save_rung
    except ImportError as err:
        LIBRARY_TOO_OLD = (
            f"qmpshutdown {getattr(qmpshutdown, '__version__', '?')} on this host lacks what "
            f"the collection qmpshutdown.qemu needs ({err}): pip install 'qmpshutdown>={NEEDS}'"
        )
    else:
        LIBRARY_TOO_OLD = None

#: What the managed host needs, as missing_required_lib() says it.
LIBRARY = "qmpshutdown"
LIBRARY_URL = "https://pypi.org/project/qmpshutdown/"


def library_problem():
    """Why the library cannot serve here, as ``fail_json`` keywords; None when it can."""
    if LIBRARY_IMPORT_ERROR is not None:
        return {"msg": missing_required_lib(LIBRARY, url=LIBRARY_URL),
                "exception": LIBRARY_IMPORT_ERROR}
    if LIBRARY_TOO_OLD is not None:
        return {"msg": LIBRARY_TOO_OLD}
    return None


class TaskError(Exception):
    """The options make no sense: the task fails with this message, nothing was touched."""


def quiet_logging():
    """Nothing but the module's JSON on stdout: the library's log lines go nowhere.

    The library logs through ``logging`` and never prints; a handler on the root
    logger keeps Python's last-resort handler from writing warnings to stderr.
    """
    logging.getLogger().addHandler(logging.NullHandler())


def policy_from(fields, save_dir=None):
    """The library's ShutdownPolicy from the task's ``policy`` dict (validated by it).

    With ``save_dir`` and no ``stages`` of its own, the save rung is added
    where the ladder puts it (right before quit), as ``qmpshutdown --save-dir``.

    :raises TaskError: a field the policy does not have, or a bad value (the
        library's message).
    """
    fields = dict(fields or {})
    try:
        policy = qmpshutdown.ShutdownPolicy(**fields)
    except TypeError as err:
        known = ", ".join(attrs.fields_dict(qmpshutdown.ShutdownPolicy))
        raise TaskError(f"policy: {err} (the fields are {known})") from err
    except ValueError as err:
        raise TaskError(f"policy: {err}") from err
    if save_dir is not None and "stages" not in fields:
        policy = with_save_rung(policy)
    return policy


def jobs_from(params):
    """The jobs the ``shutdown`` module's options name, and the QEMUs ``all`` left alone.

    :return: ``(jobs, labels, left_alone)``: one job and one label (the target as
        given, or the monitor found) per VM, in order; ``left_alone`` the rows of
        the QEMUs found but not ours to stop (``pid``, ``name``, ``target``,
        ``agent``, ``why``).
    :raises TaskError: options that do not go together, or a bad target.
    """
    targets, every, match, agent = (params["targets"], params["all"], params["match"],
                                    params["agent"])
    if every and targets is not None:
        raise TaskError("targets and all: true are exclusive: all finds the VMs itself")
    if not every and targets is None:
        raise TaskError("give targets (QMP sockets or HOST:PORT), or all: true")
    if match is not None and not every:
        raise TaskError("match goes with all: true")
    if match is not None and not all(match):
        raise TaskError("match: a glob must not be empty")
    if every and agent is not None:
        raise TaskError("agent cannot be used with all: true (each VM's agent is found "
                        "on its command line)")
    if agent is not None and len(targets) > 1:
        raise TaskError(f"agent names one guest, but {len(targets)} targets were given")
    if every:
        found = scan(match or None)
        stoppable = [vm for vm in found if vm.why is None]
        left = [vm_row(vm) for vm in found if vm.why is not None]
        return [vm.job() for vm in stoppable], [vm.monitor for vm in stoppable], left
    jobs = []
    for text in targets:
        try:
            address = parse_target(text)
        except ValueError as err:
            raise TaskError(f"targets: {err}") from err
        jobs.append(qmpshutdown.Job(address, agent=agent, name=text))
    return jobs, list(targets), []


def vm_row(vm):
    """One QEMU found on this host: pid, name, target, agent, why (None: ours to stop)."""
    row = vm.to_dict()
    row.setdefault("why", None)
    return row


def is_gone(err):
    """True when a ConnectError means nothing listens there: no socket, or refused.

    Its QEMU is not running (already stopped). Any other ConnectError — a peer
    that is not a QMP server, no permission, no greeting — is not that.
    """
    cause = err
    while cause is not None:
        if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)):
            return True
        if isinstance(cause, (HandshakeFailed, HandshakeTimeout)):
            return False
        cause = cause.__cause__
    return False


def _empty_record(stage, pid=None):
    return qmpshutdown.ShutdownResult(
        stage=stage, graceful=False, reason=None, presses=0, runstate=None, cause=None,
        pid=pid, elapsed=0.0, events=(), steps=(),
    ).to_dict()


def entry(label, job, outcome):
    """One ``results`` item: the target, its name, the error if any, then the record.

    A target whose QEMU is not running (no socket, or refused) gets the record
    the library gives a QEMU gone before anything was sent (``already-off``);
    an error with no record gets an empty one with ``stage`` None.

    :return: ``(item, changed, failed)``.
    """
    item = {"target": label, "name": job.name or label, "error": None}
    if isinstance(outcome, qmpshutdown.ShutdownResult):
        changed = outcome.stage not in (None, Stage.ALREADY_OFF)
        item.update(outcome.to_dict())
        return item, changed, False
    item["error"] = str(outcome)
    if isinstance(outcome, qmpshutdown.ShutdownFailed):
        item.update(outcome.result.to_dict())
        return item, outcome.result.stage not in (None, Stage.ALREADY_OFF), True
    if isinstance(outcome, qmpshutdown.ConnectError) and is_gone(outcome):
        item.update(_empty_record(Stage.ALREADY_OFF.value))
        return item, False, False
    item.update(_empty_record(None, job.pid))
    return item, False, True


def check_options(params):
    """The options the library checks when a fleet starts, checked before anything else.

    :raises TaskError: a deadline that is not a number of seconds > 0, or a
        save_dir that is not a directory.
    """
    try:
        check_deadline(params["deadline"])
    except ValueError as err:
        raise TaskError(str(err)) from err
    save_dir = params["save_dir"]
    if save_dir is not None and not os.path.isdir(save_dir):
        raise TaskError(f"save_dir: {save_dir!r} is not a directory")


def stop(jobs, policy, params):
    """Stop *jobs* as one fleet; each a ShutdownResult or the library's Error, in order."""
    return anyio.run(_stop, jobs, policy, params, backend="asyncio")


async def _stop(jobs, policy, params):
    return await qmpshutdown.shutdown_many(
        jobs, policy, deadline=params["deadline"], save_dir=params["save_dir"],
        evidence_dir=params["evidence_dir"],
    )


def probe_all(addresses, connect_timeout, command_timeout):
    """Each address's runstate (None: nothing listens) or the exception that says why not."""
    return anyio.run(_probe_all, addresses, connect_timeout, command_timeout,
                     backend="asyncio")


async def _probe_all(addresses, connect_timeout, command_timeout):
    answers = [None] * len(addresses)

    async def one(index, address):
        try:
            answers[index] = await probe(address, connect_timeout, command_timeout)
        except (qmpshutdown.Error, HandshakeFailed, HandshakeTimeout, TimeoutError) as err:
            answers[index] = err

    async with anyio.create_task_group() as group:
        for index, address in enumerate(addresses):
            group.start_soon(one, index, address)
    return answers


async def probe(address, connect_timeout, command_timeout):
    """QEMU's runstate (``query-status``, read only); None when nothing listens there.

    Nothing is pressed or changed: the monitor is connected to, asked, and closed.

    :raises HandshakeFailed: the peer is not a QMP server.
    :raises HandshakeTimeout: it accepted but never greeted (QEMU stopped or hung,
        or another client holds its monitor).
    :raises ConnectError: it cannot be reached for another reason (no permission).
    :raises TimeoutError: ``query-status`` got no answer in time.
    """
    try:
        sock = await connect_socket(address, connect_timeout)
    except qmpshutdown.ConnectError as err:
        if is_gone(err):
            return None
        raise
    monitor = None
    try:
        monitor = await handshake(sock, connect_timeout)
        with anyio.fail_after(command_timeout):
            status = await monitor.execute("query-status")
        return str(status.get("status")) if isinstance(status, dict) else None
    finally:
        if monitor is not None:
            await monitor.close()  # bounded and shielded, never raises
        else:
            sock.close()


def would_stop(answer):
    """What a probe's answer means for check mode: ``(runs, error)``.

    A runstate other than ``shutdown`` runs (it would be stopped); None (nothing
    listens) or ``shutdown`` (the guest is off) would not change. A monitor that
    accepted but never greeted, or did not answer in time, is a QEMU that runs
    (the real run would force it). A peer that is not a QMP server, or one that
    cannot be reached for another reason, is the error the real run fails with.
    """
    if isinstance(answer, (HandshakeTimeout, TimeoutError)):
        return True, None
    if isinstance(answer, Exception):
        return False, str(answer)
    return answer not in (None, "shutdown"), None


def host_vms(match, timeout):
    """The ``info`` module's rows: every QEMU found (by pid), with its runstate if it answers."""
    found = scan(match or None)
    reachable = [vm for vm in found if vm.why is None]
    answers = probe_all([vm.target for vm in reachable], timeout, timeout)
    runstates = {vm.pid: answer for vm, answer in zip(reachable, answers, strict=True)
                 if isinstance(answer, str)}
    return [dict(vm_row(vm), runstate=runstates.get(vm.pid)) for vm in found]
