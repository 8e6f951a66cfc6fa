"""How a sandbox container is confined: resource limits and hardening (``ContainerLimits``,
the operator's options, as ``containers.run`` arguments), and the fixed layout the image
expects (users, capabilities, the agent's port and socket)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import evolve, frozen

if TYPE_CHECKING:
    from twistedgw.sandbox import Resources

#: Port the agent listens on inside the container.
AGENT_PORT = 8765

#: Where a network-less sandbox's socket directory is mounted, and the agent's socket in it.
SOCKET_MOUNT = "/run/twistedgw"
SOCKET_NAME = "agent.sock"
#: The gateway's egress proxy socket in that directory (sandboxes with an ``egress`` list),
#: and the loopback port inside the sandbox where the agent forwards to it.
EGRESS_SOCKET_NAME = "proxy.sock"
EGRESS_PORT = 3128
#: The longest path a Unix socket address holds (``sun_path`` is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: The image's unprivileged user, who runs the user's code.
SANDBOX_UID = 1000
#: The image's agent user, who must be able to create the agent's socket (and no one else).
AGENT_UID = 999

#: The only capabilities a sandbox keeps (everything else is dropped): the image starts as
#: root only for its supervisor to change to the agent user at once, keeping these three for
#: the agent: SETUID and SETGID to start user processes as the sandbox user, KILL to signal
#: them (they have another uid). User processes get none (SECURITY.md).
AGENT_CAPABILITIES = ("SETUID", "SETGID", "KILL")


@frozen
class ContainerLimits:
    """Resource limits and hardening for sandbox containers (operator options)."""

    memory: str = "1g"
    cpus: float = 1.0
    pids: int = 256
    nofile: int = 1024
    read_only_root: bool = True
    home_size: str = "256m"
    tmp_size: str = "128m"
    log_size: str = "10m"
    runtime: str | None = None
    #: Size of /dev/shm (a tmpfs Docker mounts nosuid, nodev, noexec; it counts towards the
    #: memory limit). /dev/mqueue is bounded by the kernel's per-user RLIMIT_MSGQUEUE.
    shm_size: str = "64m"
    #: Allow executing files in the home, /tmp and /var/tmp (Docker mounts tmpfs ``noexec``
    #: unless told otherwise). Templates for development need it: venvs run scripts from the
    #: home and Python extension modules are mapped executable (image label
    #: ``org.twistedgw.exec-tmpfs``).
    exec_tmpfs: bool = False

    def for_resources(
        self, resources: Resources | None, most_tmp: int | None = None
    ) -> ContainerLimits:
        """These limits with a sandbox's ``cpus``, ``memory`` and ``disk``: ``disk`` sizes
        the home tmpfs, and /tmp and /var/tmp keep these limits' proportion to it (at most
        ``most_tmp`` bytes, the largest disk allowed)."""
        if resources is None:
            return self
        home, tmp = size_bytes(self.home_size), size_bytes(self.tmp_size)
        tmp = max(1024 * 1024, resources.disk * tmp // home)
        if most_tmp is not None:
            tmp = min(tmp, most_tmp)
        return evolve(
            self,
            cpus=resources.cpus,
            memory=str(resources.memory),
            home_size=str(resources.disk),
            tmp_size=str(tmp),
        )

    def run_options(self) -> dict[str, Any]:
        """``containers.run`` keyword arguments for these limits (less the Ulimit objects)."""
        options: dict[str, Any] = {
            "mem_limit": self.memory,
            # Swap equal to memory: no swap on top of the memory limit.
            "memswap_limit": self.memory,
            "nano_cpus": int(self.cpus * 1e9),
            "pids_limit": self.pids,
            "shm_size": self.shm_size,
            "cap_drop": ["ALL"],
            "cap_add": list(AGENT_CAPABILITIES),
            "security_opt": ["no-new-privileges"],
            "log_config": {
                "type": "json-file",
                "config": {"max-size": self.log_size, "max-file": "2"},
            },
        }
        if self.read_only_root:
            # Writable places are sized tmpfs mounts: a disk fill stops at their size (and
            # counts towards the memory limit). storage_opt size would need overlay2 on xfs
            # with project quotas, which Docker hosts rarely have.
            options["read_only"] = True
            flags = "rw,nosuid,nodev" + (",exec" if self.exec_tmpfs else "")
            home = f"{flags},size={self.home_size},uid=1000,gid=1000,mode=0755"
            options["tmpfs"] = {
                "/home/sandbox": home,
                "/tmp": f"{flags},size={self.tmp_size},mode=1777",
                "/var/tmp": f"{flags},size={self.tmp_size},mode=1777",
            }
        if self.runtime:
            options["runtime"] = self.runtime
        return options


DEFAULT_LIMITS = ContainerLimits()


_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size_bytes(text: str | int) -> int:
    """``512m``, ``2g``, ``1048576`` (bytes) as a number of bytes; ``ValueError`` otherwise."""
    if isinstance(text, int):
        return text
    raw = text.strip().lower()
    unit = raw[-1:] if raw[-1:] in _UNITS else ""
    number = raw[: len(raw) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"{text!r} is not a size like 512m or 2g")
    return int(number) * _UNITS[unit]


def socket_path_length(socket_dir: Path) -> int:
    """Bytes in the longest socket path a network-less sandbox gets under ``socket_dir``
    (``<socket_dir>/<32-hex sandbox id>/<socket name>``, absolute, as the gateway dials it)."""
    name = max(SOCKET_NAME, EGRESS_SOCKET_NAME, key=len)
    return len(os.fsencode(socket_dir.absolute() / ("0" * 32) / name))
