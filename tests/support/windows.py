"""A Windows guest as its agent shows it: osinfo, and what its tools print in a named state.

``windows_outputs("updating", "logon-required")`` maps each argv of the library's
Windows questions (:mod:`qmpshutdown._questions.windows`) to ``(exitcode,
stdout, stderr)`` in the tools' real formats (``\\r\\n`` line ends; reg.exe's
"unable to find" on stderr with exit status 1), for ``FakeAgent(exec_outputs=...)``.
States: ``clean``, ``pending-reboot``, ``updating``, ``logon-required``,
``power-key-nothing``, ``shutdown-reason-prompt``; several may be combined.

The osinfo is what qemu-ga's ``qga/commands-win32.c`` builds
(``qmp_guest_get_osinfo``): ``kernel-version`` major.minor, ``kernel-release``
the build, ``pretty-name`` the registry's ProductName, ``version``/``version-id``
from its table of builds (Server 2022 from build 20344), ``variant`` server or client.
"""

from __future__ import annotations

from typing import Any

from qmpshutdown._questions import windows as win

STATES = ("clean", "pending-reboot", "updating", "logon-required", "power-key-nothing",
          "shutdown-reason-prompt")  # fmt: skip

#: What reg.exe prints on stderr (exit status 1) for a key or value that is not there.
REG_NOT_FOUND = "ERROR: The system was unable to find the specified registry key or value.\r\n"

Output = tuple[int, str, str]


def windows_osinfo() -> dict[str, Any]:
    """``guest-get-osinfo`` of qemu-ga on Windows Server 2022 Datacenter."""
    return {
        "kernel-release": "20348",
        "kernel-version": "10.0",
        "machine": "x86_64",
        "id": "mswindows",
        "name": "Microsoft Windows",
        "pretty-name": "Windows Server 2022 Datacenter",
        "version": "Microsoft Windows Server 2022",
        "version-id": "2022",
        "variant": "server",
        "variant-id": "server",
    }


def crlf(*lines: str) -> str:
    """*lines* as Windows prints them: each ended by ``\\r\\n``."""
    return "".join(f"{line}\r\n" for line in lines)


def long_key(key: str) -> str:
    """reg.exe's name for *key*: ``HKLM\\`` spelled out."""
    return key.replace("HKLM\\", "HKEY_LOCAL_MACHINE\\", 1)


def reg_found(key: str, *values: tuple[str, str, str]) -> Output:
    """reg.exe query's output for *key* holding *values* (name, type, data)."""
    rows = [f"    {name}    {kind}    {data}" for name, kind, data in values]
    return 0, crlf("", long_key(key), *rows, ""), ""


def reg_absent() -> Output:
    """reg.exe query's output for a key or value that is not there."""
    return 1, "", REG_NOT_FOUND


def powercfg_button(index: int) -> Output:
    """``powercfg /q SCHEME_CURRENT SUB_BUTTONS PBUTTONACTION`` with AC and DC action *index*."""
    names = ("Do nothing", "Sleep", "Hibernate", "Shut down", "Turn off the display")
    possible = [
        line
        for number, name in enumerate(names)
        for line in (
            f"      Possible Setting Index: {number:03d}",
            f"      Possible Setting Friendly Name: {name}",
        )
    ]
    text = crlf(
        "Power Scheme GUID: 381b4222-f694-41f0-9685-ff5bb260df2e  (Balanced)",
        "  GUID Alias: SCHEME_BALANCED",
        "  Subgroup GUID: 4f971e89-eebd-4455-a8de-9e59040e7347  (Power buttons and lid)",
        "    GUID Alias: SUB_BUTTONS",
        "    Power Setting GUID: 7648efa3-dd9c-4e3e-b566-50f929386280  (Power button action)",
        "      GUID Alias: PBUTTONACTION",
        *possible,
        f"    Current AC Power Setting Index: 0x{index:08x}",
        f"    Current DC Power Setting Index: 0x{index:08x}",
        "",
    )
    return 0, text, ""


def tasklist(*extra: tuple[str, int]) -> Output:
    """``tasklist /fo csv /nh``: a Server 2022's usual processes, plus *extra* (name, pid)."""
    usual = [("System Idle Process", 0, "8 K"), ("System", 4, "144 K"),
             ("Registry", 92, "45,676 K"), ("smss.exe", 320, "1,072 K"),
             ("csrss.exe", 428, "5,228 K"), ("wininit.exe", 504, "6,540 K"),
             ("services.exe", 640, "9,804 K"), ("lsass.exe", 660, "17,356 K"),
             ("svchost.exe", 784, "27,128 K"), ("qemu-ga.exe", 2204, "7,412 K")]  # fmt: skip
    rows = usual + [(name, pid, "98,144 K") for name, pid in extra]
    rows.append(("tasklist.exe", 5120, "8,848 K"))
    return 0, crlf(*(f'"{name}","{pid}","Services","0","{mem}"' for name, pid, mem in rows)), ""


def windows_outputs(*states: str) -> dict[tuple[str, ...], Output]:
    """Every Windows question's argv → (exitcode, stdout, stderr) for a guest in *states*."""
    unknown = set(states) - set(STATES)
    if unknown:
        raise ValueError(f"no such Windows state: {sorted(unknown)}")
    outputs = {
        win.REBOOT_REQUIRED_ARGV: reg_absent(),
        win.REBOOT_PENDING_ARGV: reg_absent(),
        win.FILE_RENAMES_ARGV: reg_absent(),
        win.TASKS_ARGV: tasklist(),
        win.LOGON_ARGV: reg_found(win.POLICIES_SYSTEM_KEY,
                                  ("shutdownwithoutlogon", "REG_DWORD", "0x1")),
        win.BUTTON_ARGV: powercfg_button(3),
        win.REASON_ARGV: reg_absent(),
    }  # fmt: skip
    if "pending-reboot" in states:
        update = ("b6f0e2a3-8f4c-4e1d-9a7b-3c5d2e1f0a9b", "REG_DWORD", "0x1")
        outputs[win.REBOOT_REQUIRED_ARGV] = reg_found(win.REBOOT_REQUIRED_KEY, update)
        pending = long_key(win.REBOOT_PENDING_KEY)  # a key with a subkey, no values
        subkey = pending + r"\{9b3e1a2c-5d4f-4e6a-8b7c-1d2e3f4a5b6c}"
        outputs[win.REBOOT_PENDING_ARGV] = (0, crlf("", pending, subkey, ""), "")
        # (source, target) pairs: delete old.dll, replace a.dll by new.dll at the next boot
        pairs = (r"\??\C:\Windows\Temp\old.dll", "", r"\??\C:\Windows\Temp\new.dll",
                 r"\??\C:\Windows\System32\a.dll")  # fmt: skip
        renames = r"\0".join(pairs)
        outputs[win.FILE_RENAMES_ARGV] = reg_found(
            win.SESSION_MANAGER_KEY, ("PendingFileRenameOperations", "REG_MULTI_SZ", renames)
        )
    if "updating" in states:
        outputs[win.TASKS_ARGV] = tasklist(("TrustedInstaller.exe", 3280), ("TiWorker.exe", 4312))
    if "logon-required" in states:
        outputs[win.LOGON_ARGV] = reg_found(
            win.POLICIES_SYSTEM_KEY, ("shutdownwithoutlogon", "REG_DWORD", "0x0")
        )
    if "power-key-nothing" in states:
        outputs[win.BUTTON_ARGV] = powercfg_button(0)
    if "shutdown-reason-prompt" in states:
        outputs[win.REASON_ARGV] = reg_found(
            win.RELIABILITY_KEY, ("ShutdownReasonOn", "REG_DWORD", "0x1")
        )
    return outputs
