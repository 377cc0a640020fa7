"""Manifests: written atomically (0600), read back strictly; a bad one runs nothing.

Restores of real guests: tests/guests/test_discover_guests.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import anyio
import pytest

from qmpshutdown._discover import describe
from qmpshutdown._revive import ManifestError, read_manifest, restore_dir, write_manifest

QEMU = "/usr/bin/qemu-system-x86_64"
ARGV = [QEMU, "-name", "web", "-qmp", "unix:qmp.sock,server=on,wait=off", "-S"]


def saved(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "web-20261202T000000-abcd.qemu-state"
    state.write_bytes(b"QEVM")
    manifest = Path(write_manifest(describe(77, ARGV, "/srv/web"), str(state)))
    return state, manifest


def test_a_manifest_is_written_0600_beside_its_state_and_read_back(tmp_path: Path) -> None:
    state, manifest = saved(tmp_path)
    assert manifest == Path(f"{state}.manifest.json")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, manifest.name]  # no temp
    back = read_manifest(str(manifest))
    assert (back.name, back.argv, back.cwd, back.state) == (
        "web",
        tuple(ARGV),
        "/srv/web",
        str(state),
    )
    assert back.socket == "/srv/web/qmp.sock"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"format": "other"}, "not a qmpshutdown manifest"),
        ({"version": 2}, "manifest version 2, not 1"),
        ({"argv": []}, "corrupt: argv is not a list of strings"),
        (
            {"argv": ["/bin/sh", "-c", "touch /tmp/x"]},
            "its program '/bin/sh' is not a QEMU system emulator",
        ),
        ({"cwd": "relative"}, "corrupt: cwd is not an absolute path"),
        ({"name": ""}, "corrupt: no name"),
        ({"state": "../elsewhere.qemu-state"}, "corrupt: state is not a file name"),
    ],
)
def test_a_manifest_that_is_not_ours_or_corrupt_is_refused(
    tmp_path: Path, change: dict[str, object], error: str
) -> None:
    _, manifest = saved(tmp_path)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), **change}))
    with pytest.raises(ManifestError) as raised:
        read_manifest(str(manifest))
    assert str(raised.value) == error


def test_missing_state_and_garbage(tmp_path: Path) -> None:
    state, manifest = saved(tmp_path)
    state.unlink()
    with pytest.raises(ManifestError, match=r"its state file .* is missing"):
        read_manifest(str(manifest))
    manifest.write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read it"):
        read_manifest(str(manifest))


def test_restore_dir_reports_each_bad_manifest_and_starts_nothing(tmp_path: Path) -> None:
    state, manifest = saved(tmp_path)
    evil = tmp_path / "evil.manifest.json"
    evil.write_text(json.dumps({"format": "qmpshutdown-manifest", "version": 1, "name": "e",
                                "argv": ["/bin/touch", str(tmp_path / "pwned")], "cwd": "/",
                                "state": state.name}))  # fmt: skip
    (tmp_path / "junk.manifest.json").write_bytes(b"\xff\x00")
    state.unlink()
    rows = anyio.run(restore_dir, str(tmp_path))
    assert [(r.name, r.outcome, r.pid) for r in rows] == [
        ("evil", "bad-manifest", None),
        ("junk", "bad-manifest", None),
        (state.name, "bad-manifest", None),
    ]
    assert not (tmp_path / "pwned").exists()
    assert manifest.exists()  # kept: nothing was started
    assert anyio.run(restore_dir, str(tmp_path / "nowhere"))[0].outcome == "bad-manifest"
