"""The diagnose step's questions: each parser against its tool's real output format.

Linux: busctl ``--json=short`` (one line of JSON) and ``systemd-analyze
cat-config``, as systemd 252 (Debian 12) prints them; Windows: reg.exe,
tasklist.exe and powercfg.exe (``\\r\\n``), from ``support.windows``. Each
finding, the no-finding case, garbage and a missing tool (:class:`Unreadable`:
a failed question, never "nothing found"), guest text with control characters
or a megabyte on one line (stripped, capped), and the power key's two answers
folded by :func:`merge`.
"""

from __future__ import annotations

import json
import re
import shlex

import attrs
import pytest

from qmpshutdown._finding import KINDS, Finding
from qmpshutdown._questions import (
    LINUX_QUESTIONS,
    OUTPUT_CAP,
    WINDOWS_QUESTIONS,
    Answer,
    PowerKeySetting,
    Question,
    Unreadable,
    linux,
    merge,
    one_line,
    questions_for,
)
from qmpshutdown._questions import windows as win
from qmpshutdown._questions.asked import DETAIL_CAP
from support.windows import (
    REG_NOT_FOUND,
    crlf,
    powercfg_button,
    reg_found,
    tasklist,
    windows_outputs,
)

CONF = "/run/systemd/logind.conf.d/qsd.conf"


def ok(stdout: str, *, truncated: bool = False) -> Answer:
    return Answer(0, stdout, "", truncated)


def inhibitors(*rows: list[object]) -> Answer:
    return ok(json.dumps({"type": "a(ssssuu)", "data": [list(rows)]}, separators=(",", ":")) + "\n")


def jobs(*rows: tuple[int, str, str, str]) -> Answer:
    full = [[job, unit, kind, state, f"/org/freedesktop/systemd1/job/{job}",
             "/org/freedesktop/systemd1/unit/" + unit.replace(".", "_2e")]
            for job, unit, kind, state in rows]  # fmt: skip
    return ok(json.dumps({"type": "a(usssoo)", "data": [full]}, separators=(",", ":")) + "\n")


def power_key(value: str) -> Answer:
    return ok(json.dumps({"type": "s", "data": value}, separators=(",", ":")) + "\n")


MAIN_CONF = """\
# /etc/systemd/logind.conf
#  This file is part of systemd.
#
# Entries in this file show the compile time defaults. Local configuration
# should be created by either modifying this file, or by creating "drop-ins" in
# the logind.conf.d/ subdirectory.

[Login]
#NAutoVTs=6
#KillUserProcesses=no
#HandlePowerKey=poweroff
#HandlePowerKeyLongPress=ignore
#PowerKeyIgnoreInhibited=no
"""


def cat_config(*dropins: tuple[str, str]) -> Answer:
    parts = [MAIN_CONF] + [f"\n# {path}\n{text}" for path, text in dropins]
    return ok("".join(parts))


def read_all(answers: dict[tuple[str, ...], Answer], questions=LINUX_QUESTIONS) -> list[Finding]:
    found: list[Finding] = []
    for question in questions:
        if question.argv in answers:
            found += question.parse(answers[question.argv])
    return list(merge(found))


# -- the questions themselves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("os_id", "expected"),
    [("mswindows", WINDOWS_QUESTIONS), ("debian", LINUX_QUESTIONS), ("ubuntu", LINUX_QUESTIONS),
     (None, LINUX_QUESTIONS), ("", LINUX_QUESTIONS)],
)  # fmt: skip
def test_the_os_id_picks_the_set(os_id, expected):
    assert questions_for(os_id) is expected


def test_every_question_is_a_fixed_read_only_command():
    allowed = {"busctl": {"call", "get-property"}, "systemd-analyze": {"cat-config"},
               "reg.exe": {"query"}, "tasklist.exe": {"/fo"}, "powercfg.exe": {"/q"}}  # fmt: skip
    for question in LINUX_QUESTIONS + WINDOWS_QUESTIONS:
        verb = next(arg for arg in question.argv[1:] if not arg.startswith("--"))
        assert verb in allowed[question.argv[0]], question.argv
        assert question.source == shlex.join(question.argv)
        assert shlex.split(question.source) == list(question.argv)


def test_a_question_needs_a_real_argv():
    with pytest.raises(ValueError, match="non-empty strings"):
        Question((), linux.read_jobs)
    with pytest.raises(ValueError, match="non-empty strings"):
        Question(("busctl", ""), linux.read_jobs)


def test_the_windows_source_keeps_the_key_whole():
    source = win.QUESTIONS[0].source
    assert source == ("reg.exe query "
                      "'HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\WindowsUpdate"
                      "\\Auto Update\\RebootRequired'")  # fmt: skip
    assert OUTPUT_CAP == 64 * 1024


# -- the text rules ---------------------------------------------------------------------------


def test_one_line_strips_control_and_format_characters_and_caps():
    assert one_line("a\x1b[31mred\x1b[0m\tb\r\nc\x00d\u202ee") == "a [31mred [0m b c d e"
    long = one_line("x" * 1_000_000)
    assert len(long) == DETAIL_CAP and long.endswith("…")
    assert one_line("  many   spaces  ") == "many spaces"


# -- Linux: inhibitors ------------------------------------------------------------------------


def test_a_block_inhibitor_on_shutdown_is_a_finding():
    answer = inhibitors(
        ["shutdown:sleep", "ModemManager", "ModemManager needs to reset devices", "delay", 0, 612],
        ["shutdown:handle-power-key", "nightly-backup", "writing the archive", "block", 0, 412],
        ["sleep", "UPower", "Pause device polling", "delay", 0, 771],
    )
    assert linux.read_inhibitors(answer) == (Finding(
        "inhibitor",
        'nightly-backup (pid 412, uid 0) blocks shutdown:handle-power-key: "writing the archive"',
        shlex.join(linux.INHIBITORS_ARGV),
    ),)  # fmt: skip


def test_a_block_on_the_power_key_alone_counts_and_one_on_sleep_does_not():
    answer = inhibitors(
        ["handle-power-key", "kiosk", "the kiosk owns the button", "block", 1000, 901],
        ["sleep:idle", "video", "playing", "block", 1000, 902],
    )
    (found,) = linux.read_inhibitors(answer)
    assert (
        found.detail
        == 'kiosk (pid 901, uid 1000) blocks handle-power-key: "the kiosk owns the button"'
    )


def test_delay_inhibitors_and_none_are_no_finding():
    assert linux.read_inhibitors(inhibitors()) == ()
    delay = ["shutdown:handle-power-key", "NetworkManager", "NM needs to disconnect", "delay", 0, 5]
    assert linux.read_inhibitors(inhibitors(delay)) == ()


def test_guest_text_in_an_inhibitor_is_stripped_and_capped():
    why = "\x1b]0;owned\x07" + "y" * 100_000
    (found,) = linux.read_inhibitors(
        inhibitors(["shutdown", "evil\nname\x1b[2J", why, "block", 0, 7])
    )
    assert len(found.detail) <= DETAIL_CAP
    assert found.detail.isprintable() and "\x1b" not in found.detail and "\n" not in found.detail
    assert found.detail.startswith('evil name [2J (pid 7, uid 0) blocks shutdown: "]0;owned y')


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (ok("Failed to connect to bus\n"), "not JSON"),
        (ok(""), "not JSON"),
        (ok('{"type":"s","data":"x"}'), "not of type a(ssssuu)"),
        (ok('{"type":"a(ssssuu)","data":[]}'), "not one array"),
        (ok('{"type":"a(ssssuu)","data":[[["shutdown","who","why","block",0]]]}'), "6 typed"),
        (ok('{"type":"a(ssssuu)","data":[[["shutdown","who","why","block","0",1]]]}'), "6 typed"),
        (ok('{"type":"a(ssssuu)","data":[[["shutdown","who","why","block",true,1]]]}'), "6 typed"),
        (ok('{"type":"a(ssssuu)","data":[[' + "[" * 10 + "]]"), "not JSON"),
        (Answer(127, "", "busctl: command not found\n"), "busctl is not there"),
        (Answer(1, "", "Failed to connect to bus: No such file or directory\n"),
         "exit status 1: Failed to connect to bus: No such file or directory"),
        (Answer(None, "", ""), "without an exit status"),
        (attrs.evolve(inhibitors(["shutdown", "a", "b", "block", 0, 1]), truncated=True),
         "cut at 64 KiB"),
    ],
)  # fmt: skip
def test_an_inhibitor_answer_that_cannot_be_read(answer, why):
    with pytest.raises(Unreadable, match=re.escape(why)):
        linux.read_inhibitors(answer)


# -- Linux: the power key, its file, and the merge --------------------------------------------


def test_the_running_value_and_its_file_make_one_power_key_finding():
    answers = {
        linux.INHIBITORS_ARGV: inhibitors(),
        linux.POWER_KEY_ARGV: power_key("ignore"),
        linux.LOGIND_CONF_ARGV: cat_config((CONF, "[Login]\nHandlePowerKey=ignore\n")),
        linux.JOBS_ARGV: jobs(),
    }
    assert read_all(answers) == [Finding(
        "power-key",
        f"HandlePowerKey=ignore (set in {CONF}): logind ignores the power button",
        f"{shlex.join(linux.POWER_KEY_ARGV)}; {shlex.join(linux.LOGIND_CONF_ARGV)}",
    )]  # fmt: skip


def test_the_merged_finding_takes_the_first_helpers_place():
    inhibitor = Finding("inhibitor", "x", "y")
    stop = Finding("stop-job", "z", "w")
    running = linux.read_power_key(power_key("suspend"))
    configured = linux.read_logind_conf(cat_config((CONF, "[Login]\nHandlePowerKey=suspend\n")))
    merged = merge([inhibitor, *running, stop, *configured])
    assert [f.kind for f in merged] == ["inhibitor", "power-key", "stop-job"]
    assert merged[1].detail == (f"HandlePowerKey=suspend (set in {CONF}): "
                                "the power button suspends the guest")  # fmt: skip


@pytest.mark.parametrize(
    ("running", "dropin", "detail"),
    [
        ("poweroff", "HandlePowerKey=poweroff", None),
        ("poweroff", "HandlePowerKey=ignore", None),  # logind's running value decides
        ("poweroff", None, None),
        (None, "HandlePowerKey=poweroff", None),
        (None, "HandlePowerKey=", None),  # empty: the default again
        ("ignore", None,
         "HandlePowerKey=ignore (no logind.conf file sets it now): "
         "logind ignores the power button"),
        ("ignore", "HandlePowerKey=poweroff",
         f"HandlePowerKey=ignore ({CONF} now says poweroff: logind has not re-read its "
         "configuration): logind ignores the power button"),
        (None, "HandlePowerKey=reboot",
         f"HandlePowerKey=reboot (set in {CONF}; logind's running value was not read): "
         "the power button reboots the guest"),
        ("frobnicate", None, "HandlePowerKey=frobnicate (no logind.conf file sets it now): "
         "the power button does not power the guest off"),
    ],
)  # fmt: skip
def test_the_power_key_merge(running, dropin, detail):
    found: list[Finding] = []
    if running is not None:
        found += linux.read_power_key(power_key(running))
    conf = cat_config((CONF, f"[Login]\n{dropin}\n")) if dropin else cat_config()
    found += linux.read_logind_conf(conf)
    merged = merge(found)
    assert not any(isinstance(f, PowerKeySetting) for f in merged)
    assert [f.detail for f in merged] == ([] if detail is None else [detail])
    assert all(f.kind in KINDS for f in merged)


def test_merge_leaves_other_findings_alone():
    plain = (Finding("inhibitor", "a", "b"), Finding("stop-job", "c", "d"))
    assert merge(plain) == plain
    assert merge([]) == ()


def test_the_last_uncommented_login_assignment_wins():
    conf = cat_config(
        ("/etc/systemd/logind.conf.d/10-site.conf", "[Login]\nHandlePowerKey = suspend\n"),
        ("/etc/systemd/logind.conf.d/50-other.conf",
         "[Login]\nHandlePowerKeyLongPress=reboot\n#HandlePowerKey=halt\n; HandlePowerKey=kexec\n"
         "[Other]\nHandlePowerKey=reboot\n"),
    )  # fmt: skip
    (setting,) = linux.read_logind_conf(conf)
    assert (setting.value, setting.path) == ("suspend", "/etc/systemd/logind.conf.d/10-site.conf")
    later = cat_config(
        (CONF, "[Login]\nHandlePowerKey=ignore\n"),
        ("/run/systemd/logind.conf.d/zz.conf", "[Login]\nHandlePowerKey=lock\n"),
    )
    (setting,) = linux.read_logind_conf(later)
    assert (setting.value, setting.path) == ("lock", "/run/systemd/logind.conf.d/zz.conf")


def test_a_configuration_with_only_comments_sets_nothing():
    assert linux.read_logind_conf(cat_config()) == ()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (ok(""), "printed no file"),
        (ok("[Login]\nHandlePowerKey=ignore\n"), "did not start with a '# /file' line"),
        (ok("<html>502</html>\n"), "did not start"),
        (Answer(1, "", "Failed to read configuration: Permission denied\n"), "exit status 1"),
        (Answer(127, "", ""), "systemd-analyze is not there"),
        (attrs.evolve(cat_config(), truncated=True), "cut at 64 KiB"),
    ],
)
def test_a_configuration_that_cannot_be_read(answer, why):
    with pytest.raises(Unreadable, match=re.escape(why)):
        linux.read_logind_conf(answer)


@pytest.mark.parametrize(
    "answer",
    [ok('{"type":"s","data":""}'), ok('{"type":"b","data":true}'), ok('{"type":"s","data":3}'),
     ok("ignore\n"), Answer(1, "", "Failed to get property HandlePowerKey: Access denied\n")],
)  # fmt: skip
def test_a_power_key_answer_that_cannot_be_read(answer):
    with pytest.raises(Unreadable):
        linux.read_power_key(answer)


def test_a_power_key_from_the_guest_is_stripped_too():
    (setting,) = linux.read_power_key(power_key("ig\x1b[8mnore" + "z" * 500))
    (found,) = merge([setting])
    assert "\x1b" not in found.detail and len(found.detail) <= DETAIL_CAP


# -- Linux: stop jobs -------------------------------------------------------------------------


def test_a_queued_power_off_lists_the_units_still_stopping():
    running = [(100 + n, f"app{n}.service", "stop", "running") for n in range(7)]
    answer = jobs((90, "poweroff.target", "start", "waiting"),
                  (91, "systemd-poweroff.service", "start", "waiting"),
                  (92, "umount.target", "start", "waiting"),
                  (93, "slow.mount", "stop", "waiting"), *running)  # fmt: skip
    assert linux.read_jobs(answer) == (Finding(
        "stop-job",
        "shutting down (poweroff.target, systemd-poweroff.service queued, 11 jobs): still stopping "
        "app0.service, app1.service, app2.service, app3.service, app4.service and 2 more",
        shlex.join(linux.JOBS_ARGV),
    ),)  # fmt: skip


def test_a_shutdown_with_nothing_stopping_yet_says_so():
    (found,) = linux.read_jobs(jobs((5, "reboot.target", "start", "waiting")))
    assert found.detail == "shutting down (reboot.target queued, 1 jobs): no stop job running"


def test_jobs_without_a_shutdown_are_no_finding():
    assert linux.read_jobs(jobs()) == ()
    assert linux.read_jobs(jobs((7, "apt-daily.service", "stop", "running"))) == ()


@pytest.mark.parametrize(
    "answer",
    [ok('{"type":"a(usssoo)","data":[[[1,"x","stop","running","/j"]]]}'),
     ok('{"type":"a(ussssuu)","data":[[]]}'), ok("No jobs.\n"), Answer(127, "", "")],
)  # fmt: skip
def test_a_jobs_answer_that_cannot_be_read(answer):
    with pytest.raises(Unreadable):
        linux.read_jobs(answer)


# -- Windows ----------------------------------------------------------------------------------


def windows_findings(*states: str) -> list[Finding]:
    outputs = windows_outputs(*states)
    answers = {argv: Answer(*output) for argv, output in outputs.items()}
    return read_all(answers, WINDOWS_QUESTIONS)


def test_a_clean_windows_guest_has_no_findings():
    assert windows_findings("clean") == []
    assert windows_findings() == []


@pytest.mark.parametrize(
    ("state", "kinds", "first_detail"),
    [
        ("pending-reboot", ["pending-reboot"] * 3,
         "Windows Update waits for a restart (HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion"
         "\\WindowsUpdate\\Auto Update\\RebootRequired exists)"),
        ("updating", ["updating"],
         "Windows is installing updates: TrustedInstaller.exe (pid 3280), TiWorker.exe (pid 4312) "
         "running"),
        ("logon-required", ["logon-required"],
         "shutdownwithoutlogon=0: Windows ignores the power button until someone logs on (policy "
         '"Shutdown: Allow system to be shut down without having to log on")'),
        ("power-key-nothing", ["power-key"],
         'power button action (AC) of the active power plan is 0 "Do nothing", not 3 "Shut down"'),
        ("shutdown-reason-prompt", ["shutdown-reason-prompt"],
         "ShutdownReasonOn=1: the Shutdown Event Tracker asks why before Windows shuts down "
         '(policy "Display Shutdown Event Tracker")'),
    ],
)  # fmt: skip
def test_each_windows_state_is_its_finding(state, kinds, first_detail):
    found = windows_findings(state)
    assert [f.kind for f in found] == kinds
    assert found[0].detail == first_detail


def test_the_pending_reboot_findings_say_which_place():
    details = [f.detail for f in windows_findings("pending-reboot")]
    assert "Component Based Servicing\\RebootPending exists" in details[1]
    assert details[2] == (
        "files wait to be renamed or deleted at the next restart: 3 paths in "
        "PendingFileRenameOperations, first \\??\\C:\\Windows\\Temp\\old.dll"
    )


def test_an_empty_rename_list_is_no_finding():
    empty = reg_found(win.SESSION_MANAGER_KEY, ("PendingFileRenameOperations", "REG_MULTI_SZ", ""))
    assert win.read_file_renames(Answer(*empty)) == ()


@pytest.mark.parametrize(("index", "action"), [(1, "Sleep"), (2, "Hibernate"),
                                               (4, "Turn off the display")])  # fmt: skip
def test_every_button_action_but_shut_down_is_a_finding(index, action):
    (found,) = win.read_button(Answer(*powercfg_button(index)))
    assert found.detail == (f'power button action (AC) of the active power plan is {index} '
                            f'"{action}", not 3 "Shut down"')  # fmt: skip
    assert win.read_button(Answer(*powercfg_button(3))) == ()


def test_an_unknown_button_action_is_still_not_shut_down():
    (found,) = win.read_button(Answer(*powercfg_button(7)))
    assert '7 "an action powercfg does not name here"' in found.detail


def test_a_logon_policy_of_one_or_absent_is_no_finding():
    allowed = reg_found(win.POLICIES_SYSTEM_KEY, ("shutdownwithoutlogon", "REG_DWORD", "0x1"))
    assert win.read_logon(Answer(*allowed)) == ()
    assert win.read_logon(Answer(1, "", REG_NOT_FOUND)) == ()
    off = reg_found(win.RELIABILITY_KEY, ("ShutdownReasonOn", "REG_DWORD", "0x0"))
    assert win.read_reason(Answer(*off)) == ()


def test_an_updater_in_a_cut_output_still_counts_but_its_absence_does_not():
    code, out, err = tasklist(("TiWorker.exe", 4312))
    (found,) = win.read_tasks(Answer(code, out + '"svchost.exe","99', err, truncated=True))
    assert found.detail == "Windows is installing updates: TiWorker.exe (pid 4312) running"
    code, out, err = tasklist()
    with pytest.raises(Unreadable, match="cut at 64 KiB"):
        win.read_tasks(Answer(code, out + '"svch', err, truncated=True))


def test_guest_text_in_a_windows_answer_is_stripped():
    path = "\\??\\C:\\\x1b[2Jevil\x07" + "p" * 5000
    renames = reg_found(win.SESSION_MANAGER_KEY, ("PendingFileRenameOperations", "REG_MULTI_SZ",
                                                  path + "\\0\\0"))  # fmt: skip
    (found,) = win.read_file_renames(Answer(*renames))
    assert found.detail.isprintable() and len(found.detail) <= DETAIL_CAP


@pytest.mark.parametrize(
    ("reader", "answer", "why"),
    [
        (win.read_logon, Answer(1, "", "ERROR: Access is denied.\r\n"), "Access is denied"),
        (win.read_logon, Answer(1, "", "FEHLER: Der angegebene Registrierungsschlüssel oder Wert "
                                       "wurde nicht gefunden.\r\n"), "exit status 1"),
        (win.read_logon, Answer(*reg_found(win.POLICIES_SYSTEM_KEY,
                                           ("shutdownwithoutlogon", "REG_SZ", "0"))), "REG_SZ"),
        (win.read_logon, Answer(*reg_found(win.POLICIES_SYSTEM_KEY,
                                           ("shutdownwithoutlogon", "REG_DWORD", "yes"))),
         "not a REG_DWORD"),
        (win.read_logon, Answer(*reg_found(win.POLICIES_SYSTEM_KEY)), "no shutdownwithoutlogon"),
        (win.read_reason, Answer(0, "garbage\r\n", ""), "no key name"),
        (win.read_reboot_required, Answer(0, "", ""), "no key name"),
        (win.read_file_renames, Answer(*reg_found(win.SESSION_MANAGER_KEY)),
         "no PendingFileRenameOperations"),
        (win.read_tasks, Answer(0, "INFO: No tasks are running which match the specified "
                                   "criteria.\r\n", ""), "CSV process rows"),
        (win.read_tasks, Answer(0, crlf('"System","four","Services","0","144 K"'), ""),
         "CSV process rows"),
        (win.read_tasks, Answer(0, "", ""), "CSV process rows"),
        (win.read_button, Answer(1, "", "The power scheme, subgroup or setting specified does not "
                                        "exist.\r\n"), "exit status 1"),
        (win.read_button, Answer(0, crlf("Power Scheme GUID: 381b4222"), ""), "no single"),
        (win.read_button, Answer(127, "", ""), "powercfg.exe is not there"),
        (win.read_button, Answer(None, "", ""), "without an exit status"),
    ],
)  # fmt: skip
def test_a_windows_answer_that_cannot_be_read(reader, answer, why):
    with pytest.raises(Unreadable, match=re.escape(why)):
        reader(answer)


def test_a_missing_key_is_a_plain_no_whichever_stream_says_it():
    for answer in (Answer(1, "", REG_NOT_FOUND), Answer(1, REG_NOT_FOUND, "")):
        assert win.read_reboot_required(answer) == ()
        assert win.read_reboot_pending(answer) == ()
        assert win.read_file_renames(answer) == ()
        assert win.read_reason(answer) == ()
