"""Process handles (issue 14): the ring log, attach replay, background, yield, processes,
signal, the background cap, kept results and process events, in memory on a real loop."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from agent import proctable
from agent.loop import Loop
from agent.proctable import ProcessTable, RingLog, Watcher

from tests.agent.fakeclock import FakeClock
from tests.agent.test_dispatch import Harness


@pytest.fixture
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.close()


# -- the ring log -----------------------------------------------------------------------------


def test_a_ring_log_keeps_absolute_offsets_until_it_wraps() -> None:
    """An 8-byte ring log keeps offsets counted from the first byte ever written: after 10 bytes
    ``start`` is 2, ``end`` 10 and ``dropped`` 2, and reads at an offset return the bytes from
    there."""
    log = RingLog(8)
    log.write(b"abcde")
    assert (log.start, log.end, log.dropped) == (0, 5, 0)
    assert log.read(2) == (2, b"cde")
    log.write(b"fghij")
    # 10 bytes written, 8 kept: the first two are gone, offsets do not move.
    assert (log.start, log.end, log.dropped) == (2, 10, 2)
    assert log.read(2) == (2, b"cdefghij")
    assert log.read(7) == (7, b"hij")


def test_a_ring_log_read_before_the_window_starts_at_the_oldest_kept_byte() -> None:
    """A read at an offset that has wrapped out of the log returns the oldest kept offset and the
    bytes from there."""
    log = RingLog(4)
    log.write(b"0123456789")
    assert log.read(0) == (6, b"6789")


def test_a_ring_log_read_beyond_the_end_is_empty_at_the_end() -> None:
    """A read at an offset past the end returns the end offset and no bytes."""
    log = RingLog(4)
    log.write(b"ab")
    assert log.read(100) == (2, b"")


def test_a_write_larger_than_the_ring_keeps_its_tail() -> None:
    """A write longer than the ring leaves only its last bytes, with ``start`` and ``end``
    counting all that was written."""
    log = RingLog(4)
    log.write(b"xy")
    log.write(b"0123456789")
    assert (log.start, log.end, bytes(log.buf)) == (8, 12, b"6789")


def test_a_ring_log_read_is_bounded_by_its_limit() -> None:
    """A read with ``limit`` returns at most that many bytes from the offset asked."""
    log = RingLog(100)
    log.write(b"a" * 50)
    assert log.read(10, limit=5) == (10, b"aaaaa")


# -- helpers over the dispatcher ----------------------------------------------------------------


def second(h: Harness) -> tuple[Any, list[dict[str, Any]]]:
    """Another connection to the same agent, and what it receives."""
    sent: list[dict[str, Any]] = []
    conn = h.agent.connect(lambda b: sent.append(json.loads(b)))
    return conn, sent


def run_until(loop: Loop, done: Any, timeout: float = 10.0) -> None:
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if done():
            return
        loop.run_once(0.02)
    raise AssertionError("condition not met in time")


def stdout_of(messages: list[dict[str, Any]], request_id: str) -> str:
    return "".join(
        m["data"]
        for m in messages
        if m.get("type") == "output" and m["request_id"] == request_id and m["stream"] == "stdout"
    )


def result_in(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((m for m in messages if m.get("type") == "result"), None)


# -- background, attach ---------------------------------------------------------------------------


def test_background_answers_started_at_once_and_attach_replays_everything(loop: Loop) -> None:
    """A ``background`` command is answered ``started`` (with its pid) and nothing more; once it
    ended, another connection's ``attach`` by pid ``since`` 0 gets ``attached`` at offset 0, all
    of its output, then a result with the returncode and pid and an empty ``output``."""
    h = Harness(loop)
    h.send({"request_id": "bg", "command": "for i in 1 2 3; do echo $i; done", "background": True})
    started = h.sent.pop(0)
    assert started["type"] == "started" and started["background"] is True
    pid = started["pid"]
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running)
    assert h.sent == []  # the starting connection gets no result: it did not attach
    conn, got = second(h)
    conn.handle(json.dumps({"type": "attach", "pid": pid, "since": 0}).encode(), False)
    run_until(loop, lambda: result_in(got) is not None)
    assert got[0]["type"] == "attached" and got[0]["since"] == {"stdout": 0, "stderr": 0}
    assert stdout_of(got, "bg") == "1\n2\n3\n"
    result = result_in(got)
    assert result is not None
    assert (result["returncode"], result["pid"], result["output"]) == (0, pid, "")


def test_attach_since_an_offset_replays_only_what_follows_it(loop: Loop) -> None:
    """An ``attach`` by request id ``since`` offset 4 replays one chunk, at offset 4, of the
    output from there on."""
    h = Harness(loop)
    h.send({"request_id": "bg", "command": "printf 0123456789", "background": True})
    pid = h.sent.pop(0)["pid"]
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running)
    h.send({"type": "attach", "request_id": "bg", "since": 4})
    run_until(loop, lambda: result_in(h.sent) is not None)
    chunks = [m for m in h.sent if m.get("type") == "output"]
    assert [(c["offset"], c["data"]) for c in chunks] == [(4, "456789")]


def test_attach_beyond_the_end_starts_at_the_end(loop: Loop) -> None:
    """An ``attach`` ``since`` an offset past the end is ``attached`` at the end offsets and
    replays no output."""
    h = Harness(loop)
    h.send({"request_id": "bg", "command": "printf abc", "background": True})
    pid = h.sent.pop(0)["pid"]
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running)
    h.send({"type": "attach", "pid": pid, "since": 1000})
    run_until(loop, lambda: result_in(h.sent) is not None)
    assert h.sent[0]["since"] == {"stdout": 3, "stderr": 0}
    assert stdout_of(h.sent, "bg") == ""


def test_attach_before_the_kept_window_says_how_much_was_dropped(loop: Loop) -> None:
    """With a 10-byte log, an ``attach`` ``since`` 0 to 16 bytes of output is ``attached`` at
    offset 6 with 6 ``dropped``, replays the 10 kept bytes, and its result reports the drop."""
    h = Harness(loop, log_size=10)
    h.send({"request_id": "bg", "command": "printf 0123456789abcdef", "background": True})
    pid = h.sent.pop(0)["pid"]
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running)
    h.send({"type": "attach", "pid": pid, "since": 0})
    run_until(loop, lambda: result_in(h.sent) is not None)
    attached = h.sent[0]
    assert attached["since"]["stdout"] == 6 and attached["dropped"]["stdout"] == 6
    assert stdout_of(h.sent, "bg") == "6789abcdef"
    result = result_in(h.sent)
    assert result is not None and result["dropped"] == {"stdout": 6, "stderr": 0}


def test_two_watchers_each_get_the_live_output(loop: Loop) -> None:
    """Two connections attached to a running background command both receive its output as it is
    written, and both get its result."""
    h = Harness(loop)
    h.send({"request_id": "bg", "command": "sleep 0.3; echo live", "background": True})
    pid = h.sent.pop(0)["pid"]
    conn, got = second(h)
    conn.handle(json.dumps({"type": "attach", "pid": pid}).encode(), False)
    h.send({"type": "attach", "pid": pid})
    run_until(loop, lambda: result_in(got) is not None and result_in(h.sent) is not None)
    assert stdout_of(got, "bg") == stdout_of(h.sent, "bg") == "live\n"


def test_a_paused_watcher_falls_behind_and_reports_the_bytes_it_missed(loop: Loop) -> None:
    """A slow watcher never holds the process back; it skips what wrapped out of the log."""
    h = Harness(loop, log_size=1000)
    conn, got = second(h)
    h.send({"request_id": "bg", "command": "sleep 0.2; head -c 5000 /dev/zero", "background": True})
    pid = h.sent.pop(0)["pid"]
    conn.handle(json.dumps({"type": "attach", "pid": pid}).encode(), False)
    conn.set_output_paused(True)
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running)  # not held back
    conn.set_output_paused(False)
    run_until(loop, lambda: result_in(got) is not None)
    chunks = [m for m in got if m.get("type") == "output"]
    assert sum(c.get("dropped", 0) for c in chunks) == 4000
    assert sum(len(c["data"]) for c in chunks) == 1000


def test_a_dropped_connection_no_longer_kills_its_command(loop: Loop) -> None:
    """A command sent with ``ack`` is answered ``started`` (not marked ``background``); after its
    connection is lost it runs on, and another connection attaching by request id gets its output
    and a result with returncode 0."""
    h = Harness(loop)
    h.send({"request_id": "r", "command": "sleep 0.3; echo done", "ack": True})
    started = h.sent.pop(0)
    assert started["type"] == "started" and "background" not in started
    h.conn.lost()
    conn, got = second(h)
    conn.handle(json.dumps({"type": "attach", "request_id": "r"}).encode(), False)
    run_until(loop, lambda: result_in(got) is not None)
    assert stdout_of(got, "r") == "done\n"
    result = result_in(got)
    assert result is not None and result["returncode"] == 0


def test_the_owner_still_gets_the_full_result_with_its_pid(loop: Loop) -> None:
    """A plain command's connection gets a result with its output and a ``pid`` the process table
    knows, and no ``dropped`` field."""
    h = Harness(loop)
    h.send({"request_id": "r", "command": "echo hi"})
    result = h.wait_for("result")
    assert result["output"] == "hi\n"
    assert result["pid"] in h.agent.table.by_pid
    assert "dropped" not in result


def test_streamed_chunk_offsets_add_up(loop: Loop) -> None:
    """A streamed command's ``output`` chunks carry their stdout offsets: 0 for ``ab``, 2 for
    ``cde``."""
    h = Harness(loop)
    h.send({"request_id": "r", "command": "printf ab; sleep 0.1; printf cde", "stream": True})
    run_until(loop, lambda: result_in(h.sent) is not None)
    chunks = [m for m in h.sent if m.get("type") == "output"]
    assert [(c["offset"], c["data"]) for c in chunks] == [(0, "ab"), (2, "cde")]


# -- yield_after -------------------------------------------------------------------------------


def test_yield_after_returns_the_output_so_far_and_attach_completes_it(loop: Loop) -> None:
    """A command still running at ``yield_after`` is answered ``yielded`` with its output and
    offsets so far and leaves the connection's runs; an ``attach`` since those offsets gets the
    rest."""
    h = Harness(loop)
    h.send({"request_id": "y", "command": "echo first; sleep 0.6; echo second", "yield_after": 0.3})
    yielded = h.wait_for("yielded")
    assert yielded["output"] == "first\n"
    assert yielded["offset"] == {"stdout": 6, "stderr": 0}
    assert "y" not in h.conn.runs
    h.send({"type": "attach", "pid": yielded["pid"], "since": yielded["offset"]})
    run_until(loop, lambda: result_in(h.sent) is not None)
    assert stdout_of(h.sent, "y") == "second\n"


def test_a_command_done_before_yield_after_gets_its_plain_result(loop: Loop) -> None:
    """A command that ends before ``yield_after`` gets its ordinary result and no ``yielded``."""
    h = Harness(loop)
    h.send({"request_id": "y", "command": "echo quick", "yield_after": 5})
    assert h.wait_for("result")["output"] == "quick\n"
    assert not any(m.get("type") == "yielded" for m in h.sent)


# -- processes, signal, errors, limits -------------------------------------------------------------


def test_processes_lists_running_and_finished_commands(loop: Loop) -> None:
    """``processes`` lists a finished command as ``exited`` with its returncode and byte counts
    and a background one as ``running`` with its pid; a ``signal`` KILL to it is answered
    ``signalled`` with ``delivered`` true."""
    h = Harness(loop)
    h.send({"request_id": "done", "command": "echo x"})
    h.wait_for("result")
    h.send({"request_id": "bg", "command": "sleep 5", "background": True})
    pid = h.sent.pop(0)["pid"]
    h.send({"type": "processes", "request_id": "q"})
    listing = h.wait_for("processes")
    by_rid = {p["request_id"]: p for p in listing["processes"]}
    assert by_rid["done"]["state"] == "exited" and by_rid["done"]["returncode"] == 0
    assert by_rid["done"]["bytes"] == {"stdout": 2, "stderr": 0}
    assert by_rid["bg"]["state"] == "running" and by_rid["bg"]["pid"] == pid
    h.send({"type": "signal", "pid": pid, "signal": "KILL"})
    assert h.wait_for("signalled")["delivered"] is True


def test_signal_term_reaches_the_whole_process_group(loop: Loop) -> None:
    """A ``signal`` TERM by request id is answered ``signalled`` for TERM, and the background
    command (a shell with two sleeps) ends within 5 s with returncode -15."""
    h = Harness(loop)
    h.send({"request_id": "bg", "command": "sleep 30 & sleep 30; wait", "background": True})
    pid = h.sent.pop(0)["pid"]
    h.send({"type": "signal", "request_id": "bg", "signal": "TERM"})
    assert h.wait_for("signalled")["signal"] == "TERM"
    run_until(loop, lambda: not h.agent.table.by_pid[pid].running, timeout=5)
    assert h.agent.table.by_pid[pid].returncode == -15


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "attach", "pid": 999999}, "unknown_process"),
        ({"type": "attach", "request_id": "nope"}, "unknown_process"),
        ({"type": "signal", "pid": 999999, "signal": "TERM"}, "unknown_process"),
        ({"type": "attach"}, "invalid_pid"),
        ({"type": "attach", "pid": -3}, "invalid_pid"),
        ({"type": "attach", "pid": 1, "since": -1}, "invalid_since"),
        ({"type": "signal", "pid": 1, "signal": "BOOM"}, "invalid_signal"),
        ({"command": "true", "background": "yes"}, "invalid_background"),
        ({"command": "true", "yield_after": 0}, "invalid_yield_after"),
        ({"command": "true", "on_disconnect": "explode"}, "invalid_on_disconnect"),
        ({"command": "true", "background": True, "session": "s"}, "unsupported"),
    ],
)
def test_bad_process_messages_get_an_error_code(
    loop: Loop, message: dict[str, Any], code: str
) -> None:
    """Each bad ``attach``, ``signal`` or command field (unknown pid or request id, bad pid,
    since, signal, background, yield_after or on_disconnect, background in a session) gets an
    ``error`` with its own code."""
    h = Harness(loop)
    h.send(message)
    assert h.sent[-1]["type"] == "error" and h.sent[-1]["error_code"] == code


def test_signal_to_a_finished_process_is_not_running(loop: Loop) -> None:
    """A ``signal`` to the pid of a command that has ended gets a ``not_running`` error."""
    h = Harness(loop)
    h.send({"request_id": "r", "command": "true"})
    pid = h.wait_for("result")["pid"]
    h.send({"type": "signal", "pid": pid, "signal": "TERM"})
    assert h.sent[-1]["error_code"] == "not_running"


def test_background_processes_beyond_the_cap_are_too_many_commands(loop: Loop) -> None:
    """With ``max_background`` 2, a third background command gets ``too_many_commands`` and is
    not started."""
    h = Harness(loop, max_background=2)
    for i in range(2):
        h.send({"request_id": f"b{i}", "command": "sleep 5", "background": True})
    h.send({"request_id": "b2", "command": "sleep 5", "background": True})
    assert h.sent[-1]["error_code"] == "too_many_commands"
    assert len(h.agent.table.by_pid) == 2
    h.agent.kill_all()


def test_finished_results_are_forgotten_after_the_retention(loop: Loop) -> None:
    """A finished command is kept in the table, forgotten once ``result_retention`` (0.3 s) has
    passed, and an ``attach`` to it is then ``unknown_process``."""
    h = Harness(loop, result_retention=0.3)
    h.send({"request_id": "r", "command": "true"})
    pid = h.wait_for("result")["pid"]
    assert pid in h.agent.table.by_pid
    run_until(loop, lambda: pid not in h.agent.table.by_pid, timeout=3)
    h.send({"type": "attach", "pid": pid})
    assert h.sent[-1]["error_code"] == "unknown_process"


def test_kept_logs_are_bounded_in_all_oldest_first(loop: Loop) -> None:
    """With ``kept_log_bytes`` 3000, three finished commands of 1200 bytes each leave the oldest
    forgotten, the newest kept, and at most 3000 bytes kept."""
    h = Harness(loop, kept_log_bytes=3000)
    pids = []
    for i in range(3):
        h.send({"request_id": f"r{i}", "command": "head -c 1200 /dev/zero"})
        pids.append(h.wait_for("result")["pid"])
    table = h.agent.table
    assert pids[0] not in table.by_pid and pids[2] in table.by_pid
    assert table.finished_bytes <= 3000


# -- events ---------------------------------------------------------------------------------------


def test_events_report_started_and_exited_and_resume_after_an_id(loop: Loop) -> None:
    """A ``subscribe_events`` connection gets ``started`` then ``exited`` (with returncode and
    the same pid) for a background command; a subscriber with ``last_event_id`` of the first gets
    only ``exited``."""
    h = Harness(loop)
    conn, got = second(h)
    conn.handle(json.dumps({"type": "subscribe_events", "request_id": "ev"}).encode(), False)
    h.send({"request_id": "bg", "command": "exit 4", "background": True})
    run_until(loop, lambda: any(e.get("event") == "exited" for e in got))
    kinds = [(e["event"], e["request_id"]) for e in got]
    assert kinds == [("started", "bg"), ("exited", "bg")]
    assert got[1]["returncode"] == 4 and got[1]["pid"] == got[0]["pid"]
    conn3, replay = second(h)
    first_id = got[0]["id"]
    conn3.handle(
        json.dumps({"type": "subscribe_events", "last_event_id": first_id}).encode(), False
    )
    assert [e["event"] for e in replay] == ["exited"]


def test_many_finished_commands_arm_one_expiry_timer(loop: Loop) -> None:
    """Keeping results must not leave a timer per command in the loop for the retention."""
    h = Harness(loop)
    for i in range(20):
        h.send({"request_id": f"r{i}", "command": "true"})
        h.wait_for("result")
    expiry = [t for t in loop._timers if getattr(t.callback, "__self__", None) is h.agent.table]
    assert len(expiry) == 1 and not expiry[0].cancelled


class _Owner:
    """A connection that records what a watcher sends it."""

    open = True
    output_paused = False

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_message(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def send_binary(self, payload: bytes) -> None:
        self.sent.append(payload)

    def watcher_done(self, watcher: Any) -> None:
        pass


def test_pty_output_goes_out_at_once_when_typing_and_coalesced_in_a_flood() -> None:
    """A PTY watcher sends a keystroke's echo without the 5 ms coalescing delay, and goes
    back to coalescing right after it sent a burst (>= PTY_BURST_BYTES), so a flood becomes
    fewer, larger messages; after a quiet moment it is immediate again."""
    clock = FakeClock()
    table = ProcessTable(clock, 1 << 20, 60.0, 8, 1 << 24)
    entry = table.add(123, "t", "bash -l", True, pty=True)
    owner = _Owner()
    watcher = Watcher(entry, owner, {"pty": 0}, clock)
    entry.watchers.add(watcher)
    entry.write("pty", b"k")
    clock.advance(0.0)
    assert [m["data"] for m in owner.sent] == ["k"]  # the echo: no delay
    entry.write("pty", b"x" * proctable.PTY_BURST_BYTES)
    clock.advance(0.0)
    assert len(owner.sent) == 2  # the first chunk of a flood: no delay either
    entry.write("pty", b"y" * 100)
    clock.advance(0.0)
    assert len(owner.sent) == 2  # right after a burst: coalesced
    entry.write("pty", b"y" * 100)
    clock.advance(proctable.WATCH_DELAY)
    assert owner.sent[-1]["data"] == "y" * 200 and owner.sent[-1]["offset"] == 2049
    clock.advance(proctable.PTY_BURST_WINDOW)
    entry.write("pty", b"z")
    clock.advance(0.0)
    assert owner.sent[-1]["data"] == "z"  # quiet again: immediate
