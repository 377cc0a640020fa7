"""Run the collection ``qmpshutdown.qemu`` (``ansible/``) with real ansible-core commands.

Every run is a subprocess with its own ``ANSIBLE_HOME`` and temp dirs under the
test's tmp dir, the collection of this checkout (``ANSIBLE_COLLECTIONS_PATH``),
and this interpreter on the managed host (``localhost``, connection ``local``),
with this checkout's library importable (``PYTHONPATH``). A play hands its
registered results back through a JSON file it writes (:func:`play`).

Without ansible-core the tests are skipped, except under ``CI=true``, where
that is a failure (as for QEMU: CI must never pass by skipping).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

from support.guests import REPO_ROOT

#: Where ``ANSIBLE_COLLECTIONS_PATH`` points: the collection is at
#: ``ansible_collections/qmpshutdown/qemu/`` below it.
COLLECTIONS = REPO_ROOT / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "qmpshutdown" / "qemu"
BIN = Path(sys.executable).parent


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tool(name: str) -> str:
    """The path of an ansible-core command beside this interpreter (skip or fail without it)."""
    path = BIN / name
    if not path.is_file():
        reason = (f"{name} not found beside {sys.executable}: install the test extra "
                  "(pip install -e '.[test]' installs ansible-core)")  # fmt: skip
        if in_ci():
            pytest.fail(f"{reason} (CI=true: the Ansible tests must run, not skip)", pytrace=False)
        pytest.skip(reason)
    return str(path)


def environment(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of an ansible-core command: its own home and temp dirs, our collection."""
    home = tmp / "ansible-home"
    for sub in ("local-tmp", "remote-tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # ansible-playbook polls its workers every internal_poll_interval (default 1 ms): a CPU
    # of its own while a task runs, taken from the guests that tests time. No env var sets it.
    config = home / "ansible.cfg"
    config.write_text("[defaults]\ninternal_poll_interval = 0.05\n")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ANSIBLE_") and key not in ("PYTHONPATH", "LANG", "LC_ALL")
    }
    env.update(
        ANSIBLE_CONFIG=str(config),
        ANSIBLE_HOME=str(home),
        ANSIBLE_LOCAL_TEMP=str(home / "local-tmp"),
        ANSIBLE_REMOTE_TEMP=str(home / "remote-tmp"),
        ANSIBLE_COLLECTIONS_PATH=str(COLLECTIONS),
        ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="false",
        ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        # The managed host's library is this checkout's (the modules import it there).
        PYTHONPATH=str(REPO_ROOT),
        # ansible-core refuses to start under a locale whose encoding is not UTF-8.
        LC_ALL="C.UTF-8",
    )
    env.update(extra)
    return env


@attrs.frozen
class Played:
    """One ``ansible-playbook`` run: its exit status, output, and what the play registered."""

    status: int
    out: str
    err: str
    registered: Mapping[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.registered[name]


def play(
    tmp: Path,
    tasks: Sequence[Mapping[str, Any]],
    *,
    check: bool = False,
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> Played:
    """Run *tasks* as one play on localhost (``-c local``); return what they registered.

    Each task that has ``register: NAME`` is handed back as ``registered[NAME]``:
    a last task (run even when one before failed) writes them all to a JSON file.
    """
    names = [task["register"] for task in tasks if "register" in task]
    dump = tmp / "registered.json"
    collect = "{" + ", ".join(f"'{n}': {n} | default(None)" for n in names) + "}"
    playbook = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "block": list(tasks),
                    "always": [{
                        "name": "hand back what the tasks registered",
                        "ansible.builtin.copy": {"dest": str(dump),
                                                 "content": "{{ " + collect + " | to_json }}"},
                        "check_mode": False,
                    }],
                }
            ],
        }
    ]  # fmt: skip
    path = tmp / "play.yml"
    path.write_text(json.dumps(playbook, indent=1))  # JSON is YAML
    argv = [tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(path)]
    if check:
        argv.append("--check")
    dump.unlink(missing_ok=True)
    proc = subprocess.run(
        argv, cwd=tmp, env=environment(tmp, **(env or {})), capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    registered = json.loads(dump.read_text()) if dump.exists() else {}
    return Played(proc.returncode, proc.stdout, proc.stderr, registered)


def run_tool(
    tmp: Path, name: str, *args: str | os.PathLike[str], cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Run an ansible-core command (``ansible-doc``, ``ansible-galaxy``, ``ansible-test``)."""
    return subprocess.run(
        [tool(name), *map(str, args)], cwd=cwd or tmp, env=environment(tmp), capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def run_playbook(
    tmp: Path, playbook: Path, extra_vars: Mapping[str, Any], *, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a playbook file on localhost (``-c local``) with *extra_vars* (``-e`` JSON)."""
    argv = [tool("ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
            "-e", json.dumps(dict(extra_vars))]  # fmt: skip
    return subprocess.run(
        argv, cwd=tmp, env=environment(tmp), capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
