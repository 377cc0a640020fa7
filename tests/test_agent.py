"""The agent client against in-process fake agents: honest ones, and every way of lying.

Each lying agent must cost at most the call's bound (``command_timeout``) and
raise an error the rung can record; none may hang a call.
"""

from __future__ import annotations

import anyio
import pytest

from qmpshutdown._agent import AgentClient, AgentError, AgentLink, AgentRefused, read_guest_info
from support.fakeagent import FakeAgent

pytestmark = pytest.mark.asyncio

BOUND = 0.3
#: Slack for the event loop on a loaded 2-core machine; the bound itself is what is promised.
MARGIN = 1.0


async def serving(tg, tmp_path, behaviour="honest", **kwargs):
    agent = FakeAgent(str(tmp_path / "qga.sock"), behaviour, **kwargs)
    await tg.start(agent.serve)
    return agent


async def test_honest_agent_syncs_and_answers(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = await serving(tg, tmp_path, stale=b'{"return": 17}\ngarbage\xfe\n')
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            assert await client.execute("guest-fsfreeze-status") == "thawed"
            assert await client.execute("guest-fsfreeze-freeze") == 1
            assert await client.execute("guest-fsfreeze-status") == "frozen"
            with pytest.raises(AgentRefused, match="frozen state") as refused:
                await client.send_only("guest-shutdown", {"mode": "powerdown"})
                raise await client.next_error("guest-shutdown")
            assert refused.value.error_class == "CommandNotFound"
        finally:
            await client.close()
        assert agent.commands[0] == "guest-sync-delimited"
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("behaviour", ["silent", "garbage", "wrong-id", "closes"])
async def test_a_lying_agent_costs_at_most_the_bound(tmp_path, behaviour):
    async with anyio.create_task_group() as tg:
        agent = await serving(tg, tmp_path, behaviour)
        begun = anyio.current_time()
        with pytest.raises(AgentError):
            await AgentClient.connect(agent.path, BOUND)
        assert anyio.current_time() - begun < BOUND + MARGIN
        tg.cancel_scope.cancel()


async def test_no_socket_fails_at_once(tmp_path):
    with pytest.raises(AgentError, match="cannot connect"):
        await AgentClient.connect(str(tmp_path / "none.sock"), BOUND)


async def test_a_timeout_makes_the_next_call_resync(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = await serving(tg, tmp_path, "hangs-freeze")
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            with pytest.raises(TimeoutError):
                await client.execute("guest-fsfreeze-freeze")
            assert await client.execute("guest-fsfreeze-status") == "thawed"
        finally:
            await client.close()
        assert agent.commands == [
            "guest-sync-delimited", "guest-fsfreeze-freeze",
            "guest-sync-delimited", "guest-fsfreeze-status",
        ]  # fmt: skip
        tg.cancel_scope.cancel()


async def test_guest_info_from_osinfo_and_users(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = await serving(
            tg, tmp_path, osinfo={"name": "Microsoft Windows", "pretty-name": "Windows 10 Pro"},
            users=[{"user": "alice", "login-time": 1.0}],
        )  # fmt: skip
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            info, note = await read_guest_info(client)
        finally:
            await client.close()
        assert (info.os, info.users) == ("Windows 10 Pro", ("alice",))
        assert note == "os Windows 10 Pro; users: alice"
        tg.cancel_scope.cancel()


async def test_a_kernel_only_osinfo_names_no_os(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = await serving(tg, tmp_path)
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            info, _ = await read_guest_info(client)
        finally:
            await client.close()
        assert (info.os, info.users) == (None, ())
        tg.cancel_scope.cancel()


async def test_the_link_asks_a_silent_agent_once(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = await serving(tg, tmp_path, "silent")
        link = AgentLink(agent.path, BOUND)
        assert await link.connect() is None
        begun = anyio.current_time()
        assert await link.connect() is None  # not asked again
        assert anyio.current_time() - begun < 0.1
        assert "guest-sync-delimited" in (link.unreachable or "")
        await link.close()
        tg.cancel_scope.cancel()
