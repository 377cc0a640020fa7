"""A listener whose ``SO_PEERCRED`` pid names a process that never held its socket.

    python tests/support/liar.py MODE SOCKET_PATH CHILD_PID_FILE -- PROGRAM [ARG...]

Listens on SOCKET_PATH (bound under a temporary name and renamed once it
listens), forks a child that keeps the socket, then ``exec``s PROGRAM in this
very process: same pid, so the kernel's ``SO_PEERCRED`` (recorded at
``listen()``) names PROGRAM, yet PROGRAM does not hold the socket (Python's
sockets are close-on-exec). With a real QEMU as PROGRAM, a library that
trusts the pid would signal a VM that never owned the socket.

The child, per MODE:

* ``backlog``  never accepts: connections wait in the listen queue;
* ``silent``   accepts each connection and never sends a byte;
* ``impostor`` accepts and answers like a running QEMU (tests/support/peers.py's ``impostor``).

The child writes its pid to CHILD_PID_FILE, and exits once PROGRAM (its
parent) is gone, so nothing outlives the test.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import peers

MODES = ("backlog", "silent", "impostor")


def serve(server: socket.socket, mode: str) -> None:
    held: list[socket.socket] = []  # silent: keep every connection open, unread
    while True:
        conn, _ = server.accept()
        if mode == "silent":
            held.append(conn)
        else:
            answer = threading.Thread(target=peers.serve_one, args=(conn, peers.impostor))
            answer.daemon = True
            answer.start()


def child(server: socket.socket, mode: str, pid_file: str, parent: int) -> None:
    tmp = f"{pid_file}.tmp"
    with open(tmp, "w") as out:
        out.write(f"{os.getpid()}\n")
    os.replace(tmp, pid_file)
    if mode != "backlog":
        threading.Thread(target=serve, args=(server, mode), daemon=True).start()
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--" or argv[0] not in MODES:
        print(__doc__, file=sys.stderr)
        return 2
    mode, path, pid_file, program = argv[0], argv[1], argv[2], argv[4:]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
    server.bind(f"{path}.tmp")
    server.listen(16)
    os.replace(f"{path}.tmp", path)
    parent = os.getpid()
    if os.fork() == 0:
        try:
            child(server, mode, pid_file, parent)
        finally:
            os._exit(1)
    server.close()  # exec would close it anyway: PROGRAM never holds the socket
    os.execvp(program[0], program)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
