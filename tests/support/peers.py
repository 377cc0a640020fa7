"""Servers that are not QEMU, for the hostile-world tests (tests/test_bad_input.py).

Run one per process, so that a test can check afterwards that the library
never signalled it::

    python tests/support/peers.py BEHAVIOUR SOCKET_PATH [--log FILE] [--accept-delay S]
    python tests/support/peers.py BEHAVIOUR --tcp PORT_FILE [--log FILE] [--accept-delay S]

The unix socket appears at SOCKET_PATH only once it listens (it is bound
under a temporary name and renamed); with ``--tcp`` the server listens on
127.0.0.1 on a free port and writes the port to PORT_FILE (atomically, once
it listens). The log gets a line ``accept`` per connection, ``command
NAME`` per command read and ``signal NAME`` per catchable signal received
(which is otherwise ignored), so a test can tell what was sent to it, and
that it was never signalled, even by a signal that would not kill it.

The server accepts connection after connection (each in its own thread) and
never exits on its own, except when the process that started it is gone (so
a crashed test run leaves no server behind).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

#: What QEMU 7.2 sends first.
GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""},
        "capabilities": ["oob"],
    }
}
#: Where main() was told to log (see the module docstring).
LOG: str | None = None
#: One byte over 16 MiB, longer than any line qemu.qmp reads (10 MiB).
LONG = 16 * 1024 * 1024 + 1


def line(msg: object) -> bytes:
    return json.dumps(msg).encode() + b"\r\n"


def long_line() -> bytes:
    return b'{"return": "' + b"x" * (LONG - 16) + b'"}\r\n'


class Client:
    """One accepted connection: send bytes, read commands, hold it open."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def command(self) -> dict[str, object] | None:
        """Read the next command; None once the client left.

        qemu.qmp sends no newline after a command: like QEMU, read a stream of
        JSON values, not lines.
        """
        while True:
            text = self._buffer.lstrip()
            if text:
                try:
                    msg, end = self._decoder.raw_decode(text)
                except ValueError:
                    if len(text) > 1 << 20:  # never a command: drop it
                        text = ""
                else:
                    self._buffer = text[end:]
                    msg = msg if isinstance(msg, dict) else {}
                    write_log(LOG, f"command {msg.get('execute')}")
                    return msg
            chunk = self.conn.recv(65536)
            if not chunk:
                return None
            self._buffer = text + chunk.decode(errors="replace")

    def hold(self) -> None:
        """Keep the connection open, dropping what comes, until the client leaves."""
        while self.conn.recv(65536):
            pass

    def negotiate(self) -> bool:
        """Greet and accept qmp_capabilities like QEMU; False if the client left."""
        self.send(line(GREETING))
        msg = self.command()
        if msg is None:
            return False
        self.send(reply(msg, {}))
        return True

    def answer(self, respond: Callable[[dict[str, object]], bytes]) -> None:
        """Answer every command with ``respond(command)`` until the client leaves."""
        while (msg := self.command()) is not None:
            self.send(respond(msg))


def reply(msg: dict[str, object], result: object) -> bytes:
    """A success reply to *msg*, with its id when it had one (like QEMU)."""
    out: dict[str, object] = {"return": result}
    if "id" in msg:
        out["id"] = msg["id"]
    return line(out)


def event(name: str) -> bytes:
    now = time.time()
    stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
    return line({"event": name, "timestamp": stamp})


# ---- the behaviours: one function per way of not being QEMU ----------------------


def garbage(client: Client) -> None:
    client.send(b"\x00\xff\xfe NOT JSON {{{ \x1b[31m\r\n" * 4 + bytes(range(256)) + b"\n")
    client.hold()


def http(client: Client) -> None:
    client.send(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
        b"Connection: close\r\n\r\nBad Request"
    )


def silent(client: Client) -> None:
    client.hold()


def close(client: Client) -> None:
    pass


def half_greeting(client: Client) -> None:
    greeting = line(GREETING)
    client.send(greeting[: len(greeting) // 2])


def deaf_negotiation(client: Client) -> None:
    client.send(line(GREETING))
    client.hold()


def refuse_capabilities(client: Client) -> None:
    client.send(line(GREETING))
    msg = client.command()
    if msg is not None:
        error = {"class": "CommandNotFound", "desc": "qmp_capabilities has not been found"}
        client.send(line({"error": error, **({"id": msg["id"]} if "id" in msg else {})}))
        client.hold()


def long_greeting(client: Client) -> None:
    client.send(long_line())
    client.hold()


def long_reply(client: Client) -> None:
    if client.negotiate():
        client.answer(lambda msg: long_line())


def malformed_reply(client: Client) -> None:
    if client.negotiate():
        client.answer(lambda msg: b'{"return": {"status": "running", \r\n')


def wrong_ids(client: Client) -> None:
    def respond(msg: dict[str, object]) -> bytes:
        return line({"return": {"status": "running"}, "id": f"not-{msg.get('id')}"})

    if client.negotiate():
        client.answer(respond)


def impostor(client: Client) -> None:
    """Answers like a running QEMU (and emits POWERDOWN on a press), but never stops."""

    def respond(msg: dict[str, object]) -> bytes:
        command = msg.get("execute")
        if command == "query-status":
            return reply(msg, {"status": "running", "running": True, "singlestep": False})
        if command == "system_powerdown":
            return reply(msg, {}) + event("POWERDOWN")
        return reply(msg, {})

    if client.negotiate():
        client.answer(respond)


def events_first(client: Client) -> None:
    """Events before the greeting (QEMU 7.2 loading a state did this), then an impostor."""
    client.send(event("STOP") + event("RESUME"))
    impostor(client)


BEHAVIOURS: dict[str, Callable[[Client], None]] = {
    "garbage": garbage,
    "http": http,
    "silent": silent,
    "close": close,
    "half-greeting": half_greeting,
    "deaf-negotiation": deaf_negotiation,
    "refuse-capabilities": refuse_capabilities,
    "long-greeting": long_greeting,
    "long-reply": long_reply,
    "events-first": events_first,
    "malformed-reply": malformed_reply,
    "wrong-ids": wrong_ids,
    "impostor": impostor,
}


# ---- the server ------------------------------------------------------------------


def serve_one(conn: socket.socket, behave: Callable[[Client], None]) -> None:
    try:
        with conn:
            behave(Client(conn))
    except OSError:  # the client left mid-write (EPIPE, reset): expected, serve the next
        pass


def record_signals(log: str | None) -> None:
    """Log (and otherwise ignore) every signal someone else could have sent."""

    def note(signum: int, frame: object) -> None:
        write_log(log, f"signal {signal.Signals(signum).name}")

    # Not these: KILL and STOP cannot be caught; the kernel sends CHLD and WINCH on its
    # own, and PIPE on a write to a client that left (Python ignores it: EPIPE instead).
    own = (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH, signal.SIGPIPE)
    for signum in signal.valid_signals():
        if signum in own:
            continue
        with contextlib.suppress(OSError, ValueError):  # e.g. reserved by the C library
            signal.signal(signum, note)


def write_log(log: str | None, what: str) -> None:
    if log is not None:
        with open(log, "a") as out:
            out.write(f"{what}\n")


def listen(args: argparse.Namespace) -> socket.socket:
    if args.tcp:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        tmp = f"{args.address}.tmp"
        with open(tmp, "w") as out:
            out.write(f"{server.getsockname()[1]}\n")
        os.replace(tmp, args.address)
        return server
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{args.address}.tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    server.bind(tmp)
    server.listen(16)
    os.replace(tmp, args.address)  # appears only once it listens
    return server


def exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("behaviour", choices=sorted(BEHAVIOURS))
    parser.add_argument("address", help="the unix socket path (with --tcp: the port file)")
    parser.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 instead")
    parser.add_argument(
        "--log", help="append 'accept' per connection and 'signal NAME' per signal here"
    )
    parser.add_argument(
        "--accept-delay",
        type=float,
        default=0.0,
        help="wait this long before each accept (a busy QEMU accepts late)",
    )
    args = parser.parse_args(argv)
    global LOG
    LOG = args.log
    record_signals(args.log)
    threading.Thread(target=exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    behave = BEHAVIOURS[args.behaviour]
    server = listen(args)
    while True:
        if args.accept_delay:
            # Leave the next client waiting in the backlog, connected but not yet accepted.
            select.select([server], [], [])
            time.sleep(args.accept_delay)
        try:
            conn, _ = server.accept()
        except OSError:  # e.g. out of fds for a moment: keep serving
            time.sleep(0.05)
            continue
        write_log(args.log, "accept")
        threading.Thread(target=serve_one, args=(conn, behave), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
