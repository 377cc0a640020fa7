"""Fuzz: random bytes and random well-formed but wrong QMP from a fake monitor.

A server in this very process plays the monitor (so its peer pid is our own,
which the library must never signal). Whatever it sends, shutdown() returns a
ShutdownResult or raises a qmpshutdown.Error, within the policy's bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qmpshutdown
from support.policies import FUZZ

POLICY = FUZZ
LIMIT = POLICY.bound + 1.0
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same inputs every run: a CI failure can be replayed
)

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
event_names = st.sampled_from(
    ["SHUTDOWN", "STOP", "RESUME", "POWERDOWN", "RESET", "SUSPEND", "WAKEUP", "GUEST_PANICKED"]
) | st.text(max_size=10)
events = st.fixed_dictionaries(
    {"event": event_names},
    optional={
        "data": st.dictionaries(
            st.sampled_from(["guest", "reason", "action"]), json_values, max_size=3
        )
        | json_values,
        "timestamp": st.fixed_dictionaries({"seconds": json_values, "microseconds": json_values})
        | json_values,
    },
)
#: What the fake monitor does with one command after the handshake.
replies = st.one_of(
    st.tuples(st.just("return"), json_values, st.booleans()),  # a reply; the right id or not
    st.tuples(
        st.just("error"),
        st.fixed_dictionaries({"class": st.text(max_size=8), "desc": st.text(max_size=8)})
        | json_values,
        st.booleans(),
    ),
    st.tuples(st.just("event"), events, st.booleans()),
    st.tuples(st.just("garbage"), st.binary(max_size=40), st.booleans()),
    st.tuples(st.just("silence"), st.none(), st.booleans()),
    st.tuples(st.just("close"), st.none(), st.booleans()),
)


async def serve(path: str, handle, writers: list[asyncio.StreamWriter]) -> asyncio.AbstractServer:
    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await handle(reader, writer)
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass  # the client hung up on the fake monitor; that is its right
        finally:
            writer.close()

    return await asyncio.start_unix_server(tracked, path=path)


def run_against(handle) -> Any:
    """Run shutdown() against a fake monitor; return its result or error, timing it."""

    async def main():
        with tempfile.TemporaryDirectory(prefix="qsd-fuzz-") as tmp:
            path = os.path.join(tmp, "qmp.sock")
            writers: list[asyncio.StreamWriter] = []
            server = await serve(path, handle, writers)
            started = time.monotonic()
            try:
                with anyio.fail_after(LIMIT + 5):
                    try:
                        outcome: Any = await qmpshutdown.shutdown(path, POLICY)
                    except qmpshutdown.Error as err:
                        outcome = err
            finally:
                elapsed = time.monotonic() - started
                server.close()
                for writer in writers:  # the handlers end when their reads see EOF
                    writer.close()
                await server.wait_closed()
        return outcome, elapsed

    outcome, elapsed = anyio.run(main, backend="asyncio")
    assert elapsed <= LIMIT, elapsed
    assert isinstance(outcome, (qmpshutdown.ShutdownResult, qmpshutdown.Error)), outcome
    if isinstance(outcome, qmpshutdown.ShutdownResult):
        assert outcome.pid is None  # our own process: never pinned, never signalled
    return outcome


@FUZZ
@given(stream=st.binary(max_size=512), close=st.booleans())
def test_random_bytes_give_only_typed_errors(stream: bytes, close: bool) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(stream)
        await writer.drain()
        if not close:
            await reader.read()  # until the client goes
        writer.close()

    outcome = run_against(handle)
    assert isinstance(outcome, qmpshutdown.Error)


@FUZZ
@given(script=st.lists(replies, max_size=12))
def test_wrong_qmp_after_a_good_handshake_gives_a_record_or_typed_error(script) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        line = await reader.readline()
        request = json.loads(line)
        writer.write(json.dumps({"return": {}, "id": request.get("id")}).encode() + b"\r\n")
        for kind, payload, right_id in script:
            line = await reader.readline()
            if not line:
                break
            command_id = json.loads(line).get("id")
            reply_id = command_id if right_id else f"not-{command_id}"
            if kind == "return":
                message: Any = {"return": payload, "id": reply_id}
            elif kind == "error":
                message = {"error": payload, "id": reply_id}
            elif kind == "event":
                message = payload
            elif kind == "garbage":
                writer.write(payload + b"\n")
                continue
            elif kind == "silence":
                continue
            else:
                break
            writer.write(json.dumps(message).encode() + b"\r\n")
            await writer.drain()
        else:
            await reader.read()
        writer.close()

    run_against(handle)
