"""llamahost's Pulumi program: a secure, memory-optimized CPU host for llama.cpp, sized from the model.

``__main__.py`` (the Pulumi entry point) calls :func:`llamahost_infra.program.main`; the resources live in
the :class:`~llamahost_infra.host.CpuInferenceHost` and :class:`~llamahost_infra.network.PrivateNetwork`
components; every decision that needs no cloud (sizing, CPU options, volumes, cloud-init, IAM documents,
the Ansible inventory) is a pure function in its own module.
"""
