"""The command line's fleets: ``--then`` groups, ``--deadline``, and the ``--fleet`` JSON file."""

from __future__ import annotations

import json

import pytest

from qmpshutdown import Job, ShutdownPolicy
from qmpshutdown._cli import main, parse_command_line

# ---- parsing, no QEMU -------------------------------------------------------


def test_then_starts_the_next_group():
    invocation = parse_command_line(["web1.sock", "--json", "web2.sock", "--then", "db.sock"])
    assert invocation.targets == ("web1.sock", "web2.sock", "db.sock")
    assert [(job.target, job.group) for job in invocation.jobs] == [
        ("web1.sock", 0), ("web2.sock", 0), ("db.sock", 1),
    ]  # fmt: skip
    assert invocation.json and invocation.deadline is None


def test_deadline_and_pid_reach_the_jobs():
    invocation = parse_command_line(["--deadline", "8", "--pid", "42", "127.0.0.1:4444"])
    assert invocation.deadline == 8.0
    assert invocation.jobs == (Job(("127.0.0.1", 4444), pid=42),)


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--then", "a"], "--then goes between targets"),
        (["a", "--then"], "--then goes between targets"),
        (["a", "--then", "--then", "b"], "--then goes between targets"),
        (["--deadline", "0", "a"], "--deadline"),
        (["--deadline", "nan", "a"], "--deadline"),
        (["--deadline", "x", "a"], "--deadline"),
        (["--fleet", "f.json", "a"], "--fleet FILE names the VMs"),
        (["--pid", "4", "--fleet", "f.json"], "--pid cannot be used with --fleet"),
        (["--fleet", "/nonexistent/f.json"], "/nonexistent/f.json: No such file"),
    ],
)
def test_bad_fleet_usage_is_exit_2_with_one_line(capsys, argv, mentions):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert mentions in err


def write(tmp_path, data) -> str:
    path = tmp_path / "fleet.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_a_good_fleet_file(tmp_path):
    path = write(tmp_path, {"vms": [
        {"target": "/run/db.qmp", "name": "db", "group": 1,
         "policy": {"kill_timeout": 1, "stages": ["powerdown", "quit"], "repress_interval": None}},
        {"target": "10.0.0.5:4444", "pid": 4242},
    ]})  # fmt: skip
    invocation = parse_command_line(["--timeout", "7", "--deadline", "30", "--fleet", path])
    assert invocation.targets == ("db", "10.0.0.5:4444")
    db, web = invocation.jobs
    assert db == Job("/run/db.qmp", name="db", group=1, policy=ShutdownPolicy(
        powerdown_timeout=7, kill_timeout=1, stages=("powerdown", "quit"), repress_interval=None
    ))  # fmt: skip
    assert web == Job(("10.0.0.5", 4444), pid=4242)  # the command line's policy
    assert invocation.policy == ShutdownPolicy(powerdown_timeout=7)
    assert invocation.deadline == 30


@pytest.mark.parametrize(
    ("data", "mentions"),
    [
        ("{not json", "not JSON"),
        ([], '{"vms": [...]}'),
        ({"vms": [], "extra": 1}, '{"vms": [...]}'),
        ({"vms": []}, "vms is empty"),
        ({"vms": ["/run/a.qmp"]}, "vms[0]: an entry is an object"),
        ({"vms": [{"name": "a"}]}, "vms[0] (a): target: a PATH"),
        ({"vms": [{"target": 5}]}, "vms[0]: target:"),
        ({"vms": [{"target": "h:1"}, {"target": "h:99999"}]}, "vms[1]: target: port 99999"),
        ({"vms": [{"target": "a", "gruop": 1}]}, "vms[0]: gruop: unknown key"),
        ({"vms": [{"target": "a", "name": "web", "pid": -1}]}, "vms[0] (web): pid:"),
        ({"vms": [{"target": "a", "pid": "12"}]}, "vms[0]: pid:"),
        ({"vms": [{"target": "a", "group": -1}]}, "vms[0]: group:"),
        ({"vms": [{"target": "a", "group": "first"}]}, "vms[0]: group:"),
        ({"vms": [{"target": "a", "name": 5}]}, "vms[0]: name:"),
        ({"vms": [{"target": "a", "agent": 3}]}, "vms[0]: agent:"),
        ({"vms": [{"target": "a", "policy": 5}]}, "vms[0]: policy: an object"),
        ({"vms": [{"target": "a", "policy": {"timeout": 5}}]}, "vms[0]: policy.timeout: unknown"),
        (
            {"vms": [{"target": "a", "policy": {"kill_timeout": -1}}]},
            "vms[0]: policy.kill_timeout: kill_timeout must be",
        ),
        (
            {"vms": [{"target": "a", "policy": {"stages": ["reboot"]}}]},
            "vms[0]: policy.stages: unknown stage",
        ),
    ],
)
def test_each_kind_of_bad_entry_is_exit_2_naming_it(capsys, tmp_path, data, mentions):
    path = write(tmp_path, data)
    assert main(["--fleet", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"qmpshutdown: error: {path}: ")
    assert mentions in err, err
