"""Process helpers: exit statuses, the process tree scan, the OOM counter, quoting."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from agent import procs


def test_descendants_include_group_session_and_children_but_not_the_shell() -> None:
    """From a pid table, the descendants of the shell are its child, the grandchild that called
    setsid and an orphan still in its group; not the shell itself nor an unrelated process."""
    table = {
        10: (1, 10, 10),  # the shell
        11: (10, 11, 10),  # a child in its own group, same session
        12: (11, 12, 12),  # a grandchild that called setsid
        13: (1, 10, 10),  # an orphan re-parented to init, still in the shell's group
        20: (1, 20, 20),  # unrelated
    }
    assert procs.descendants_in(table, 10) == {11, 12, 13}


def test_returncode_of_exit_and_signal() -> None:
    """A wait status of exit 3 gives 3; one of death by SIGKILL gives -9."""
    assert procs.returncode_of(3 << 8) == 3
    assert procs.returncode_of(signal.SIGKILL) == -9


def test_oom_kill_count_reads_v1_then_v2_files(tmp_path: Path) -> None:
    """The first readable counter file with an ``oom_kill`` line wins, in the order given (the
    cgroup v1 ``memory.oom_control`` before v2's ``memory.events``); a missing file, or one
    without the line, is skipped; with no readable file the count is None."""
    v1 = tmp_path / "memory.oom_control"
    v1.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    v2 = tmp_path / "memory.events"
    v2.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    assert procs.oom_kill_count((str(v1), str(v2))) == 5
    assert procs.oom_kill_count((str(tmp_path / "missing"), str(v2))) == 2
    v1.write_text("oom_kill_disable 0\nunder_oom 0\n")
    assert procs.oom_kill_count((str(v1), str(v2))) == 2
    assert procs.oom_kill_count((str(tmp_path / "missing"),)) is None


def test_shell_quote_round_trips_through_sh() -> None:
    """Text with quotes, ``$``, backticks, a backslash and a newline, quoted by ``shell_quote``,
    comes out of ``sh -c printf`` unchanged."""
    text = 'it\'s "$HOME" `x` \\ \n'
    out = subprocess.run(
        ["sh", "-c", f"printf %s {procs.shell_quote(text)}"], capture_output=True, check=True
    )
    assert out.stdout.decode() == text


def test_kill_group_kills_the_whole_group() -> None:
    """``kill_group`` SIGKILLs a new session's shell (exit -9) and the sleep it backgrounded in
    the same group, which ends dead or a zombie within 5 s."""
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 30 & echo $!; wait"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    background = int(proc.stdout.readline())
    procs.kill_group(proc.pid)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    # the background sleep was in the same group: it got SIGKILL too (dead or a zombie). A
    # SIGKILLed process may still show as running for a moment, so wait for its end (bounded).
    deadline = time.monotonic() + 5
    while True:
        try:
            state = Path(f"/proc/{background}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "gone"
        if state in ("Z", "X", "gone") or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert state in ("Z", "X", "gone")
