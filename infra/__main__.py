"""Pulumi entry point for llamahost (`pulumi up` in this directory): read config, build, export.

See README.md here for the configuration keys and the flow from `pulumi up` to `ansible-playbook`.
"""

from llamahost_infra.program import main

main()
