"""Evidence when a guest will not stop: the screenshot step, on real guests and as plain logic."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qmpshutdown
from qmpshutdown._ladder import console_tail
from qmpshutdown._rungs.screenshot import reserve, screenshot_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- names and files (plain logic) ------------------------------------------


@pytest.mark.parametrize(
    ("target", "stem"),
    [
        ("/tmp/x/ignores.qmp", "ignores"),
        ("/tmp/a b/qmp.sock", "qmp"),
        ("/run/vm:1/qmp.sock", "qmp"),
        ("127.0.0.1:4444", "127.0.0.1_4444"),
        ("[::1]:4444", "1_4444"),
        ("/vms/a very long name; with $(odd) chars.sock", "a_very_long_name"),
        ("/vms/-rf .sock", "rf"),
        ("../..", "qemu"),
        ("", "qemu"),
    ],
)
def test_a_screenshot_name_is_short_and_safe_for_any_target(target, stem):
    name = screenshot_name(target, 1234, "before-force")
    # The VM's name, a hash of the whole target, the moment (UTC) and the attempt.
    assert re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{8}}-before-force-\d{{6}}-\d+\.png", name)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name)
    assert not name.startswith((".", "-")) and len(name) <= 55
    assert screenshot_name(target, None, "end").startswith(f"{stem}-")


def test_names_differ_per_target_and_per_attempt():
    # "/a/b" and "/a_b" reduce to the same characters: the hash keeps them apart.
    names = {screenshot_name(t, 1, "end") for t in ("/a/b", "/a_b", "/a/b")}
    assert len(names) == 3
    # Two sockets of the same name in different directories: the same stem, not the same name.
    one, two = (screenshot_name(f"/{d}/qmp.sock", 1, "end") for d in ("x", "y"))
    assert one.split("-")[0] == two.split("-")[0] == "qmp"
    assert one.split("-")[1] != two.split("-")[1]


def test_reserve_never_overwrites(tmp_path):
    taken = tmp_path / "vm.png"
    taken.write_bytes(b"precious")
    path = reserve(str(tmp_path), "vm.png")
    assert path != str(taken) and Path(path).exists()
    assert taken.read_bytes() == b"precious"


def test_console_tail_keeps_the_last_lines(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("".join(f"line {n}\r\n" for n in range(200)))
    tail = console_tail(str(log))
    assert tail is not None and len(tail) == 50
    assert tail[0] == "line 150" and tail[-1] == "line 199"
    assert console_tail(str(tmp_path / "missing")) is None
    assert console_tail(None) is None


# ---- real guests --------------------------------------------------------------


@pytest.mark.parametrize("bad", [3, b"/tmp", ""])
def test_a_bad_evidence_dir_is_a_type_error_before_anything_is_sent(bad):
    with pytest.raises(TypeError, match="evidence_dir"):
        qmpshutdown.shutdown_sync("/nonexistent/qmp.sock", evidence_dir=bad)
