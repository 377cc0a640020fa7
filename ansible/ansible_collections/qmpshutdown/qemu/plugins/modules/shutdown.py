#!/usr/bin/python
# Copyright: The qmpshutdown authors
# MIT License (see LICENSE in the qmpshutdown repository)
"""The module qmpshutdown.qemu.shutdown: the VMs are stopped, with the record of why."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: shutdown
short_description: Stop QEMU VMs over QMP, escalating only as needed, with the record of why
version_added: "0.3.0"
description:
  - Stops QEMU virtual machines on the managed host with the L(qmpshutdown,https://pypi.org/project/qmpshutdown/)
    library, straight over their QMP monitor sockets (no libvirt, no daemon).
  - Each VM's guest is asked first (the ACPI power button, pressed again while it waits; its guest
    agent when the policy allows it); only when it will not go does the library escalate, rung by
    rung as the policy allows, to saving its state, C(quit), SIGTERM and SIGKILL. QEMU is really
    gone (its process exited) when a VM counts as stopped.
  - Returns one record per VM, in order (which rung ended it, why, how many presses, every step and
    event), as C(ShutdownResult.to_dict) gives it.
  - Idempotent. A target whose socket is gone or refuses connections is a QEMU that is not running,
    already stopped; it is not changed. Running the same task twice changes nothing the second time.
  - The task fails when a VM still runs after the rungs its policy allows, or when a target's peer
    is not a QMP server (for example QEMU's human monitor); the record of every VM is returned then
    too.
requirements:
  - Python 3.10 or later on the managed host.
  - The qmpshutdown library on the managed host (C(pip install qmpshutdown)), importable by the
    interpreter Ansible runs there (C(ansible_python_interpreter)).
  - Permission to connect to the QMP sockets (and, to use force, to signal the QEMU processes).
options:
  targets:
    description:
      - The VMs to stop, each a QMP monitor, as the C(qmpshutdown) command takes it - the path of a
        unix socket, or C(HOST:PORT) (C([ADDR]:PORT) for IPv6).
      - Exclusive with O(all). An empty list stops nothing.
    type: list
    elements: str
  all:
    description:
      - Stop every QEMU of the managed host that has a reachable QMP monitor, found from the
        processes' own command lines, as C(qmpshutdown --all).
      - QEMUs that belong to a manager (libvirt, Proxmox) or have no QMP monitor are left alone;
        they are returned in RV(left_alone), each with why, and a warning says so.
      - Each VM's pid is pinned and its guest agent socket taken from its command line.
    type: bool
    default: false
  match:
    description:
      - With O(all), only the QEMUs whose name (C(-name)) or any socket path on their command line
        matches one of these globs, as C(qmpshutdown --all --match GLOB).
    type: list
    elements: str
  policy:
    description:
      - How to stop each VM - fields of the library's C(ShutdownPolicy), for example
        C(powerdown_timeout), C(repress_interval), C(stages), C(patience), C(quit_timeout),
        C(terminate_timeout), C(kill_timeout), C(connect_timeout), C(command_timeout),
        C(agent_timeout), C(save_timeout), C(freeze_before_force), C(diagnose), C(diagnose_timeout).
      - The library validates it - a field it does not have, or a bad value, fails the task with
        the library's message. Fields not given keep the library's defaults (60 s for the guest
        to power off, then C(quit), SIGTERM and SIGKILL).
      - C(stages) lists the rungs allowed, in ladder order (C(powerdown), C(agent), C(save),
        C(quit), C(terminate), C(kill)); C([powerdown]) never uses force.
    type: dict
    default: {}
  agent:
    description:
      - The guest agent's unix socket (qemu-ga's chardev), for the C(agent) rung and the freeze of
        the guest's filesystems before force, as C(qmpshutdown --agent). One target only.
    type: path
  deadline:
    description:
      - Seconds by which every VM of the task is done, gracefully or forced, as
        C(qmpshutdown --deadline); each VM's policy is shortened to fit the time left.
    type: float
  save_dir:
    description:
      - Keep a guest that will not go in a state file in this directory before C(quit)
        (adds the C(save) rung unless O(policy) names its C(stages)), as C(qmpshutdown --save-dir).
      - It must be a directory on the managed host.
    type: path
  evidence_dir:
    description:
      - Save a PNG of each guest's screen here when it has to be forced, as
        C(qmpshutdown --evidence-dir). The record's C(screenshot) names the file.
    type: path
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target.
    support: full
    details:
      - Each target's monitor is asked its runstate (C(query-status), read only); nothing is
        pressed.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode).
    support: none
notes:
  - The library logs nothing to stdout; the module prints only its JSON.
  - A guest found already powered off (QEMU left in runstate C(shutdown)) is stopped without being
    counted as a change.
seealso:
  - module: qmpshutdown.qemu.info
  - name: The qmpshutdown documentation
    description: What each rung does, the record's fields, and a rolling stop of many hosts.
    link: https://qmpshutdown.readthedocs.io/en/latest/many-hosts.html
author:
  - The qmpshutdown authors (@qmpshutdown)
"""

EXAMPLES = r"""
- name: Stop two VMs; an idle guest that ignores the button is forced after 2 minutes
  qmpshutdown.qemu.shutdown:
    targets:
      - /run/vm1/qmp.sock
      - 127.0.0.1:4444
    policy:
      powerdown_timeout: 120
  register: stopped

- name: Stop every QEMU of the host whose name starts with web, within 5 minutes
  qmpshutdown.qemu.shutdown:
    all: true
    match: ["web*"]
    deadline: 300
    save_dir: /var/lib/qmpshutdown
    evidence_dir: /var/lib/qmpshutdown/evidence

- name: Ask nicely only; fail (with the record) if the guest does not go
  qmpshutdown.qemu.shutdown:
    targets: [/run/db/qmp.sock]
    agent: /run/db/qga.sock
    policy:
      stages: [agent, powerdown]
      patience: adaptive
      max_powerdown_timeout: 900
"""

RETURN = r"""
results:
  description:
    - One record per VM, in the order of O(targets) (or of the QEMUs found, by pid), as the
      library's C(ShutdownResult.to_dict) gives it, with C(target), C(name) and C(error) added.
    - A target whose QEMU is not running has C(stage=already-off) and C(error) saying why
      (no such socket, connection refused). An error with no record (a peer that is not a QMP
      server) has C(stage=null) and empty steps.
  returned: always (empty in check mode)
  type: list
  elements: dict
  contains:
    target:
      description: The target as given (or the monitor found, with O(all)).
      type: str
      sample: /run/vm1/qmp.sock
    name:
      description: The VM's name (the target as given, or its C(-name) with O(all)).
      type: str
    error:
      description: Why the VM was not (or not known to be) stopped by its guest, else null.
      type: str
      sample: "/run/vm3/qmp.sock: No such file or directory"
    stage:
      description:
        - The rung that ended the VM (C(powerdown), C(agent), C(save), C(quit), C(terminate),
          C(kill)), C(already-off), or null when it still runs.
      type: str
      sample: powerdown
    graceful:
      description: True when the guest powered itself off (or was found off).
      type: bool
    reason:
      description: The reason of QEMU's first SHUTDOWN event (C(guest-shutdown), C(host-qmp-quit)).
      type: str
      sample: guest-shutdown
    presses:
      description: How many times the power button was pressed.
      type: int
    runstate:
      description: QEMU's runstate when the monitor was reached.
      type: str
      sample: running
    cause:
      description: Why the guest did not go by itself (C(ignored-power-button), C(busy)), or null.
      type: str
      sample: ignored-power-button
    pid:
      description: QEMU's pid, when known.
      type: int
    elapsed_s:
      description: Seconds from the start to QEMU's confirmed end.
      type: float
    events:
      description: Every QMP event seen (C(event), C(timestamp), C(data)).
      type: list
      elements: dict
    steps:
      description: Each rung and step tried, in order, with its outcome and timings.
      type: list
      elements: dict
    saved_state:
      description: The state file the C(save) rung wrote, else null.
      type: str
    screenshot:
      description: The PNG of the guest's screen taken before force (O(evidence_dir)), else null.
      type: str
    console_tail:
      description: The serial console's last lines when forced, if known, else null.
      type: list
      elements: str
    guest_os:
      description: The OS the guest agent named, else null.
      type: str
    guest_users:
      description: Who was logged in, as the guest agent said, else null.
      type: list
      elements: str
    activity:
      description: What the guest did (CPU, disk) while it was waited for, else null.
      type: dict
    diagnosis:
      description:
        - What the guest said through its agent when asked why it had not gone (the C(diagnose)
          step), one dict per finding with C(kind) (C(inhibitor), C(power-key), C(stop-job),
          C(pending-reboot), C(updating), C(logon-required), C(shutdown-reason-prompt),
          C(agent-silent)), C(detail) and C(source); an empty list when nothing was found;
          null when the guest was not asked.
      type: list
      elements: dict
changed:
  description: True when any VM was running and is now stopped (C(already-off) is no change).
  returned: always
  type: bool
running:
  description: Check mode - the targets whose QEMU runs (and would be stopped).
  returned: check mode
  type: list
  elements: str
  sample: [/run/vm1/qmp.sock]
left_alone:
  description:
    - With O(all), the QEMUs found but not stopped, each with C(pid), C(name), C(target), C(agent)
      and C(why) (managed by libvirt or Proxmox, no QMP monitor...).
  returned: when O(all=true)
  type: list
  elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.qmpshutdown.qemu.plugins.module_utils.runner import (
    TaskError,
    check_options,
    entry,
    jobs_from,
    library_problem,
    policy_from,
    probe_all,
    quiet_logging,
    stop,
    would_stop,
)


def argument_spec():
    """The module's options (DOCUMENTATION says what each means)."""
    return dict(
        targets=dict(type="list", elements="str"),
        all=dict(type="bool", default=False),
        match=dict(type="list", elements="str"),
        policy=dict(type="dict", default={}),
        agent=dict(type="path"),
        deadline=dict(type="float"),
        save_dir=dict(type="path"),
        evidence_dir=dict(type="path"),
    )


def check(module, jobs, labels, policy, found):
    """Check mode: which targets run (each monitor asked its runstate); nothing pressed."""
    answers = probe_all([job.target for job in jobs], policy.connect_timeout,
                        policy.command_timeout)
    running, errors = [], []
    for label, answer in zip(labels, answers, strict=True):
        runs, error = would_stop(answer)
        if error is not None:
            errors.append(f"{label}: {error}")
        elif runs:
            running.append(label)
    if errors:
        module.fail_json(msg="; ".join(errors), changed=bool(running), results=[],
                         running=running, **found)
    module.exit_json(changed=bool(running), results=[], running=running, **found)


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    problem = library_problem()
    if problem is not None:
        module.fail_json(**problem)
    quiet_logging()
    params = module.params
    try:
        check_options(params)
        policy = policy_from(params["policy"], params["save_dir"])
        jobs, labels, left_alone = jobs_from(params)
    except TaskError as err:
        module.fail_json(msg=str(err))
    found = {"left_alone": left_alone} if params["all"] else {}
    for row in left_alone:
        module.warn(f"left alone: {row['name']} (pid {row['pid']}): {row['why']}")
    if module.check_mode:
        check(module, jobs, labels, policy, found)
    outcomes = stop(jobs, policy, params)
    results, changed, failures = [], False, []
    for label, job, outcome in zip(labels, jobs, outcomes, strict=True):
        item, was_changed, failed = entry(label, job, outcome)
        results.append(item)
        changed = changed or was_changed
        if failed:
            failures.append(item["error"])
    if failures:
        module.fail_json(msg=f"{len(failures)} of {len(jobs)} VMs not stopped: "
                         + "; ".join(failures), changed=changed, results=results, **found)
    module.exit_json(changed=changed, results=results, **found)


if __name__ == "__main__":
    main()
