"""twistedgw sandbox agent: runs shell commands for the gateway over a WebSocket.

Runs inside the sandbox container under its supervisor (``supervise``, under tini), as the
user ``agent`` with only the SETUID, SETGID and KILL capabilities, and starts every command
and session shell as the unprivileged user ``sandbox`` with a raised ``oom_score_adj`` (see
``spawn``).  Started as ``python3 -m agent``, it serves, on TCP ``0.0.0.0:$AGENT_PORT``
(default 8765) or on the Unix socket ``$AGENT_UNIX_SOCKET``:

* ``GET /healthz``  -> ``200 ok`` (no auth), for readiness probes;
* ``/agent``        -> a WebSocket.  The opening handshake must carry
  ``Authorization: Bearer $SANDBOX_AGENT_SECRET``, else it is refused with HTTP 401.

Only the standard library and ``twistedgw.protocol`` (itself stdlib only) are used: a small
event loop on ``selectors`` (``loop``; asyncio and what it imports would cost ~3 MiB of every
agent's memory), and a small server-side RFC 6455 implementation (``wsproto``).  PROTOCOL.md
is the spec of record for the messages; ``twistedgw.protocol`` parses, validates and builds
them.

Modules, along the agent's seams:

* ``config``   - the environment (below), read once;
* ``capture``  - output capture: head+tail capped buffer, chunk coalescing for streams;
* ``spawn``    - ``start_process``, the one function that starts user processes;
* ``spawner``  - its client of the persistent spawner (``spawner.c``), which starts them as
  ``sandbox`` without an exec'd wrapper per process;
* ``child``    - a started process on the loop (pipes, pause/resume, stdin, SIGCHLD reaping);
* ``procs``    - /proc scans, killing process groups, the cgroup OOM counter;
* ``runs``     - plain commands; ``sessions`` - persistent shells with end markers;
* ``proctable`` - the process table: bounded per-stream logs, kept results, attach
  watchers, process events (issue 14);
* ``dispatch`` - the protocol over that process model (testable without a socket);
* ``wsproto``  - handshake and framing; ``server`` - HTTP + WebSocket on the loop;
* ``loop``     - the event loop (asyncio's method names); ``log`` - stderr logging;
* ``main``     - start-up.

Behaviour (what PROTOCOL.md leaves to the agent)
================================================

* A command runs as ``bash -c COMMAND`` (``sh`` when bash is missing) in its own session and
  process group (``posix_spawn`` with ``setsid``: no fork of the agent's memory), with a small
  clean environment (HOME, USER, LOGNAME, PATH, LANG, SHELL, plus ``SANDBOX_COMMAND_ENV`` and
  the command's ``env``), in ``$HOME`` or ``cwd`` (relative to ``$HOME``; it must exist).
* ``timeout`` and cancel SIGKILL the command's whole process group; a closed connection only
  does for commands sent with ``on_disconnect: kill``.  Other plain commands run on into the
  process table (``proctable``), which outlives connections: their output goes to a ring per
  stream, their result is kept for ``$AGENT_RESULT_RETENTION`` s for ``attach``.
* ``stream: true``: output chunks in order per stream (UTF-8 decoded incrementally), small
  reads coalesced (a stream's pending bytes go out at 64 KiB or 5 ms after the first unsent
  byte, and always before the result).  When the WebSocket's send buffer passes 512 KiB the
  agent stops reading the pipes of the connection's streamed commands until it drains, so the
  commands block and the agent's memory stays flat.
* Buffered output: stdout and stderr are each capped at ``$AGENT_MAX_OUTPUT`` bytes (the first
  and last half kept, ``truncated`` set); past ``$AGENT_KILL_OUTPUT`` bytes on one stream the
  process group is SIGKILLed (``output_limit_exceeded``).
* When a command's main process has exited but something it started in the background still
  holds the pipes, the agent waits at most 0.5 s more, then closes its ends and answers
  (``sleep 100 & echo x`` answers at once); the background processes are not killed.
* ``interactive: true``: stdin stays open, fed by ``stdin`` messages (buffered in the agent).
* Sessions: a long-lived ``bash --noprofile --norc`` per name, shared by the agent's
  connections, surviving the WebSocket that started it; commands run one at a time in the
  shell itself (``cd``/``export``/variables persist), with a random end marker on stdout (with
  ``$?``) and stderr that is stripped from the output.  Timeout/cancel/output limit kill every
  process of the shell's session and below the shell every 100 ms for up to 1 s; if the markers
  do not come back the shell is replaced (``session_restarted: true``).
* A command killed by a SIGKILL the agent did not send, while the container's memory cgroup
  counted a new OOM kill, gets ``oom_killed: true`` and a note at the end of ``error``.
* Any WebSocket message gets a JSON reply (binary, bad UTF-8, bad JSON included); only a
  violation of RFC 6455 framing closes the connection (1002, or 1009 past 64 MiB).

Environment:
    SANDBOX_AGENT_SECRET   required; removed from the environment once read
    SANDBOX_COMMAND_ENV    JSON object of variables every command gets (the sandbox creator's
                           ``env``); removed from the environment once read
    AGENT_PORT             TCP port to listen on (default 8765)
    AGENT_UNIX_SOCKET      listen on this Unix socket instead (sandboxes without a network)
    AGENT_MAX_OUTPUT       head+tail cap in bytes for each of stdout / stderr (default 1048576)
    AGENT_KILL_OUTPUT      kill a non-streamed command when one of its streams passes this many
                           bytes (default 67108864; 0 = never)
    AGENT_DEFAULT_TIMEOUT  seconds, for commands without ``timeout`` (default 900)
    AGENT_MAX_TIMEOUT      seconds, largest ``timeout`` accepted (default 3600, as the gateway's
                           ``--max-timeout``; above it: ``invalid_timeout``, never clamped)
    AGENT_MAX_RUNNING      commands running or queued per connection (default 64)
    AGENT_MAX_SESSIONS     sessions per agent (default 16; 0 = no sessions)
    AGENT_LOG_LEVEL        debug | info | warn | error (default info); per-command lines are debug
    AGENT_SPAWN            ``fork`` to start commands with fork+exec instead of posix_spawn
                           (where they are not started by the spawner)
    AGENT_SPAWNER          ``off`` to start every user process through the runas wrapper
                           instead of the persistent spawner (default on, when the image has it)
    AGENT_LOG_SIZE         bytes kept per output stream of each process (default 2097152)
    AGENT_RESULT_RETENTION seconds a finished process's result and log are kept (default 900)
    AGENT_MAX_BACKGROUND   background processes running at once (default 32)
    AGENT_KEPT_LOG_BYTES   bytes of finished processes' logs kept in all (default 67108864)
"""
