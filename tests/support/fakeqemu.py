"""A stand-in QEMU for profiling the library's own CPU cost (no guest, no TCG noise).

    fakeqemu.py SOCKET [DELAY_MS [VERSION]]

Serves QMP clients (one at a time) on a unix socket the way QEMU does for a cooperative
guest: greeting, ``qmp_capabilities``, ``query-status`` → running,
``system_powerdown`` → POWERDOWN, then after DELAY_MS (default 5) SHUTDOWN
``{"guest": true, "reason": "guest-shutdown"}`` and exit; ``set-action`` is answered
like any other command, or with CommandNotFound when VERSION (default 7.2) is older
than 6.0, as such a QEMU does. With ``FAKEQEMU_LOG`` set, each command's name is
appended to that file, a line each. The tests' ``fakes``
fixture and benchmarks/profile_cpu.py, fleetbench.py and longrun.py run it
through a copy of the interpreter named ``qemu-system-fake`` so that
qmpshutdown pins it like a real QEMU (it checks /proc/PID/exe).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time


def main(path: str, delay_ms: float, version: tuple[int, int] = (7, 2)) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind elsewhere and rename once listening: a client never meets a refusing socket.
    server.bind(path + ".tmp")
    server.listen(1)
    os.rename(path + ".tmp", path)
    server.settimeout(120)
    while True:  # like QEMU, serve the next client when one hangs up early
        conn, _ = server.accept()
        conn.settimeout(30)
        with contextlib.suppress(OSError):  # a client that hung up mid-way
            serve(conn, delay_ms, version)
        conn.close()


def serve(conn: socket.socket, delay_ms: float, version: tuple[int, int] = (7, 2)) -> None:
    """Serve one client until it hangs up (or this process exits)."""

    def send(obj: object) -> None:
        conn.sendall(json.dumps(obj).encode() + b"\n")

    def event(name: str, data: dict[str, object] | None = None) -> None:
        now = time.time()
        msg: dict[str, object] = {
            "event": name,
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
        }
        if data is not None:
            msg["data"] = data
        send(msg)

    major, minor = version
    log = os.environ.get("FAKEQEMU_LOG")
    send({"QMP": {"version": {"qemu": {"micro": 0, "minor": minor, "major": major}, "package": ""},
                  "capabilities": ["oob"]}})  # fmt: skip
    # Clients need not end a command with a newline (qemu.qmp does not): parse the stream.
    decoder = json.JSONDecoder()
    buffer = ""
    while True:
        buffer = buffer.lstrip()
        try:
            request, end = decoder.raw_decode(buffer)
        except json.JSONDecodeError:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buffer += chunk.decode()
            continue
        buffer = buffer[end:]
        command, ident = request.get("execute"), request.get("id")
        if log:
            with open(log, "a") as out:
                out.write(f"{command}\n")
        reply: dict[str, object] = {"return": {}}
        if command == "query-status":
            reply = {"return": {"status": "running", "singlestep": False, "running": True}}
        elif command == "set-action" and version < (6, 0):
            desc = "The command set-action has not been found"
            reply = {"error": {"class": "CommandNotFound", "desc": desc}}
        if ident is not None:
            reply["id"] = ident
        send(reply)
        if command == "system_powerdown":
            event("POWERDOWN")
            time.sleep(delay_ms / 1000)
            event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
            os._exit(0)  # QEMU exits a few ms after SHUTDOWN, closing the socket
        if command == "quit":
            event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            os._exit(0)


if __name__ == "__main__":
    given = sys.argv[3].split(".") if len(sys.argv) > 3 else ["7", "2"]
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 5.0,
         (int(given[0]), int(given[1])))  # fmt: skip
