"""The ``--fleet FILE`` of the command line: a host's VMs, read from JSON and validated.

The file is one JSON object with a list ``vms``; each entry names its VM's
``target`` (PATH, HOST:PORT or [ADDR]:PORT, as on the command line) and
optionally ``name``, ``pid``, ``agent``, ``group`` and ``policy`` (an object of
:class:`~qmpshutdown.ShutdownPolicy` fields, over the command line's policy)::

    {"vms": [
      {"target": "/run/qemu/db.qmp", "name": "db", "group": 1,
       "policy": {"powerdown_timeout": 120, "stages": ["powerdown", "quit"]}},
      {"target": "10.0.0.5:4444", "name": "web1", "pid": 4242}
    ]}

Every error is one line naming the file, the entry and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs

from ._job import Job
from ._policy import ShutdownPolicy

#: The keys an entry may have.
ENTRY_KEYS = ("target", "name", "pid", "agent", "group", "policy")
_POLICY_FIELDS = tuple(field.name for field in attrs.fields(ShutdownPolicy))


class FleetFileError(ValueError):
    """The fleet file cannot be read or an entry makes no sense (one line)."""


def load_fleet(
    path: str,
    policy: ShutdownPolicy,
    parse_target: Callable[[str], str | tuple[str, int]],
) -> list[tuple[str, Job]]:
    """Read the fleet file at *path*; return each VM's label (name or target) and :class:`Job`.

    :param policy: the policy an entry's ``policy`` overrides (the command line's).
    :param parse_target: turns a target as typed into an address.
    :raises FleetFileError: the file is missing, not JSON, or an entry is wrong.
    """
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except OSError as err:
        raise FleetFileError(f"{path}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FleetFileError(f"{path}: not JSON: {err}") from err
    if not isinstance(data, dict) or set(data) != {"vms"} or not isinstance(data["vms"], list):
        raise FleetFileError(f'{path}: want one JSON object {{"vms": [...]}}, one entry per VM')
    if not data["vms"]:
        raise FleetFileError(f"{path}: vms is empty")
    return [
        _entry(path, index, entry, policy, parse_target) for index, entry in enumerate(data["vms"])
    ]


def _entry(
    path: str,
    index: int,
    entry: Any,
    base: ShutdownPolicy,
    parse_target: Callable[[str], str | tuple[str, int]],
) -> tuple[str, Job]:
    where = f"{path}: vms[{index}]"
    if not isinstance(entry, dict):
        raise FleetFileError(f"{where}: an entry is an object with a target, not {entry!r}")
    if isinstance(entry.get("name"), str) and entry["name"]:
        where += f" ({entry['name']})"

    def bad(field: str, why: object) -> FleetFileError:
        return FleetFileError(f"{where}: {field}: {why}")

    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise bad(unknown[0], f"unknown key; an entry has {', '.join(ENTRY_KEYS)}")
    text = entry.get("target")
    if not isinstance(text, str):
        raise bad("target", f"a PATH, HOST:PORT or [ADDR]:PORT string is required, not {text!r}")
    try:
        address = parse_target(text)
    except ValueError as err:
        raise bad("target", err) from err
    policy = base
    overrides = entry.get("policy", {})
    if not isinstance(overrides, dict):
        raise bad("policy", f"an object of policy fields, not {overrides!r}")
    for field, value in overrides.items():  # one at a time, so that an error names its field
        if field not in _POLICY_FIELDS:
            raise bad(f"policy.{field}", f"unknown; the fields are {', '.join(_POLICY_FIELDS)}")
        try:
            policy = attrs.evolve(policy, **{field: value})
        except (TypeError, ValueError) as err:
            raise bad(f"policy.{field}", err) from err
    values: dict[str, Any] = {"policy": policy if overrides else None}
    for field in ("name", "pid", "agent", "group"):
        if field in entry:
            values[field] = entry[field]
    for field in ("name", "pid", "agent", "group"):  # the first wrong field is the one named
        if field in values:
            try:
                Job(address, **{field: values[field]})
            except (TypeError, ValueError) as err:
                raise bad(field, err) from err
    return entry.get("name") or text, Job(address, **values)
