#!/usr/bin/python3
"""Ansible module: wait until a freshly (re)started server answers its health URL, or give up early.

``uri`` with ``until`` can only poll the URL: when the new unit crashes at once it would still wait the
whole timeout. This module watches the unit too and stops as soon as systemd reports it failed or
waiting to restart, returning the journal's last lines, so the role can roll back within seconds. An
API key is read from a file on the host and sent as a bearer token; it is never returned.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: llama_server_health
short_description: Wait for a systemd-managed HTTP server's health URL, failing fast when the unit dies
options:
  url: {description: Health URL (200 means healthy)., type: str, required: true}
  unit: {description: systemd unit to watch., type: str, required: true}
  timeout: {description: Seconds to wait at most., type: int, default: 600}
  api_key_file: {description: File with the API key (first non-comment line)., type: str, default: ""}
author: llamahost
"""

RETURN = r"""
elapsed: {description: Seconds until healthy., returned: success, type: float}
journal: {description: The unit's last journal lines., returned: failure, type: list}
"""

POLL_S = 1.0


def unit_state(unit):
    out = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState"],
                         capture_output=True, text=True, check=False).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return values.get("ActiveState", ""), values.get("SubState", "")


def journal_tail(unit, since):
    out = subprocess.run(["journalctl", "-u", unit, "--since", since, "-n", "25", "--no-pager", "-o", "cat"],
                         capture_output=True, text=True, check=False).stdout
    return out.splitlines()


def read_key(path):
    if not path:
        return ""
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                return line
    return ""


def status_of(url, key):
    request = urllib.request.Request(url)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code  # 503 while the model loads
    except OSError:
        return None


def main():
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "unit": {"type": "str", "required": True},
            "timeout": {"type": "int", "default": 600},
            "api_key_file": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    if module.check_mode:
        module.exit_json(changed=False, skipped=True, msg="nothing is (re)started in check mode")
    params = module.params
    key = read_key(params["api_key_file"])
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - 2))
    started = time.monotonic()
    last_status = None
    while time.monotonic() - started < params["timeout"]:
        last_status = status_of(params["url"], key)
        if last_status == 200:
            module.exit_json(changed=False, elapsed=round(time.monotonic() - started, 1))
        active, sub = unit_state(params["unit"])
        if active == "failed" or sub in ("auto-restart", "dead", "failed"):
            module.fail_json(msg=f"{params['unit']} stopped while starting (state {active}/{sub})",
                             journal=journal_tail(params["unit"], since))
        time.sleep(POLL_S)
    module.fail_json(msg=f"{params['url']} did not answer 200 within {params['timeout']} s "
                         f"(last status {last_status})", journal=journal_tail(params["unit"], since))


if __name__ == "__main__":
    main()
