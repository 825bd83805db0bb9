"""The FIFO way in: `echo "temp high" > in.fifo` from scripts and cron jobs."""

from __future__ import annotations

import os
import stat
import subprocess
import time

from .support import Client, cpu_ticks, settled_client, voluntary_ctxt_switches

IDLE_SECONDS = 2.0


def write_fifo(path, data: bytes) -> None:
    """One writer: open, write, close (O_NONBLOCK: fail instead of hanging if nobody reads)."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_fifo_lines_arrive_and_the_idle_server_sleeps(start_server, short_tmp, clients):
    fifo = short_tmp / "in.fifo"
    server = start_server("--fifo", str(fifo), "--fifo-name", "cron")
    st = os.stat(fifo)
    assert stat.S_ISFIFO(st.st_mode)
    assert not st.st_mode & 0o002, "the FIFO must not be world-writable"
    c = settled_client(server, server.port, "reader")
    clients.append(c)

    # The shell way, exactly as a cron job does it.
    subprocess.run(["sh", "-c", f'echo "temp high" > "{fifo}"'], check=True, timeout=5)
    c.expect(r"^cron: temp high$")
    # Writers coming and going, one after the other and several at once.
    for i in range(5):
        write_fifo(fifo, f"reading {i}\n".encode())
    fds = [os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) for _ in range(3)]
    for i, fd in enumerate(fds):
        os.write(fd, f"overlapping {i}\n".encode())
    for fd in reversed(fds):
        os.close(fd)
    write_fifo(fifo, b"\x1b[31malarm\x1b[0m \x1b]0;title\x07with CRLF\r\n")
    write_fifo(fifo, b"last one\n")
    for i in range(5):
        c.expect(rf"^cron: reading {i}$")
    for i in range(3):
        c.expect(rf"^cron: overlapping {i}$")
    c.expect(r"^cron: alarm with CRLF$")
    c.expect(r"^cron: last one$")
    assert b"\x1b" not in c.raw and b"\r" not in c.raw

    # Idle now: every writer is gone, no join or leave pending. The loop must
    # sleep in epoll_wait until something happens. A periodic wake-up (a
    # polling timer) would add a voluntary context switch per tick, and an FIFO
    # stuck at EOF (epoll reporting it readable on every turn) would burn CPU
    # without sleeping at all, so both counters are checked. Up to 2 switches
    # are noise: the loop may still be finishing its last turn (the final
    # flush, then going to sleep) when the first sample is taken.
    v0, t0 = voluntary_ctxt_switches(server.pid), cpu_ticks(server.pid)
    time.sleep(IDLE_SECONDS)  # a measurement window, not a synchronisation
    v1, t1 = voluntary_ctxt_switches(server.pid), cpu_ticks(server.pid)
    assert v1 - v0 <= 2, f"the idle server woke up {v1 - v0} times in {IDLE_SECONDS} s"
    assert t1 - t0 <= 5, f"the idle server used {t1 - t0} clock ticks of CPU"
    # And it is still awake for real events.
    write_fifo(fifo, b"after the nap\n")
    c.expect(r"^cron: after the nap$")


def test_fifo_partial_line_blocks_nothing(start_server, short_tmp, clients):
    fifo = short_tmp / "in.fifo"
    server = start_server("--fifo", str(fifo), "--fifo-name", "cron")
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])

    # A writer that writes half a line and keeps the FIFO open.
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"half a line without newline")
        for i in range(20):
            a.send_line(f"chat {i}")
        for i in range(20):
            b.expect(rf"^{a.name}: chat {i}$")
        b.send_line("answer")
        a.expect(rf"^{b.name}: answer$")
        assert not [line for line in a.history + b.history if line.startswith("cron: ")]
        # When it finally ends its line, the whole line goes out.
        os.write(fd, b", now ended\n")
        a.expect(r"^cron: half a line without newline, now ended$")
        b.expect(r"^cron: half a line without newline, now ended$")
    finally:
        os.close(fd)


def test_fifo_overlong_line_is_dropped_and_logged(start_server, short_tmp, clients):
    fifo = short_tmp / "in.fifo"
    server = start_server("--fifo", str(fifo), "--fifo-name", "cron", "--max-line", "100")
    c = Client(server.port, "reader")
    clients.append(c)
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"x" * 500 + b"\n" + b"short one\n")
    finally:
        os.close(fd)
    c.expect(r"^cron: short one$")
    assert not [line for line in c.history if "xxxx" in line]
    server.wait_for_log(r"longer than 100 bytes")


def test_an_unterminated_line_is_taken_when_its_writer_closes(start_server, short_tmp, clients):
    fifo = short_tmp / "in.fifo"
    server = start_server("--fifo", str(fifo), "--fifo-name", "cron")
    c = settled_client(server, server.port, "reader")
    clients.append(c)
    subprocess.run(["sh", "-c", f'printf "no newline" > "{fifo}"'], check=True, timeout=5)
    c.expect(r"^cron: no newline$")
    # The FIFO is read anew after that end of file: later writers still arrive.
    write_fifo(fifo, b"next\n")
    c.expect(r"^cron: next$")


def test_members_cannot_take_the_fifo_name(start_server, short_tmp, clients):
    fifo = short_tmp / "in.fifo"
    server = start_server("--fifo", str(fifo), "--fifo-name", "cron")
    c = Client(server.port, "spoofer")
    clients.append(c)
    c.send_line("/nick Cron")
    c.expect(r"^! the name Cron is reserved")
