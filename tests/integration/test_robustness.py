"""What a hostile or broken peer can send, and a peer that stops reading."""

from __future__ import annotations

import re
import socket
import time

import pytest

from .support import Client, StructuredClient, tcp_wmem_max

# Bytes that must never reach anyone's terminal: C0 controls but TAB and LF, and DEL.
FORBIDDEN = set(range(0x00, 0x09)) | set(range(0x0B, 0x20)) | {0x7F}
C1 = re.compile("[\x80-\x9f]")


def test_overlong_line_gets_one_error_and_the_connection_lives_on(server, clients):
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])
    a.send_raw(b"x" * (1 << 20) + b"\n", timeout=10)
    a.send_line("after the big one")
    b.expect(rf"^{a.name}: after the big one$")
    assert not [line for line in b.history if "xxx" in line], "part of the long line leaked"
    b.send_line("sentinel")
    a.expect(rf"^{b.name}: sentinel$")
    errors = [line for line in a.history if line.startswith("! ")]
    assert len(errors) == 1, errors
    assert "4096" in errors[0], errors[0]  # it names the limit


def test_invalid_utf8_arrives_as_replacement_characters(server, clients):
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])
    a.send_line(b"bad \xc3\x28 and \x80 end")
    b.expect(rf"^{a.name}: bad ")
    expected = f"{a.name}: bad \ufffd( and \ufffd end\n".encode()
    assert expected in b.raw, bytes(b.raw)
    b.raw.decode("utf-8")  # everything the server sent is valid UTF-8


NASTY = [
    b"\x1b[31mRED\x1b[0m plain",
    b"\x1b]0;pwned title\x07after osc",
    b"\x1b]52;c;ZXZpbA==\x1b\\after clipboard",
    b"\x1bP+q544e\x1b\\after dcs query",
    b"\x1b[6n\x1b[2J\x1b[Hafter cursor games",
    "\u009b31mC1 CSI".encode(),
    "\u009d0;title\u009cafter C1 OSC".encode(),
    "\u0085next line \u0090 dcs".encode(),
    b"bell\x07 bs\x08 nul\x00 del\x7f vt\x0b ff\x0c cr\r mid",
    b"\xff\xf4\xff\xfd\x06after telnet ctrl-c",
    b"\x1b",
    b"\x1bc reset",
]


def test_escape_sequences_never_reach_another_client(server, clients):
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])
    watcher = StructuredClient(server.port, name="watcher")
    clients.append(watcher)
    for line in NASTY:
        a.send_line(line)
    a.send_line("end of escapes")
    b.expect(rf"^{a.name}: end of escapes$")
    watcher.expect(type="msg", text="end of escapes")

    bad = sorted({f"0x{x:02x}" for x in b.raw if x in FORBIDDEN})
    assert not bad, f"control bytes {bad} reached a plain client: {bytes(b.raw)!r}"
    text = b.raw.decode("utf-8")
    assert not C1.search(text), f"C1 controls reached a plain client: {text!r}"
    for frame in watcher.frames:  # after JSON decoding, too
        for value in frame.values():
            if isinstance(value, str):
                assert not [c for c in value if ord(c) in FORBIDDEN or C1.match(c)], frame
    # The visible text around the sequences survives.
    for visible in ("RED plain", "after osc", "after clipboard", "after cursor games", "C1 CSI"):
        assert any(visible in line for line in b.history), visible
    assert not any("pwned" in line for line in b.history), "an OSC payload leaked"


def test_a_reader_that_never_reads_is_dropped_while_others_chat(start_server, clients):
    server = start_server("--max-queue", "65536", "--rate-limit", "0")  # a floods on purpose
    # Tiny receive buffer, set before connecting, and never a recv().
    slow = Client(server.port, "slow", rcvbuf=1024, welcome=False)
    clients.append(slow)
    slow_address = f"127.0.0.1:{slow.sock.getsockname()[1]}"
    a = Client(server.port, "a")
    b = Client(server.port, "b")
    clients.extend([a, b])

    # The kernel buffers what it can for the slow reader (its send buffer grows
    # up to tcp_wmem's maximum, a few MB), so keep the two talking until the
    # server gives up on it: at least 2000 messages, at most enough to fill
    # any kernel buffer several times over.
    payload = "y" * 1000
    batch = 50  # ~52 KB per batch: b reads each before the next, so b is never too slow
    cap = max(10_000, 3 * tcp_wmem_max() // 1000)
    pattern = rf"Disconnecting \S+ \({re.escape(slow_address)}\): too slow"
    started = time.monotonic()
    sent = 0
    while sent < 2000 or not any(re.search(pattern, line) for line in server.lines):
        assert sent < cap, f"the reader that never reads was not dropped after {sent} messages"
        a.send_raw(b"".join(f"{i:05d} {payload}\n".encode() for i in range(sent, sent + batch)))
        for i in range(sent, sent + batch):
            m = b.expect(rf"^{a.name}: (\d{{5}}) y+$", timeout=5)
            assert int(m.group(1)) == i
        sent += batch
    took = time.monotonic() - started
    assert took < 15, f"{sent} messages took {took:.1f} s"
    line = server.wait_for_log(pattern)
    assert "max_queue" in line or "65536" in line, line
    # The server closed it: once it reads, the slow reader gets a finite stream and EOF.
    slow.read_until_eof(timeout=10)
    assert slow.raw.startswith(b"* Welcome to picchat!")
    # And a and b are still fine.
    b.send_line("still here?")
    a.expect(rf"^{b.name}: still here\?$")


def test_lines_after_quit_while_the_goodbye_is_queued_are_ignored(start_server, clients):
    # A peer that says /quit but does not read keeps its connection open
    # until its output drains; whatever it sends meanwhile must not reach the
    # room (it is no longer a member) nor take the server down.
    total = tcp_wmem_max() + (1 << 20)  # more than the kernel buffers for it
    if total > 64 << 20:
        pytest.skip(f"tcp_wmem allows {total} bytes of kernel buffer: too much to fill quickly")
    server = start_server("--max-line", "65536", "--max-queue", str(2 * total))
    stuck = Client(server.port, "stuck", rcvbuf=1024, welcome=False)
    talker = Client(server.port, "talker")
    listener = Client(server.port, "listener")
    clients.extend([stuck, talker, listener])
    chunk = 60_000
    for i in range(total // chunk + 1):
        talker.send_line(f"{i:05d} " + "z" * chunk)
        listener.expect(rf": {i:05d} z+$")

    mark = server.mark()
    stuck.send_line("/quit")
    server.wait_for_log(r"left: quit", start=mark)
    stuck.send_line("/nick boom")
    stuck.send_line("ghost message")
    stuck.send_line("/who")
    # Now read: everything queued, the goodbye, then the end. (A bigger
    # buffer first: through a 2 KB window, 5 MB would crawl.) The server
    # serves a socket's reading before its writing in each turn, so by the
    # end of the output it has read the lines above.
    stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rest = stuck.read_until_eof(timeout=10)
    assert rest and rest[-1] == "* Goodbye.", [line[:60] for line in rest[-3:]]
    assert server.proc.poll() is None, server.log[-2000:]
    talker.send_line("still up")
    listener.expect(rf"^{talker.name}: still up$")
    assert not [line for line in listener.history if "ghost" in line or "boom" in line]
    assert "Traceback" not in server.log


def test_many_talkers_at_once_do_not_make_a_reading_member_too_slow(start_server, clients):
    # Output waits while input keeps arriving (the loop's when-quiet flush),
    # but not once a queue is half full: ten talkers' bursts arriving
    # together put 10 x 4 KiB a turn into the reader's queue, under twice
    # max-queue in one turn, over it in a few (long lines make turns quick).
    server = start_server("--max-queue", "65536", "--rate-limit", "0")
    reader = Client(server.port, "reader")
    talkers = [Client(server.port, f"talker{i}") for i in range(10)]
    clients.extend([reader, *talkers])
    lines = 30  # 30 x 4 KB from each, one line a recv()
    bursts = [
        b"".join(f"{t} {i:04d} {'z' * 3900}\n".encode() for i in range(lines)) for t in range(10)
    ]
    for talker, burst in zip(talkers, bursts, strict=True):
        talker.send_raw(burst)
    for _ in range(10 * lines):
        reader.expect(r"^\S+: \d+ \d{4} z+$", timeout=10)
    assert not any("too slow" in line for line in server.lines), server.lines[-5:]


def test_telnet_ctrl_c_is_answered_so_telnet_shows_the_chat_again(server, clients):
    # After Ctrl-C, telnet sends IAC IP, IAC DO TIMING-MARK and discards everything
    # the server sends until an answer comes: without one its user sees no more chat.
    a = Client(server.port, "telnet user")
    b = Client(server.port, "b")
    clients.extend([a, b])

    def wait_for(data: bytes) -> None:
        deadline = time.monotonic() + 5
        while data not in a.raw and time.monotonic() < deadline:
            a._fill(0.1)
        assert data in a.raw, bytes(a.raw)

    a.send_raw(b"\xff\xf4\xff\xfd\x06")  # no line ending: telnet sends nothing more
    wait_for(b"\xff\xfc\x06")  # IAC WONT TIMING-MARK
    b.send_line("still here")
    wait_for(f"{b.name}: still here\n".encode())
    assert b"\xff" not in b.raw  # the answer went to the telnet user only
