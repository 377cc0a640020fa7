#!/usr/bin/python
# Copyright: The qmpshutdown authors
# MIT License (see LICENSE in the qmpshutdown repository)
"""The module qmpshutdown.qemu.info: the QEMUs of the host; changes nothing."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: info
short_description: List the QEMU VMs of a host, with their QMP monitors and runstates
version_added: "0.3.0"
description:
  - Lists every QEMU process of the managed host, found from its own command line
    (C(/proc/PID/cmdline)) by the L(qmpshutdown,https://pypi.org/project/qmpshutdown/) library,
    as C(qmpshutdown --list) does - its pid, name, QMP monitor and guest agent socket.
  - Asks each monitor that answers its runstate (C(query-status), read only).
  - QEMUs that the M(qmpshutdown.qemu.shutdown) module would leave alone (managed by libvirt or
    Proxmox, no QMP monitor) are listed too, each with why.
  - Never changes anything.
requirements:
  - Python 3.10 or later on the managed host.
  - The qmpshutdown library on the managed host (C(pip install qmpshutdown)).
options:
  match:
    description:
      - Only the QEMUs whose name (C(-name)) or any socket path on their command line matches one
        of these globs, as C(qmpshutdown --list --match GLOB).
    type: list
    elements: str
  timeout:
    description:
      - Seconds each monitor gets to connect, greet and answer C(query-status); one that does not
        (another client holds it, QEMU is stopped) has C(runstate=null).
    type: float
    default: 2.0
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying
      target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode).
    support: none
seealso:
  - module: qmpshutdown.qemu.shutdown
author:
  - The qmpshutdown authors (@qmpshutdown)
"""

EXAMPLES = r"""
- name: What runs here
  qmpshutdown.qemu.info:
  register: here

- name: Stop the web VMs that run
  qmpshutdown.qemu.shutdown:
    targets: "{{ here.vms | selectattr('runstate', 'eq', 'running')
                 | selectattr('name', 'match', 'web') | map(attribute='target') | list }}"
"""

RETURN = r"""
vms:
  description: The QEMUs of the host, by pid.
  returned: always
  type: list
  elements: dict
  contains:
    pid:
      description: QEMU's pid.
      type: int
      sample: 4242
    name:
      description: Its C(-name), else its monitor, else C(qemu-PID).
      type: str
      sample: web1
    target:
      description: Its QMP monitor (a unix socket path, or C(HOST:PORT)), or null when it has none.
      type: str
      sample: /run/web1/qmp.sock
    agent:
      description: The unix socket of its guest agent's chardev, or null.
      type: str
    runstate:
      description:
        - QEMU's runstate as its monitor says it (C(running), C(paused), C(shutdown),
          C(suspended)...), or null when the monitor did not answer or was not asked.
      type: str
      sample: running
    why:
      description: Why M(qmpshutdown.qemu.shutdown) with C(all) leaves it alone, or null.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.qmpshutdown.qemu.plugins.module_utils.runner import (
    host_vms,
    library_problem,
    quiet_logging,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            match=dict(type="list", elements="str"),
            timeout=dict(type="float", default=2.0),
        ),
        supports_check_mode=True,
    )
    problem = library_problem()
    if problem is not None:
        module.fail_json(**problem)
    quiet_logging()
    match, timeout = module.params["match"], module.params["timeout"]
    if match is not None and not all(match):
        module.fail_json(msg="match: a glob must not be empty")
    if not timeout > 0:
        module.fail_json(msg=f"timeout must be a number of seconds > 0, not {timeout!r}")
    module.exit_json(changed=False, vms=host_vms(match, timeout))


if __name__ == "__main__":
    main()
