"""Container runtimes: ``interface`` (what the gateway asks of one, its records and failures),
``labels`` (the label codec), ``hardening`` (limits and the container's fixed layout) and
``docker`` (``DockerRuntime``, the only module that talks to the docker SDK)."""
