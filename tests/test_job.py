"""Job: one description of a VM, taken whole by every entry point (fake QEMUs, plain logic)."""

from __future__ import annotations

import socket

import anyio
import attrs
import pytest

import qmpshutdown
from qmpshutdown import Job, ShutdownPolicy, ShutdownResult, Stage
from qmpshutdown._cli import parse_command_line
from qmpshutdown._cli_output import EXIT_OK, exit_status
from support.policies import FAKE

# ----------------------------------------------------------------------------- the value


def test_job_defaults_and_is_frozen(tmp_path):
    job = Job(tmp_path / "a.sock")
    assert (job.policy, job.pid, job.agent, job.name, job.group) == (None, None, None, None, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        job.group = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"policy": "fast"}, TypeError),
        ({"pid": 0}, ValueError),
        ({"pid": True}, ValueError),
        ({"pid": "12"}, ValueError),
        ({"group": -1}, ValueError),
        ({"group": 1.0}, ValueError),
        ({"name": ""}, TypeError),
        ({"agent": 42}, TypeError),
    ],
)
def test_job_refuses_fields_that_make_no_sense(tmp_path, kwargs, error):
    with pytest.raises(error):
        Job(tmp_path / "a.sock", **kwargs)


def test_job_refuses_a_bad_target():
    with pytest.raises(TypeError):
        Job(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        Job(("127.0.0.1", 0))


def test_job_takes_an_agent_socket_path(tmp_path):
    assert Job(tmp_path / "a.sock", agent=tmp_path / "qga.sock").agent == tmp_path / "qga.sock"
    with pytest.raises(TypeError):
        Job(tmp_path / "a.sock", agent=42)  # type: ignore[arg-type]


def test_job_carries_every_per_vm_option():
    assert [field.name for field in attrs.fields(Job)] == [
        "target", "policy", "pid", "agent", "name", "group", "save_dir", "evidence_dir",
        "console_log",
    ]  # fmt: skip


@pytest.mark.parametrize("field", ["save_dir", "evidence_dir", "console_log", "agent"])
@pytest.mark.parametrize("bad", [3, b"/tmp", ""])
def test_job_refuses_a_path_that_is_not_one(tmp_path, field, bad):
    with pytest.raises(TypeError, match=field):
        Job(tmp_path / "a.sock", **{field: bad})


def test_the_call_fills_in_only_what_the_job_leaves_open(tmp_path):
    mine = ShutdownPolicy(powerdown_timeout=1)
    call = ShutdownPolicy(powerdown_timeout=2)
    bare = Job(tmp_path / "a.sock").under(call, save_dir="/s", evidence_dir="/e")
    assert (bare.policy, bare.save_dir, bare.evidence_dir) == (call, "/s", "/e")
    own = Job(tmp_path / "a.sock", policy=mine, save_dir="/mine", evidence_dir="/ev")
    kept = own.under(call, save_dir="/s", evidence_dir="/e")
    assert (kept.policy, kept.save_dir, kept.evidence_dir) == (mine, "/mine", "/ev")


def test_paths_are_read_as_the_engine_uses_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = Job("a.sock", save_dir="saves", evidence_dir=tmp_path / "ev", agent=tmp_path / "q",
              console_log=tmp_path / "c.log")  # fmt: skip
    assert job.save_path == str(tmp_path / "saves")  # QEMU's cwd is not ours: absolute
    assert job.evidence_path == str(tmp_path / "ev")
    assert (job.agent_path, job.console_path) == (str(tmp_path / "q"), str(tmp_path / "c.log"))
    assert Job("a.sock").save_path is None


# ----------------------------------------------------------------------------- the entry points


@pytest.mark.parametrize(
    "keywords",
    [
        {"policy": ShutdownPolicy()},
        {"pid": 1234},
        {"save_dir": "/tmp"},
        {"evidence_dir": "/tmp"},
        {"agent": "/run/qga.sock"},
    ],
)
def test_a_job_and_per_vm_keywords_is_a_type_error_before_anything_is_sent(tmp_path, keywords):
    path = tmp_path / "listening.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        server.setblocking(False)
        with pytest.raises(TypeError, match=f"give {next(iter(keywords))} in the Job"):
            qmpshutdown.shutdown_sync(Job(path), **keywords)
        with pytest.raises(TypeError, match="in the Job"):
            anyio.run(lambda: qmpshutdown.shutdown(Job(path), **keywords))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected: nothing was sent


def test_shutdown_takes_a_job_with_its_options(fakes):
    (path,) = fakes(1)
    pid = fakes.started[0].pid
    result = anyio.run(
        lambda: qmpshutdown.shutdown(Job(path, policy=FAKE, pid=pid, name="web1"))
    )
    assert (result.stage, result.graceful, result.pid) == (Stage.POWERDOWN, True, pid)


def test_shutdown_sync_takes_a_job_and_names_the_vm_by_it(fakes):
    (path,) = fakes(1)
    seen: list[str] = []
    result = qmpshutdown.shutdown_sync(
        Job(path, policy=FAKE, name="db"), on_progress=lambda update: seen.append(update.target)
    )
    assert result.stage is Stage.POWERDOWN and result.graceful
    assert set(seen) == {"db"}


def test_shutdown_sync_refuses_a_job_with_a_client():
    client = qmpshutdown._job.QMPClient("x")  # never connected: refused before any use
    with pytest.raises(TypeError, match="QMPClient"):
        qmpshutdown.shutdown_sync(Job(client))


def test_the_keyword_forms_still_build_the_same_job(fakes):
    (path,) = fakes(1)
    result = qmpshutdown.shutdown_sync(path, FAKE, fakes.started[0].pid)
    assert result.stage is Stage.POWERDOWN and result.graceful


# ----------------------------------------------------------------------------- the command line


def test_the_cli_gives_every_job_every_option_it_parsed(tmp_path):
    save, evidence = tmp_path / "save", tmp_path / "evidence"
    save.mkdir()
    invocation = parse_command_line([
        "--agent", "/run/vm/qga.sock", "--save-dir", str(save), "--evidence-dir", str(evidence),
        "--pid", "42", "/run/vm/qmp.sock",
    ])  # fmt: skip
    (job,) = invocation.jobs
    assert (job.target, job.pid, job.agent, job.save_dir, job.evidence_dir) == (
        "/run/vm/qmp.sock", 42, "/run/vm/qga.sock", str(save), str(evidence),
    )  # fmt: skip
    two = parse_command_line(["--evidence-dir", str(evidence), "a.sock", "--then", "b.sock"])
    assert [(j.group, j.evidence_dir, j.agent) for j in two.jobs] == [
        (0, str(evidence), None), (1, str(evidence), None),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- one verdict


def test_already_off_is_never_forced():
    off = ShutdownResult(
        stage=Stage.ALREADY_OFF, graceful=False, reason=None, presses=0, runstate=None,
        cause=None, pid=None, elapsed=0.0, events=(), steps=(),
    )  # fmt: skip
    assert not off.forced
    assert off.summary().startswith("already-off already off ")
    assert exit_status(off) == EXIT_OK
    quit = attrs.evolve(off, stage=Stage.QUIT)
    assert quit.forced and quit.summary().startswith("quit forced ")
    assert exit_status(quit) == 1
    assert not attrs.evolve(quit, graceful=True).forced
    assert not attrs.evolve(off, stage=None).forced


def test_the_module_default_policy_is_the_one_default():
    import inspect

    from qmpshutdown._policy import DEFAULT_POLICY

    assert ShutdownPolicy() == DEFAULT_POLICY
    for fn in (qmpshutdown.shutdown, qmpshutdown.shutdown_many, qmpshutdown.launch,
               qmpshutdown.launch_sync, qmpshutdown.shutdown_sync):  # fmt: skip
        assert inspect.signature(fn).parameters["policy"].default is DEFAULT_POLICY
