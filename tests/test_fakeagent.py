"""The fake agent's guest-exec persona, through the library's agent client.

``guest-exec`` then ``guest-exec-status`` as qemu-ga answers them (a slow
command first says ``exited: false``), ``guest-info`` with exec enabled or
disabled, the "has been disabled" error, an agent that goes silent after N
commands, and a Windows guest in a named state whose outputs the library's
Windows questions read.
"""

from __future__ import annotations

import base64

import anyio
import pytest

from qmpshutdown._agent import AgentClient, AgentRefused
from qmpshutdown._questions import Answer, questions_for
from support.fakeagent import FakeAgent
from support.windows import STATES, windows_osinfo, windows_outputs

pytestmark = pytest.mark.asyncio

BOUND = 0.3
ARGV = ("busctl", "--json=short", "get-property", "org.freedesktop.login1",
        "/org/freedesktop/login1", "org.freedesktop.login1.Manager", "HandlePowerKey")  # fmt: skip
REPLY = '{"type":"s","data":"ignore"}\n'


async def run(client: AgentClient, argv: tuple[str, ...]) -> tuple[dict, int]:
    """guest-exec *argv*, then poll guest-exec-status until it exited; (status, polls)."""
    started = await client.execute(
        "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    )
    for polls in range(1, 20):
        status = await client.execute("guest-exec-status", {"pid": started["pid"]})
        if status["exited"]:
            return status, polls
    raise AssertionError("the fake never said exited")


def decoded(status: dict, key: str) -> str:
    return base64.b64decode(status[key]).decode() if key in status else ""


async def test_exec_runs_the_mapped_argv_and_reports_its_output(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = FakeAgent(str(tmp_path / "qga.sock"), exec_outputs={ARGV: (0, REPLY, "")})
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            status, polls = await run(client, ARGV)
        finally:
            await client.close()
        assert (status["exitcode"], decoded(status, "out-data"), polls) == (0, REPLY, 1)
        assert "err-data" not in status  # qemu-ga leaves out an empty stream
        assert agent.execs == [ARGV]
        tg.cancel_scope.cancel()


async def test_a_slow_command_says_not_exited_first(tmp_path):
    async with anyio.create_task_group() as tg:
        outputs = {("false",): (1, "", "it failed\n")}
        agent = FakeAgent(str(tmp_path / "qga.sock"), exec_outputs=outputs, slow_polls=3)
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            status, polls = await run(client, ("false",))
            with pytest.raises(AgentRefused, match="Invalid parameter 'pid'"):
                await client.execute("guest-exec-status", {"pid": 4100})  # read once: forgotten
        finally:
            await client.close()
        assert (status["exitcode"], decoded(status, "err-data"), polls) == (1, "it failed\n", 4)
        tg.cancel_scope.cancel()


async def test_a_program_that_is_not_there_fails_to_spawn(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = FakeAgent(str(tmp_path / "qga.sock"))
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            with pytest.raises(AgentRefused, match="No such file or directory") as refused:
                await client.execute("guest-exec", {"path": "busctl", "capture-output": True})
        finally:
            await client.close()
        assert refused.value.error_class == "GenericError"
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("enabled", [True, False])
async def test_guest_info_says_whether_exec_is_enabled(tmp_path, enabled):
    async with anyio.create_task_group() as tg:
        agent = FakeAgent(str(tmp_path / "qga.sock"), exec_enabled=enabled)
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)
        try:
            info = await client.execute("guest-info")
            if not enabled:
                with pytest.raises(AgentRefused, match=r"Command guest-exec has been disabled$"):
                    await client.execute("guest-exec", {"path": "true"})
        finally:
            await client.close()
        commands = {c["name"]: c for c in info["supported_commands"]}
        assert info["version"] == "7.2.0"
        assert commands["guest-exec"]["enabled"] is enabled
        assert commands["guest-exec-status"]["enabled"] is enabled
        assert commands["guest-get-osinfo"] == {
            "name": "guest-get-osinfo", "enabled": True, "success-response": True,
        }  # fmt: skip
        tg.cancel_scope.cancel()


async def test_an_agent_that_goes_silent_mid_diagnosis(tmp_path):
    async with anyio.create_task_group() as tg:
        outputs = {ARGV: (0, REPLY, "")}
        agent = FakeAgent(str(tmp_path / "qga.sock"), exec_outputs=outputs, silent_after=3)
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)  # 1: the sync
        try:
            await client.execute("guest-info")  # 2
            started = await client.execute("guest-exec", {"path": ARGV[0], "arg": list(ARGV[1:])})
            with pytest.raises(TimeoutError):  # 4: no answer within the bound
                await client.execute("guest-exec-status", {"pid": started["pid"]})
        finally:
            await client.close()
        assert agent.commands == ["guest-sync-delimited", "guest-info", "guest-exec",
                                  "guest-exec-status"]  # fmt: skip
        tg.cancel_scope.cancel()


async def test_a_windows_guest_in_every_state_answers_every_question(tmp_path):
    async with anyio.create_task_group() as tg:
        agent = FakeAgent(str(tmp_path / "qga.sock"), osinfo=windows_osinfo(),
                          exec_outputs=windows_outputs(*STATES))  # fmt: skip
        await tg.start(agent.serve)
        client = await AgentClient.connect(agent.path, BOUND)
        kinds = []
        try:
            osinfo = await client.execute("guest-get-osinfo")
            for question in questions_for(osinfo["id"]):
                status, _polls = await run(client, question.argv)
                answer = Answer(status["exitcode"], decoded(status, "out-data"),
                                decoded(status, "err-data"))  # fmt: skip
                kinds += [finding.kind for finding in question.parse(answer)]
        finally:
            await client.close()
        assert osinfo["pretty-name"] == "Windows Server 2022 Datacenter"
        assert kinds == ["pending-reboot", "pending-reboot", "pending-reboot", "updating",
                         "logon-required", "power-key", "shutdown-reason-prompt"]  # fmt: skip
        tg.cancel_scope.cancel()
