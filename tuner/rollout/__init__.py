"""Rolling a written winner out: a canary host first, measured under the workload before and after, then the rest.

The modules that run on the canary host itself (:mod:`tuner.rollout.on_host`, with the workload driver it
imports) use the standard library only: they travel there as one zip file over Ansible's own connection.
"""
