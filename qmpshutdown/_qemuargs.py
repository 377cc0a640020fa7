"""QEMU's command line as plain values: its option syntax, its monitors, its agent (no I/O).

``parse_command_line(argv)`` reads what reaching a QEMU takes from its argv:
its ``-name``, its QMP monitors (``-qmp``, ``-qmp-pretty``, ``-chardev`` +
``-mon mode=control``), its human monitors, and the chardev behind the guest
agent's port. :mod:`._discover` reads the argv from ``/proc``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

#: The virtio-serial port name qemu-ga looks for.
AGENT_PORT = "org.qemu.guest_agent.0"

#: The options whose argument tells us something (QEMU also accepts them as ``--x``).
_WITH_ARGUMENT = frozenset(
    {"-qmp", "-qmp-pretty", "-monitor", "-mon", "-chardev", "-name", "-device", "-readconfig"}
)

Address = str | tuple[str, int]
#: Why a pretty-printing QMP monitor (``-qmp-pretty``, ``pretty=on``) is left alone.
PRETTY = "pretty-printed (-qmp-pretty or pretty=on), which qemu.qmp cannot read"


@attrs.frozen(kw_only=True)
class Chardev:
    """Where a character device's socket is (only what reaching it takes)."""

    backend: str  #: ``socket`` for a socket; anything else cannot be reached
    path: str | None = None  #: a unix socket's path, as written
    host: str | None = None
    port: int | None = None
    server: bool = False
    why: str | None = None  #: why it cannot be reached, when it cannot


def format_address(address: Address) -> str:
    """``PATH``, ``HOST:PORT`` or ``[ADDR]:PORT``."""
    if isinstance(address, str):
        return address
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_options(text: str) -> list[str]:
    """Split ``a=1,b=x,,y`` at single commas (QEMU doubles a comma inside a value)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_options(text: str, implied: str | None = None) -> dict[str, str]:
    """QEMU's ``key=value,...``: a first part without ``=`` is *implied*'s value.

    A bare ``flag`` is ``flag=on``, and ``noflag`` ``flag=off`` (the old spelling).
    """
    options: dict[str, str] = {}
    for index, part in enumerate(split_options(text)):
        key, equals, value = part.partition("=")
        if equals:
            options.setdefault(key, value)
        elif index == 0 and implied is not None:
            options.setdefault(implied, part)
        elif part.startswith("no") and part != "nodelay":
            options.setdefault(part[2:], "off")
        elif part:
            options.setdefault(part, "on")
    return options


def _on(value: str | None) -> bool:
    return value in ("on", "yes", "true", "y")


def _chardev(options: dict[str, str]) -> Chardev:
    backend = options.get("backend", "")
    if backend != "socket":
        return Chardev(backend=backend or "?", why=f"a {backend or 'non-socket'} chardev")
    server = _on(options.get("server"))
    if "fd" in options:
        return Chardev(backend="socket", server=server, why="a socket given by descriptor (fd=)")
    if _on(options.get("abstract")):
        return Chardev(backend="socket", server=server, why="an abstract unix socket")
    why = None if server else "a client socket (QEMU connects out, server=off)"
    if "path" in options:
        return Chardev(backend="socket", path=options["path"], server=server, why=why)
    port = options.get("port", "")
    if port.isascii() and port.isdigit():
        return Chardev(backend="socket", host=options.get("host", ""), port=int(port),
                       server=server, why=why)  # fmt: skip
    return Chardev(backend="socket", server=server, why="a socket with no path and no port")


def parse_chardev_spec(spec: str) -> Chardev:
    """The legacy chardev of ``-qmp``/``-monitor``: ``unix:PATH,...``, ``tcp:HOST:PORT,...``."""
    kind, colon, rest = spec.partition(":")
    if not colon or kind not in ("unix", "tcp", "telnet", "websocket"):
        return Chardev(backend=kind, why=f"{spec.split(',')[0]!r}, not a socket")
    options = parse_options(rest, implied="address")
    address = options.pop("address", "")
    options["backend"] = "socket"
    if kind == "unix":
        options["path"] = address
    else:
        host, _, port = address.rpartition(":")
        options["host"], options["port"] = host.strip("[]"), port
    return _chardev(options)


def _device(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("{"):  # QEMU >= 6 takes -device as JSON (libvirt does)
        try:
            value = json.loads(text)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return dict(parse_options(text, implied="driver"))


@attrs.frozen(kw_only=True)
class CommandLine:
    """What a QEMU command line says about reaching it."""

    name: str | None
    qmp: tuple[Chardev, ...]  #: its QMP monitors, in order
    human: tuple[Chardev, ...]  #: its human monitors (HMP)
    agent: Chardev | None
    chardevs: tuple[Chardev, ...]  #: every chardev of the command line
    readconfig: bool


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Read a QEMU command line's name, monitors and agent (no I/O)."""
    chardevs: dict[str, Chardev] = {}
    qmp: list[Chardev | str] = []  # a str: a chardev id, resolved at the end
    pretty: list[bool] = []  # for each of qmp: does it pretty-print?
    human: list[Chardev | str] = []
    agent_id: str | None = None
    name: str | None = None
    readconfig = False
    items = list(argv[1:])
    for index, raw in enumerate(items):
        option = raw[1:] if raw.startswith("--") else raw
        if option not in _WITH_ARGUMENT or index + 1 >= len(items):
            continue
        value = items[index + 1]
        if option in ("-qmp", "-qmp-pretty"):
            qmp.append(parse_chardev_spec(value))
            pretty.append(option == "-qmp-pretty")
        elif option == "-monitor":
            human.append(parse_chardev_spec(value))
        elif option == "-mon":
            options = parse_options(value, implied="chardev")
            wanted = qmp if options.get("mode") == "control" else human
            wanted.append(options.get("chardev", ""))
            if wanted is qmp:
                pretty.append(_on(options.get("pretty")))
        elif option == "-chardev":
            options = parse_options(value, implied="backend")
            chardevs.setdefault(options.get("id", ""), _chardev(options))
        elif option == "-name":
            name = parse_options(value, implied="guest").get("guest") or name
        elif option == "-device":
            device = _device(value)
            if device.get("name") == AGENT_PORT and isinstance(device.get("chardev"), str):
                agent_id = device["chardev"]
        elif option == "-readconfig":
            readconfig = True
    missing = Chardev(backend="?", why="a -mon whose chardev is not on the command line")

    def resolve(monitors: list[Chardev | str]) -> tuple[Chardev, ...]:
        return tuple(m if isinstance(m, Chardev) else chardevs.get(m, missing) for m in monitors)

    # qemu.qmp reads one JSON message per line: a pretty-printed monitor cannot be driven.
    monitors = tuple(
        attrs.evolve(dev, why=PRETTY) if wide and dev.why is None else dev
        for dev, wide in zip(resolve(qmp), pretty, strict=True)
    )
    return CommandLine(
        name=name,
        qmp=monitors,
        human=resolve(human),
        agent=None if agent_id is None else chardevs.get(agent_id),
        chardevs=tuple(chardevs.values()) + resolve(qmp) + resolve(human),
        readconfig=readconfig,
    )


def reboot_action(argv: Sequence[str]) -> str:
    """What QEMU does when its guest reboots, as its command line set it (no I/O).

    ``-no-reboot`` is ``shutdown``; ``-action reboot=X`` is X; the later one wins (QEMU
    applies them in order); neither is QEMU's default, ``reset``.
    """
    return _action(argv, "reboot", flag="-no-reboot", flagged="shutdown", default="reset")


def shutdown_action(argv: Sequence[str]) -> str:
    """What QEMU does when its guest powers off, as its command line set it (no I/O).

    ``-no-shutdown`` is ``pause``; ``-action shutdown=X`` is X; the later one wins;
    neither is QEMU's default, ``poweroff``.
    """
    return _action(argv, "shutdown", flag="-no-shutdown", flagged="pause", default="poweroff")


def _action(argv: Sequence[str], event: str, *, flag: str, flagged: str, default: str) -> str:
    """*event*'s action: *flag* sets *flagged*, ``-action EVENT=X`` sets X, the later wins."""
    action = default
    items = list(argv[1:])
    for index, raw in enumerate(items):
        option = raw[1:] if raw.startswith("--") else raw
        if option == flag:
            action = flagged
        elif option == "-action" and index + 1 < len(items):
            action = parse_options(items[index + 1]).get(event, action)
    return action


def without_incoming(argv: Sequence[str]) -> list[str]:
    """*argv* without its ``-incoming`` options (no I/O).

    A VM that was itself started from a state (``-incoming 'exec:cat FILE'``, or
    ``-incoming defer``) and is restored again must load the new state, not its old one:
    the caller appends its own ``-incoming``.
    """
    out: list[str] = []
    skip = False
    for raw in argv:
        if skip:
            skip = False
            continue
        option = raw[1:] if raw.startswith("--") else raw
        if option == "-incoming":
            skip = True
            continue
        out.append(raw)
    return out
