"""The collection ``qmpshutdown.qemu`` (``ansible/``) without guests.

``ansible-doc`` on each module, ``ansible-galaxy collection build``, the error
when the managed host lacks the library, each module run as Ansible runs it
(its only output on stdout is its JSON) against stand-in QEMUs, the glue's
decisions as plain functions, and ``ansible-test sanity`` (offline; slow,
marked ``package``). The real runs on guests: tests/guests/test_ansible_guests.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import tomllib

import qmpshutdown
from qmpshutdown import ConnectError, ShutdownFailed, ShutdownResult
from support.guests import REPO_ROOT
from support.playbooks import COLLECTION, COLLECTIONS, environment, play, run_tool, tool

MODULES = ("shutdown", "info")


def load_runner() -> ModuleType:
    """The collection's glue (plugins/module_utils/runner.py), imported as a plain module."""
    path = COLLECTION / "plugins" / "module_utils" / "runner.py"
    spec = importlib.util.spec_from_file_location("qmpshutdown_qemu_runner", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runner() -> ModuleType:
    """The glue, once ansible-core is known to be here (it imports ansible.module_utils)."""
    tool("ansible-playbook")  # skip, or fail under CI=true, without ansible-core
    return load_runner()


def load_yaml(path: Path) -> dict[str, object]:
    import yaml  # PyYAML comes with ansible-core

    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


# ---- the collection's files -------------------------------------------------------------


def test_the_collection_version_is_the_library_s_and_ansible_core_is_only_a_test_dependency(
    runner,
):
    galaxy = load_yaml(COLLECTION / "galaxy.yml")
    assert (galaxy["namespace"], galaxy["name"]) == ("qmpshutdown", "qemu")
    assert galaxy["version"] == qmpshutdown.__version__
    assert qmpshutdown.__version__ == runner.NEEDS  # the library the glue is made with
    runtime = load_yaml(COLLECTION / "meta" / "runtime.yml")
    assert runtime["requires_ansible"] == ">=2.16.0"
    config = load_yaml(COLLECTION / "tests" / "config.yml")
    assert config["modules"]["python_requires"] == ">=3.10"
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert not [d for d in project["dependencies"] if d.startswith("ansible")]
    assert "ansible-core >= 2.16" in project["optional-dependencies"]["test"]


@pytest.mark.parametrize("name", MODULES)
def test_ansible_doc_shows_each_module_with_its_options_and_return_values(tmp_path, name):
    shown = run_tool(tmp_path, "ansible-doc", f"qmpshutdown.qemu.{name}")
    assert shown.returncode == 0, shown.stderr
    assert f"qmpshutdown.qemu.{name}" in shown.stdout
    assert "EXAMPLES:" in shown.stdout and "RETURN VALUES:" in shown.stdout
    dumped = run_tool(tmp_path, "ansible-doc", "--json", f"qmpshutdown.qemu.{name}")
    assert dumped.returncode == 0, dumped.stderr
    doc = json.loads(dumped.stdout)[f"qmpshutdown.qemu.{name}"]
    options = {key: value["type"] for key, value in doc["doc"]["options"].items()}
    returned = set(doc["return"])
    if name == "shutdown":
        assert options == {
            "targets": "list", "all": "bool", "match": "list", "policy": "dict", "agent": "path",
            "deadline": "float", "save_dir": "path", "evidence_dir": "path",
        }  # fmt: skip
        assert returned == {"results", "changed", "running", "left_alone"}
        record = set(doc["return"]["results"]["contains"])
        empty = ShutdownResult(stage=None, graceful=False, reason=None, presses=0,
                               runstate=None, cause=None, pid=None, elapsed=0.0, events=(),
                               steps=())  # fmt: skip
        assert record == {"target", "name", "error", *empty.to_dict()}
    else:
        assert options == {"match": "list", "timeout": "float"}
        assert returned == {"vms"}
        assert set(doc["return"]["vms"]["contains"]) == {
            "pid", "name", "target", "agent", "runstate", "why",
        }  # fmt: skip
    assert doc["doc"]["attributes"]["check_mode"]["support"] == "full"
    assert "qmpshutdown" in " ".join(doc["doc"]["requirements"])


def test_ansible_galaxy_builds_the_collection(tmp_path):
    built = run_tool(tmp_path, "ansible-galaxy", "collection", "build", COLLECTION,
                     "--output-path", tmp_path)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    archive = tmp_path / f"qmpshutdown-qemu-{qmpshutdown.__version__}.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
    assert {"README.md", "meta/runtime.yml", "plugins/modules/shutdown.py",
            "plugins/modules/info.py", "plugins/module_utils/runner.py"} <= names  # fmt: skip
    assert not [name for name in names if name.startswith("tests/output")]
    info = manifest["collection_info"]
    assert (info["namespace"], info["name"], info["version"]) == (
        "qmpshutdown", "qemu", qmpshutdown.__version__,
    )


# ---- the modules, run as Ansible runs them ------------------------------------------------


def run_module(tmp: Path, name: str, args: dict[str, object]) -> tuple[dict[str, object], str]:
    """Run a module's file the way Ansible does on the host: its arguments in a JSON file.

    :return: the JSON the module printed (all of its stdout), and its stderr.
    """
    tool("ansible-playbook")  # ansible-core here (skip, or fail under CI)
    path = tmp / "args.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(COLLECTIONS), str(REPO_ROOT)]))
    proc = subprocess.run(
        [sys.executable, str(COLLECTION / "plugins" / "modules" / f"{name}.py"), str(path)],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp, check=False,
    )  # fmt: skip
    return json.loads(proc.stdout), proc.stderr  # the whole of stdout is one JSON document


def test_shutdown_prints_only_its_json_and_a_missing_socket_is_already_stopped(fakes, tmp_path):
    (sock,) = fakes(1)
    gone = tmp_path / "gone.sock"
    out, err = run_module(tmp_path, "shutdown", {"targets": [str(sock), str(gone)]})
    assert err == ""
    assert out["changed"] is True and not out.get("failed")
    stopped, missing = out["results"]  # type: ignore[misc]
    assert (stopped["target"], stopped["stage"], stopped["graceful"], stopped["error"]) == (
        str(sock), "powerdown", True, None,
    )
    assert (missing["target"], missing["stage"], missing["presses"]) == (
        str(gone), "already-off", 0,
    )
    assert missing["error"] == f"{gone}: No such file or directory"
    fakes.started[0].wait(10)
    again, err = run_module(tmp_path, "shutdown", {"targets": [str(sock)]})
    assert (again["changed"], again["results"][0]["stage"]) == (False, "already-off")  # type: ignore[index]


def test_check_mode_asks_the_runstate_and_presses_nothing(fakes, tmp_path):
    (sock,) = fakes(1)
    args = {"targets": [str(sock)], "_ansible_check_mode": True}
    out, _ = run_module(tmp_path, "shutdown", args)
    assert (out["changed"], out["running"], out["results"]) == (True, [str(sock)], [])
    assert fakes.started[0].poll() is None  # the stand-in exits only after a press


def test_bad_options_fail_before_anything_is_touched(tmp_path):
    cases = [
        ({"targets": ["a.sock"], "all": True}, "targets and all: true are exclusive"),
        ({}, "give targets (QMP sockets or HOST:PORT), or all: true"),
        ({"targets": ["a.sock"], "match": ["x*"]}, "match goes with all: true"),
        ({"all": True, "match": [""]}, "match: a glob must not be empty"),
        ({"all": True, "agent": "/q.sock"}, "agent cannot be used with all: true"),
        ({"targets": ["a.sock", "b.sock"], "agent": "/q.sock"}, "agent names one guest, but 2"),
        ({"targets": ["::1:4444"]}, "targets: write an IPv6 address in brackets"),
        ({"targets": ["a.sock"], "save_dir": str(tmp_path / "no")}, "save_dir: "),
        ({"targets": ["a.sock"], "deadline": -1}, "deadline must be a finite number"),
        ({"targets": ["a.sock"], "deadline": 0, "_ansible_check_mode": True},
         "deadline must be a finite number"),
        ({"targets": ["a.sock"], "policy": {"stages": ["reboot"]}},
         "policy: unknown stage 'reboot'; the rungs are powerdown, agent, save, quit,"),
    ]  # fmt: skip
    for args, message in cases:
        out, _ = run_module(tmp_path, "shutdown", args)
        if message is None:
            assert not out.get("failed"), out
        else:
            assert out.get("failed") is True, (args, out)
            assert str(out["msg"]).startswith(message), (args, out["msg"])


def test_info_lists_nothing_for_a_match_nothing_fits(tmp_path):
    out, err = run_module(tmp_path, "info", {"match": [f"{tmp_path}/*"]})
    assert (out["changed"], out["vms"], err) == (False, [], "")


def test_a_host_without_the_library_gets_a_task_error_saying_how_to_install_it(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=60)  # fmt: skip
    python = str(bare / "bin" / "python")
    tasks = [{"qmpshutdown.qemu.info": {}, "register": "info", "ignore_errors": True}]
    run = play(tmp_path, tasks, env={"ANSIBLE_PYTHON_INTERPRETER": python, "PYTHONPATH": ""})
    assert run.status == 0, run.out + run.err
    assert run["info"]["failed"] is True
    assert run["info"]["msg"].startswith(
        "Failed to import the required Python library (qmpshutdown) on "
    )
    assert python in run["info"]["msg"]
    assert "https://pypi.org/project/qmpshutdown/" in run["info"]["msg"]


# ---- the glue's decisions ----------------------------------------------------------------


def test_the_policy_is_validated_by_the_library_and_save_dir_adds_the_save_rung(runner):
    policy = runner.policy_from({"powerdown_timeout": 5, "stages": ["powerdown", "quit"]})
    assert policy.powerdown_timeout == 5
    assert [s.value for s in policy.stages] == ["powerdown", "quit"]
    saving = runner.policy_from({}, save_dir="/states")
    assert [s.value for s in saving.stages] == [
        "powerdown", "agent", "save", "quit", "terminate", "kill",
    ]  # fmt: skip
    own = runner.policy_from({"stages": ["powerdown"]}, save_dir="/states")
    assert [s.value for s in own.stages] == ["powerdown"]  # its own stages are kept
    with pytest.raises(runner.TaskError, match=r"^policy: repress_interval must be a finite"):
        runner.policy_from({"repress_interval": 0})
    with pytest.raises(runner.TaskError, match=r"unexpected keyword argument 'timeout'"):
        runner.policy_from({"timeout": 3})


def test_each_outcome_is_a_record_changed_only_when_a_running_vm_stopped(runner):
    job = qmpshutdown.Job("/vm.sock", name="/vm.sock", pid=42)
    done = ShutdownResult(stage="quit", graceful=False, reason="host-qmp-quit", presses=2,
                          runstate="running", cause="ignored-power-button", pid=42,
                          elapsed=1.5, events=(), steps=())  # fmt: skip
    item, changed, failed = runner.entry("/vm.sock", job, done)
    assert (changed, failed, item["stage"], item["error"], item["target"]) == (
        True, False, "quit", None, "/vm.sock",
    )
    off = ShutdownResult(stage="already-off", graceful=True, reason=None, presses=0,
                         runstate="shutdown", cause=None, pid=42, elapsed=0.1, events=(),
                         steps=())  # fmt: skip
    assert runner.entry("/vm.sock", job, off)[1:] == (False, False)
    still = ShutdownFailed("/vm.sock: still running", done.__class__(
        stage=None, graceful=False, reason=None, presses=3, runstate="running",
        cause="ignored-power-button", pid=42, elapsed=2.0, events=(), steps=()))  # fmt: skip
    item, changed, failed = runner.entry("/vm.sock", job, still)
    assert (changed, failed, item["stage"], item["presses"], item["error"]) == (
        False, True, None, 3, "/vm.sock: still running",
    )
    for cause, gone in ((FileNotFoundError(2, "x"), True), (ConnectionRefusedError(111, "x"), True),
                        (PermissionError(13, "x"), False)):  # fmt: skip
        err = ConnectError("/vm.sock: why")
        err.__cause__ = cause
        item, changed, failed = runner.entry("/vm.sock", job, err)
        assert (changed, failed) == (False, not gone)
        assert item["stage"] == ("already-off" if gone else None)
        assert item["error"] == "/vm.sock: why"


def test_check_mode_counts_a_silent_monitor_as_running_and_a_stranger_as_an_error(runner):
    assert runner.would_stop("running") == (True, None)
    assert runner.would_stop("paused") == (True, None)
    assert runner.would_stop("shutdown") == (False, None)
    assert runner.would_stop(None) == (False, None)
    assert runner.would_stop(TimeoutError()) == (True, None)
    from qmpshutdown._monitor import HandshakeFailed, HandshakeTimeout

    assert runner.would_stop(HandshakeTimeout("no greeting")) == (True, None)
    assert runner.would_stop(HandshakeFailed("not a QMP monitor")) == (False, "not a QMP monitor")


# ---- ansible-test sanity -------------------------------------------------------------------

#: Offline stand-in for the get-pip.py that ansible-test downloads to put pip into the empty
#: venv of each sanity test: pip from Python's own ensurepip, then the packages asked for
#: (from the configured index). ansible-test's pip (24.2) names the file.
GET_PIP = '''\
import runpy
import subprocess
import sys

# In a child: ensurepip turns pip's configuration off (PIP_CONFIG_FILE=/dev/null) for its run.
subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True)
wanted = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install", "--quiet", *wanted]
runpy.run_module("pip", run_name="__main__", alter_sys=True)
'''
#: The sanity tests that check something in this collection, and those with nothing to check
#: (no changelog fragments, no __init__.py, no PowerShell, no shell scripts).
SANITY_RUN = (
    "action-plugin-docs", "ansible-doc", "compile", "ignores", "import", "line-endings",
    "no-assert", "no-get-exception", "no-illegal-filenames", "no-smart-quotes", "pep8", "pylint",
    "replace-urlopen", "runtime-metadata", "shebang", "symlinks", "use-argspec-type-path",
    "use-compat-six", "validate-modules", "yamllint",
)  # fmt: skip
SANITY_NOTHING_TO_CHECK = ("changelog", "empty-init", "pslint", "shellcheck")


@pytest.mark.package
@pytest.mark.timeout(900)
def test_ansible_test_sanity_passes_offline(tmp_path):
    """Every sanity test of ansible-test, on this Python, in venvs made without the network."""
    home = tmp_path / "home"
    cache = home / ".ansible" / "test" / "cache"
    cache.mkdir(parents=True)
    (cache / "get_pip_24_2.py").write_text(GET_PIP)
    # ansible-test runs pip with HOME as its home: pip's user configuration (the index) too.
    for config in (Path.home() / ".config" / "pip", Path.home() / ".pip"):
        if config.is_dir():
            shutil.copytree(config, home / config.relative_to(Path.home()))
    copy = tmp_path / "ansible_collections" / "qmpshutdown" / "qemu"
    shutil.copytree(COLLECTION, copy, ignore=shutil.ignore_patterns("output", "__pycache__"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = environment(tmp_path, HOME=str(home))
    # nice: its linters are CPU work that no clock times, beside real guests whose stops are.
    argv = ["nice", "-n", "10", tool("ansible-test"), "sanity", "--python", python, "-v"]
    proc = subprocess.run(
        [*argv, "--color", "no"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=840, check=False,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ran, idle, name = set(), set(), None
    for line in out.splitlines():
        if line.startswith('Running sanity test "'):
            name = line.split('"')[1]
            ran.add(name)
        elif line == "No tests applicable." and name is not None:
            idle.add(name)
    assert ran - idle == set(SANITY_RUN), out[-3000:]
    assert idle == set(SANITY_NOTHING_TO_CHECK)


def test_targets_become_jobs_named_as_given_with_the_agent_and_all_finds_only_matches(
    runner, tmp_path
):
    base = {"targets": None, "all": False, "match": None, "agent": None}
    jobs, labels, left = runner.jobs_from(
        {**base, "targets": ["/run/vm1/qmp.sock", "10.0.0.5:4444", "[::1]:4445"]}
    )
    assert [job.target for job in jobs] == [
        "/run/vm1/qmp.sock", ("10.0.0.5", 4444), ("::1", 4445),
    ]  # fmt: skip
    assert labels == [job.name for job in jobs] == ["/run/vm1/qmp.sock", "10.0.0.5:4444",
                                                    "[::1]:4445"]  # fmt: skip
    assert (left, {job.agent for job in jobs}, {job.pid for job in jobs}) == ([], {None}, {None})
    (job,), _, _ = runner.jobs_from({**base, "targets": ["/vm.sock"], "agent": "/qga.sock"})
    assert job.agent == "/qga.sock"
    assert runner.jobs_from({**base, "targets": []}) == ([], [], [])
    assert runner.jobs_from({**base, "all": True, "match": [f"{tmp_path}/*"]}) == ([], [], [])
