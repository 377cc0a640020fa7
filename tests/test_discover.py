"""Discovery as pure parsing of QEMU command lines, and over fake ``/proc`` trees.

Real QEMUs started as users start them: tests/guests/test_discover_guests.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import qmpshutdown
from qmpshutdown._discover import MANAGER_ROOTS, describe, manager_of, scan
from qmpshutdown._qemuargs import parse_options, split_options

QEMU = "/usr/bin/qemu-system-x86_64"


def found(*args: str, cwd: str | None = "/srv/vm", pid: int = 4242):
    return describe(pid, [QEMU, *args], cwd)


def test_commas_are_doubled_inside_values() -> None:
    assert split_options("socket,id=a,path=/x,,y,server=on") == [
        "socket", "id=a", "path=/x,y", "server=on"
    ]  # fmt: skip
    assert parse_options("guest=db,,1,debug-threads=on", implied="guest") == {
        "guest": "db,1", "debug-threads": "on"
    }  # fmt: skip


def test_bare_flags_and_the_old_no_spelling() -> None:
    assert parse_options("/run/x.sock,server,nowait", implied="address") == {
        "address": "/run/x.sock", "server": "on", "wait": "off"
    }  # fmt: skip
    assert parse_options("nodelay")["nodelay"] == "on"


@pytest.mark.parametrize(
    "spec",
    ["unix:/run/vm/qmp.sock,server=on,wait=off", "unix:/run/vm/qmp.sock,server,nowait",
     "unix:/run/vm/qmp.sock,server=on"],
)  # fmt: skip
def test_qmp_unix_in_every_spelling(spec: str) -> None:
    vm = found("-qmp", spec)
    assert (vm.target, vm.why, vm.name) == ("/run/vm/qmp.sock", None, "/run/vm/qmp.sock")
    assert found("--qmp", spec).target == "/run/vm/qmp.sock"


def test_a_pretty_printing_monitor_is_found_but_left_alone() -> None:
    why = (
        "its QMP monitor is pretty-printed (-qmp-pretty or pretty=on), which qemu.qmp "
        "cannot read: it cannot be reached"
    )
    vm = found("-qmp-pretty", "unix:/q,server=on")
    assert (vm.target, vm.why) == (None, why)
    vm = found("-chardev", "socket,id=c0,path=/q,server=on", "-mon", "c0,mode=control,pretty=on")
    assert (vm.target, vm.why) == (None, why)
    vm = found("-qmp-pretty", "unix:/p,server=on", "-qmp", "unix:/q,server=on")
    assert (vm.target, vm.why) == ("/q", None)


def test_qmp_tcp_with_and_without_a_host() -> None:
    assert found("-qmp", "tcp:127.0.0.2:4444,server=on,wait=off").target == ("127.0.0.2", 4444)
    assert found("-qmp", "tcp::4444,server,nowait").target == ("127.0.0.1", 4444)
    assert found("-qmp", "tcp:[::1]:4444,server=on").target == ("::1", 4444)
    assert found("-qmp", "tcp:0.0.0.0:4444,server=on").name == "127.0.0.1:4444"


def test_chardev_and_mon_control_in_any_order() -> None:
    vm = found("-mon", "chardev=c0,mode=control",
               "-chardev", "socket,id=c0,path=/run/vm/m.sock,server=on,wait=off")  # fmt: skip
    assert vm.target == "/run/vm/m.sock"
    vm = found("-chardev", "socket,id=c0,host=localhost,port=5555,server=on",
               "-mon", "c0,mode=control,pretty=off")  # fmt: skip
    assert vm.target == ("localhost", 5555)


def test_a_unix_monitor_is_preferred_to_tcp() -> None:
    vm = found("-qmp", "tcp:127.0.0.1:4444,server=on", "-qmp", "unix:/run/q.sock,server=on")
    assert vm.target == "/run/q.sock"


def test_human_monitors_are_not_qmp() -> None:
    vm = found("-monitor", "unix:/run/vm/hmp.sock,server=on,wait=off")
    assert vm.target is None
    assert vm.why == "only a human monitor (HMP) at /run/vm/hmp.sock: it needs a QMP monitor (-qmp)"
    vm = found("-chardev", "socket,id=h,path=/run/h.sock,server=on", "-mon", "chardev=h")
    assert vm.target is None and vm.why is not None and "human monitor" in vm.why
    assert found("-mon", "chardev=h,mode=readline",
                 "-chardev", "socket,id=h,path=/h,server=on").target is None  # fmt: skip


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((), "no QMP monitor on its command line"),
        (("-readconfig", "vm.cfg"), "no QMP monitor on its command line (-readconfig files are not read)"),  # noqa: E501
        (("-qmp", "stdio"), "its QMP monitor is 'stdio', not a socket: it cannot be reached"),
        (("-qmp", "unix:/run/q.sock"), "its QMP monitor is a client socket (QEMU connects out, server=off): it cannot be reached"),  # noqa: E501
        (("-chardev", "socket,id=m,fd=3,server=on", "-mon", "m,mode=control"), "its QMP monitor is a socket given by descriptor (fd=): it cannot be reached"),  # noqa: E501
        (("-chardev", "socket,id=m,path=q,abstract=on,server=on", "-mon", "m,mode=control"), "its QMP monitor is an abstract unix socket: it cannot be reached"),  # noqa: E501
        (("-mon", "nope,mode=control"), "its QMP monitor is a -mon whose chardev is not on the command line: it cannot be reached"),  # noqa: E501
        (("-chardev", "pty,id=m", "-mon", "m,mode=control"), "its QMP monitor is a pty chardev: it cannot be reached"),  # noqa: E501
    ],
)  # fmt: skip
def test_a_qemu_that_cannot_be_reached_says_why(args: tuple[str, ...], why: str) -> None:
    vm = found(*args)
    assert (vm.target, vm.why) == (None, why)


def test_one_reachable_monitor_is_enough() -> None:
    vm = found("-qmp", "stdio", "-qmp", "unix:/run/q.sock,server=on")
    assert (vm.target, vm.why) == ("/run/q.sock", None)


def test_name_in_both_forms_else_the_monitor() -> None:
    qmp = ("-qmp", "unix:/run/q.sock,server=on")
    assert found("-name", "web1", *qmp).name == "web1"
    assert found("-name", "guest=db,debug-threads=on", *qmp).name == "db"
    assert found("-name", "debug-threads=on,guest=x,,y", *qmp).name == "x,y"
    assert found("-name", "process=p", *qmp).name == "/run/q.sock"
    assert found(pid=7).name == "qemu-7"


def test_relative_paths_are_read_against_the_cwd() -> None:
    vm = found(
        "-qmp",
        "unix:qmp.sock,server=on",
        "-chardev",
        "socket,id=qga,path=../qga.sock,server=on",
        "-device",
        "virtserialport,chardev=qga,name=org.qemu.guest_agent.0",
        cwd="/srv/vm",
    )
    assert (vm.target, vm.agent) == ("/srv/vm/qmp.sock", "/srv/qga.sock")
    assert vm.sockets == ("/srv/qga.sock", "/srv/vm/qmp.sock")
    blind = found("-qmp", "unix:qmp.sock,server=on", cwd=None)
    assert blind.target is None
    assert blind.why == "its QMP socket 'qmp.sock' is relative and its cwd unreadable"


def test_paths_with_spaces_quotes_and_commas_stay_whole() -> None:
    odd = '/tmp/my vm\'s "dir"/a,b;c.sock'
    vm = found("-qmp", f"unix:{odd.replace(',', ',,')},server=on,wait=off")
    assert vm.target == odd
    assert vm.job() == qmpshutdown.Job(odd, pid=4242, name=odd)


def test_the_agent_from_a_virtserialport_in_keyval_or_json() -> None:
    qmp = ("-qmp", "unix:/q,server=on")
    chardev = ("-chardev", "socket,path=/run/qga.sock,server=on,wait=off,id=qga0")
    keyval = ("-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
    assert found(*qmp, *chardev, *keyval).agent == "/run/qga.sock"
    json = (
        "-device",
        '{"driver":"virtserialport","chardev":"qga0","name":"org.qemu.guest_agent.0"}',
    )
    assert found(*qmp, *chardev, *json).agent == "/run/qga.sock"
    other = ("-device", "virtserialport,chardev=qga0,name=com.example.port")
    assert found(*qmp, *chardev, *other).agent is None
    assert found(*qmp, *keyval).agent is None  # its chardev is not on the command line


@pytest.mark.parametrize(
    ("path", "manager"),
    [
        ("/var/lib/libvirt/qemu/domain-1-web/monitor.sock", "libvirt"),
        ("/run/libvirt/qemu/x.monitor", "libvirt"),
        ("/run/user/1000/libvirt/qemu/run/domain-2-x/monitor.sock", "libvirt"),
        ("/home/ann/.config/libvirt/qemu/lib/domain-3-y/monitor.sock", "libvirt"),
        ("/var/run/qemu-server/100.qmp", "Proxmox"),
        ("/run/qemu-server/100.qmp", "Proxmox"),
        ("/run/vm/libvirt-lookalike.sock", None),
        ("/srv/libvirt/qmp.sock", None),
    ],
)
def test_managed_monitors_are_known_by_where_they_live(path: str, manager: str | None) -> None:
    assert manager_of(path) == manager
    vm = found("-name", "guest=libvirt-web", "-qmp", f"unix:{path},server=on")
    if manager is None:
        assert vm.why is None
    else:
        assert vm.why == (f"managed by {manager} (its monitor is {path}): stop it through "
                          f"{manager}, not behind its back")  # fmt: skip


def test_libvirt_style_name_alone_is_not_managed() -> None:
    assert found("-name", "guest=web,debug-threads=on", "-qmp", "unix:/q,server=on").why is None
    assert ("libvirt", "/run/libvirt/*") in MANAGER_ROOTS


def test_match_globs_name_and_every_socket() -> None:
    vm = found("-name", "web1", "-qmp", "unix:/run/a/qmp.sock,server=on",
               "-chardev", "socket,id=g,path=/run/b/qga.sock,server=on")  # fmt: skip
    assert vm.matches(["web*"]) and vm.matches(["/run/b/*"]) and vm.matches(["x", "*/a/*"])
    assert not vm.matches(["db*", "/run/c/*"])


# ---- a fake /proc ------------------------------------------------------------------


def fake_process(proc: Path, pid: int, argv: list[str], *, exe: str = QEMU, cwd: str = "/") -> Path:
    entry = proc / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"".join(os.fsencode(a) + b"\0" for a in argv))
    (entry / "exe").symlink_to(exe)
    (entry / "cwd").symlink_to(cwd)
    (entry / "root").symlink_to("/")
    return entry


def test_scan_reads_a_proc_tree_and_leaves_non_qemu_and_vanished_alone(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "root").symlink_to("/")
    fake_process(proc, 10, [QEMU, "-name", "a", "-qmp", "unix:q.sock,server=on"], cwd="/srv/a")
    fake_process(
        proc, 11, ["/usr/bin/python3", "-qmp", "unix:/x,server=on"], exe="/usr/bin/python3"
    )
    fake_process(proc, 12, [QEMU, "-monitor", "stdio"])
    gone = fake_process(proc, 13, [QEMU])
    (gone / "cmdline").unlink()  # exited while we looked
    empty = fake_process(proc, 14, [])  # a zombie
    assert empty.exists()
    wrapped = fake_process(proc, 15, ["qemu-system-aarch64", "-qmp", "unix:/b,server=on"],
                           exe="/nonexistent")  # fmt: skip
    (wrapped / "exe").unlink()  # another user's: its exe unreadable, argv[0] tells
    (proc / "uptime").write_text("1 1\n")
    vms = scan(proc=str(proc))
    assert [(vm.pid, vm.name, vm.target) for vm in vms] == [
        (10, "a", "/srv/a/q.sock"), (12, "qemu-12", None), (15, "/b", "/b")
    ]  # fmt: skip
    assert vms[1].why == "no QMP monitor on its command line"
    assert [vm.pid for vm in scan(["a"], proc=str(proc))] == [10]


def test_scan_reports_a_qemu_in_another_root(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "root").symlink_to("/")
    entry = fake_process(proc, 20, [QEMU, "-qmp", "unix:/q,server=on"])
    (entry / "root").unlink()
    (entry / "root").symlink_to(tmp_path)
    (vm,) = scan(proc=str(proc))
    assert (
        vm.why == "it runs in another root (a container or chroot): its socket paths are not ours"
    )


def test_scan_skips_an_unreadable_command_line(tmp_path: Path, monkeypatch) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    fake_process(proc, 30, [QEMU, "-qmp", "unix:/q,server=on"])
    fake_process(proc, 31, [QEMU, "-qmp", "unix:/r,server=on"])
    real_open = open

    def guarded(path, *args, **kwargs):
        if str(path).endswith("/30/cmdline"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded)
    assert [vm.pid for vm in scan(proc=str(proc))] == [31]


def test_discover_returns_jobs_and_checks_match() -> None:
    assert all(isinstance(job, qmpshutdown.Job) and job.pid for job in qmpshutdown.discover())
    assert qmpshutdown.discover("no-such-vm-*-" + os.urandom(4).hex()) == ()
    with pytest.raises(TypeError):
        qmpshutdown.discover([""])


def test_list_rows() -> None:
    vm = found("-name", "web", "-qmp", "unix:/q,server=on")
    assert vm.to_dict() == {"pid": 4242, "name": "web", "target": "/q", "agent": None}
    assert found().to_dict()["why"] == "no QMP monitor on its command line"
    assert found().to_dict()["target"] is None
