"""A serial line as a participant, through the real server process.

Ptys stand in for the hardware: ``pty.openpty()`` when the test itself plays
the far end (it holds the master), or a ``socat`` pair when the line must be
unplugged and plugged in again or a real terminal program (picocom) sits on
the other end. What the far end receives is fed to a small terminal model
(``support.Screen``), so the tests check what a person would see.
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from picchat.endpoints.serial import console_conflict
from picchat.exits import EX_CONFIG, EX_UNAVAILABLE

from .support import (
    Client,
    ProcessPeer,
    SerialEnd,
    ServerProcess,
    SocatPair,
    base_env,
    settled_client,
)

pytest.importorskip("serial", reason="the serial bridge needs pyserial (pip install pyserial)")

BANNER = "* picchat: you are {name}. Type /help for commands."


def prompt(name: str) -> str:
    return f"You ({name}): "


def force_if_needed(device: str | Path) -> list[str]:
    """--serial-force only where this machine's kernel console or a getty would
    make the server refuse the device (never the case for a pty on an ordinary
    machine, so the check itself runs in these tests)."""
    return ["--serial-force"] if console_conflict(str(device)) is not None else []


@pytest.fixture
def pty_line() -> Iterator[Callable[..., tuple[SerialEnd, str]]]:
    """Factory: a pty pair; the server gets the slave's path, the test keeps
    the master as the far end of the line. Closed at teardown."""
    made: list[tuple[SerialEnd, int]] = []

    def make(width: int = 80) -> tuple[SerialEnd, str]:
        master, slave = pty.openpty()
        tty.setraw(slave)  # raw before the server opens it: nothing echoes meanwhile
        path = os.ttyname(slave)
        end = SerialEnd(master, f"pty {path}", width, slave=slave)
        made.append((end, slave))
        return end, path

    yield make
    for end, slave in made:
        end.close()
        os.close(slave)


@pytest.fixture
def socat_pair(short_tmp: Path) -> Iterator[Callable[[str], SocatPair]]:
    """Factory: a socat pty pair with links ``<tmp>/<tag>dev`` (for the server)
    and ``<tmp>/<tag>term``; every socat started is stopped (by pid) at teardown."""
    if shutil.which("socat") is None:
        pytest.skip("socat is not installed (apt install socat)")
    made: list[SocatPair] = []

    def make(tag: str = "", start: bool = True) -> SocatPair:
        pair = SocatPair(short_tmp / f"{tag}dev", short_tmp / f"{tag}term", start=False)
        made.append(pair)
        if start:
            pair.start()
        return pair

    yield make
    for pair in made:
        pair.stop()


@pytest.fixture
def ends() -> Iterator[list[SerialEnd]]:
    """SerialEnds the test opened on socat links; closed at teardown."""
    made: list[SerialEnd] = []
    yield made
    for end in made:
        end.close()


def start_serial_server(
    start_server, spec: str, *extra: str, sock: str | Path | None = "default"
) -> ServerProcess:
    device = spec.split(",")[0]
    return start_server(
        "--console", "off", "--serial", spec, *force_if_needed(device), *extra, sock=sock
    )


def wait_open(server: ServerProcess, device: str | Path, start: int = 0) -> str:
    return server.wait_for_log(rf"Serial line {re.escape(str(device))} open at", start=start)


def welcomed(end: SerialEnd, name: str) -> list[str]:
    """The banner is on screen and the prompt on the last row (the line's own
    join may have been announced in between)."""
    banner, last = BANNER.format(name=name), prompt(name).rstrip()
    return end.wait_screen(
        lambda rows: rows if banner in rows and rows[-1] == last else None,
        f"the banner and prompt for {name}",
    )


def bottom(end: SerialEnd, *rows: str) -> list[str]:
    """The screen ends with ``rows`` (the prompt row without its trailing blank)."""
    return end.wait_bottom(*(row.rstrip() for row in rows))


@pytest.fixture
def tty1(start_server, pty_line, clients) -> tuple[ServerProcess, SerialEnd, Client]:
    """A server with a person at a terminal on a pty line named tty1, and bob
    on TCP; bob's join has been shown on the line."""
    end, path = pty_line()
    server = start_serial_server(start_server, f"{path},name=tty1")
    wait_open(server, path)
    welcomed(end, "tty1")
    bob = Client(server.port, "bob")
    clients.append(bob)
    bob.nick("bob")
    # Its join (as bob, or as a guest and then the new name) has reached the line.
    end.wait_screen(
        lambda rows: (
            len(rows) >= 2
            and rows[-1] == prompt("tty1").rstrip()
            and re.fullmatch(r"\* (.*\bbob joined|guest\d+ is now known as bob)", rows[-2])
        ),
        "bob's arrival on the line",
    )
    return server, end, bob


# ---- terminal mode ------------------------------------------------------------------


def test_keystrokes_one_byte_at_a_time_reach_chat_and_are_echoed(tty1):
    server, end, bob = tty1
    mark = end.mark()
    end.type(b"hello\r")
    bob.expect(r"^tty1: hello$")
    # The echo: each key as typed, then CRLF and a fresh prompt; nothing else.
    assert bytes(end.raw[mark:]) == b"hello\r\n" + prompt("tty1").encode()
    bottom(end, "You (tty1): hello", prompt("tty1"))
    server.wait_for_log(r"INFO tty1: hello$")


def test_utf8_typed_byte_by_byte_and_backspace_takes_a_whole_character(tty1):
    _, end, bob = tty1
    end.type("café".encode())  # é arrives as two reads of one byte
    bottom(end, "You (tty1): café")
    end.type(b"\x7f")
    bottom(end, "You (tty1): caf")
    end.type("e ☕\r".encode())
    bob.expect(r"^tty1: cafe ☕$")


def test_incoming_message_has_crlf_and_redraws_the_prompt_and_half_typed_line(tty1):
    _, end, bob = tty1
    end.type(b"half")
    bottom(end, "You (tty1): half")
    mark = end.mark()
    bob.send_line("hi from bob")
    end.wait_raw(rb"bob: hi from bob\r\nYou \(tty1\): half", start=mark)
    # On screen the message is above an intact input line, the cursor after it.
    rows = bottom(end, "bob: hi from bob", "You (tty1): half")
    assert "You (tty1): half" not in rows[:-1]  # the old input line was erased
    assert end.screen.x == len("You (tty1): half")
    end.type(b" done\r")
    bob.expect(r"^tty1: half done$")
    # Two messages at once, a long one wrapping: both above, the input intact.
    end.type(b"more")
    long = "x" * 100
    bob.send_line("first")
    bob.send_line(long)
    bottom(end, "bob: first", f"bob: {long}"[:80], f"bob: {long}"[80:], "You (tty1): more")


def test_backspace_and_ctrl_u_edit_the_line(tty1):
    _, end, bob = tty1
    end.type(b"helo")
    end.type(b"\x7f")
    bottom(end, "You (tty1): hel")
    end.type(b"lo there")
    bottom(end, "You (tty1): hello there")
    end.type(b"\r")
    bob.expect(r"^tty1: hello there$")
    end.type(b"garbage")
    end.type(b"\x15")  # Ctrl-U: the whole line goes
    bottom(end, prompt("tty1"))
    end.type(b"clean\r")
    bob.expect(r"^tty1: clean$")
    assert not any("garbage" in line or "helo" in line for line in bob.history), bob.history
    # Backspace on an empty line does nothing (and sends nothing).
    end.write(b"\x7f\x7f")
    end.type(b"ok\r")
    bob.expect(r"^tty1: ok$")


def test_nick_and_who_from_the_serial_line(tty1):
    _, end, bob = tty1
    end.type(b"/who\r")
    end.wait_screen(
        lambda rows: any(re.fullmatch(r"\* 2 here: (tty1, bob|bob, tty1)", r) for r in rows),
        "the /who answer",
    )
    end.type(b"/nick ser\r")
    bob.expect(r"^\* tty1 is now known as ser$")
    # The prompt says the new name.
    bottom(end, "* tty1 is now known as ser", prompt("ser"))
    end.type(b"after\r")
    bob.expect(r"^ser: after$")
    # A taken name is refused on the line, the prompt unchanged.
    end.type(b"/nick bob\r")
    end.wait_screen(
        lambda rows: any("bob is taken" in r for r in rows[-3:]), "the refusal of /nick bob"
    )
    bottom(end, prompt("ser"))
    # Not a command: a line starting with // is a message.
    end.type(b"//etc\r")
    bob.expect(r"^ser: /etc$")


def test_quit_does_not_cut_off_the_serial_line(tty1):
    # A serial line cannot hang up and reconnect: /quit must not leave it
    # connected but out of the room, its input ignored.
    server, end, bob = tty1
    end.type(b"/quit\r")
    end.wait_screen(
        lambda rows: any("serial line stays connected" in r for r in rows), "the /quit answer"
    )
    end.type(b"still here\r")
    bob.expect(r"^tty1: still here$")
    bob.send_line("and back")
    bottom(end, "bob: and back", prompt("tty1"))
    assert "left: quit" not in server.log
    # Ctrl-D on an empty line: the same.
    mark = end.mark()
    end.write(b"\x04")
    end.wait_raw(rb"serial line stays connected", start=mark)


# ---- the console/getty check, in the real process ----------------------------------


def test_a_getty_on_the_device_is_refused_unless_forced(start_server, pty_line, short_tmp):
    end, path = pty_line()
    tty_name = os.path.basename(os.path.realpath(path))  # "3" for /dev/pts/3
    # A stand-in for agetty on this tty: its command line is what the check reads.
    getty = subprocess.Popen(
        ["/sbin/agetty", "30", tty_name], executable=shutil.which("sleep") or "/bin/sleep"
    )
    try:
        deadline = time.monotonic() + 5
        while "getty" not in (console_conflict(path) or ""):
            assert time.monotonic() < deadline, "the fake getty never showed up in /proc"
            time.sleep(0.01)
        refused = start_server("--console", "off", "--serial", f"{path},name=tty1", wait=False)
        assert refused.wait_exit(10) == EX_CONFIG, refused.log
        assert f"refusing serial device {path}: a login prompt (getty, pid {getty.pid})" in (
            refused.log
        ), refused.log
        assert "raspi-config" in refused.log and "--serial-force" in refused.log
        # Forced, it opens the line.
        forced = start_server(
            "--console",
            "off",
            "--serial",
            f"{path},name=tty1",
            "--serial-force",
            sock=short_tmp / "s2.sock",
        )
        wait_open(forced, path)
        welcomed(end, "tty1")
    finally:
        getty.kill()
        getty.wait()


# ---- the device goes away and comes back ------------------------------------------


def test_device_unplugged_and_plugged_in_again(start_server, socat_pair, ends, clients):
    pair = socat_pair("a")
    server = start_serial_server(start_server, f"{pair.dev},name=tty1", "--serial-retry", "0.3")
    wait_open(server, pair.dev)
    term = SerialEnd.open(pair.term, "term")
    ends.append(term)
    bottom(term, prompt("tty1"))
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    term.type(b"one\r")
    bob.expect(r"^tty1: one$")

    mark = server.mark()
    pair.stop()  # unplugged
    server.wait_for_log(r"WARNING Serial device .* went away .*every 0\.3 s", start=mark)
    bob.expect(r"^\* tty1 left$")
    # TCP goes on: a newcomer chats with bob.
    carol = Client(server.port, "carol")
    clients.append(carol)
    bob.send_line("still up")
    carol.expect(rf"^{bob.name}: still up$")
    assert server.proc.poll() is None

    mark = server.mark()
    pair.start()  # plugged in again: a new pty behind the same link
    server.wait_for_log(r"INFO Serial device .* is back", start=mark)
    wait_open(server, pair.dev, start=mark)
    bob.expect(r"^\* tty1 joined$")
    term2 = SerialEnd.open(pair.term, "term again")
    ends.append(term2)
    welcomed(term2, "tty1")
    term2.type(b"two\r")
    bob.expect(r"^tty1: two$")
    carol.expect(r"^tty1: two$")
    bob.send_line("welcome back")
    bottom(term2, f"{bob.name}: welcome back", prompt("tty1"))


def test_device_missing_at_start_is_opened_when_it_appears(start_server, socat_pair, ends, clients):
    pair = socat_pair("b", start=False)
    server = start_serial_server(start_server, f"{pair.dev},name=late", "--serial-retry", "0.3")
    server.wait_for_log(
        rf"WARNING Cannot open serial device {re.escape(str(pair.dev))} \(.*No such file.*\); "
        r"trying again every 0\.3 s, everything else keeps running"
    )
    bob = Client(server.port, "bob")  # the server serves meanwhile
    clients.append(bob)
    mark = server.mark()
    pair.start()
    wait_open(server, pair.dev, start=mark)
    term = SerialEnd.open(pair.term, "term")
    ends.append(term)
    welcomed(term, "late")
    term.type(b"made it\r")
    bob.expect(r"^late: made it$")
    # The warning was said once, not at every attempt.
    assert server.log.count("Cannot open serial device") == 1, server.log


# ---- lines mode: a microcontroller ------------------------------------------------------

MCU = r"""
import os, select, sys, termios, time, tty

path, count = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
tty.setraw(fd, termios.TCSANOW)
attrs = termios.tcgetattr(fd)
attrs[4] = attrs[5] = termios.B9600
termios.tcsetattr(fd, termios.TCSANOW, attrs)
os.write(fd, b"/nick evil\r\n")  # what it prints is never a command
print("READY", flush=True)
buf = b""
sent = 0
next_at = time.monotonic()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    now = time.monotonic()
    if sent < count and now >= next_at:
        os.write(fd, b"temp=21.5\r\n")
        sent += 1
        next_at += 0.1
        if sent == count:
            print("SENT", sent, flush=True)
    wait = max(0.0, next_at - now) if sent < count else 0.5
    if not select.select([fd], [], [], wait)[0]:
        continue
    data = os.read(fd, 4096)
    if not data:
        break
    buf += data
    while b"\n" in buf:
        line, _, buf = buf.partition(b"\n")
        print("RX", repr(line + b"\n"), flush=True)
        text = line.rstrip(b"\r")
        if b"cmd" in text:
            os.write(fd, b"ack " + text.partition(b": ")[2] + b"\r\n")
"""


def test_lines_mode_microcontroller(start_server, socat_pair, clients, short_tmp):
    pair = socat_pair("m")
    server = start_serial_server(start_server, f"{pair.dev},baud=9600,mode=lines,name=arduino")
    server.wait_for_log(r"open at 9600 baud \(lines mode\) as arduino")
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    script = short_tmp / "mcu.py"
    script.write_text(MCU)
    mcu = ProcessPeer([sys.executable, str(script), str(pair.term), "30"], "mcu")
    clients.append(mcu)
    mcu.expect(r"^READY$")

    bob.expect(r"^arduino: /nick evil$")  # a message, not a command
    for _ in range(3):
        bob.expect(r"^arduino: temp=21\.5$")
    # Presence while it listens: carol comes and goes (bob sees both lines).
    carol = settled_client(server, server.port, "carol")
    bob.expect(rf"^\* {carol.name} joined$")
    carol.send_line("/who")
    carol.close()
    bob.expect(rf"^\* {carol.name} left$")

    bob.send_line("cmd blink")
    bob.expect(r"^arduino: ack cmd blink$")
    bob.send_line("done")
    mcu.expect(rf"^RX b'{bob.name}: done\\r\\n'$")
    mcu.expect(r"^SENT 30$", timeout=10)
    bob.send_line("cmd final")  # its answer comes after every reading
    bob.expect(r"^arduino: ack cmd final$")
    bob.send_line("end")
    mcu.expect(rf"^RX b'{bob.name}: end\\r\\n'$")

    got = [line[3:] for line in mcu.history if line.startswith("RX ")]
    assert got.count(f"b'{bob.name}: cmd blink\\r\\n'") == 1, got
    assert got == [
        f"b'{bob.name}: cmd blink\\r\\n'",
        f"b'{bob.name}: done\\r\\n'",
        f"b'{bob.name}: cmd final\\r\\n'",
        f"b'{bob.name}: end\\r\\n'",
    ], got  # its own lines never come back; no presence, notices or prompts
    readings = [line for line in bob.history if line == "arduino: temp=21.5"]
    assert len(readings) == 30, bob.history
    assert "arduino is now known as" not in server.log


@pytest.mark.parametrize("mode", ["lines", "terminal"])
def test_a_chat_line_reaches_the_serial_line_as_one_line(start_server, pty_line, clients, mode):
    # U+2028/U+2029 are text, not line ends: a message holding one must not
    # turn into two lines, the second one without its sender's name.
    end, path = pty_line()
    server = start_serial_server(start_server, f"{path},mode={mode},name=dev")
    wait_open(server, path)
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    bob.send_line("x\u2028admin: reboot\u2029y")
    bob.send_line("end")
    end.wait_raw(rf"{bob.name}: end\r\n".encode())
    if mode == "lines":
        assert bytes(end.raw) == (
            f"{bob.name}: x\u2028admin: reboot\u2029y\r\n{bob.name}: end\r\n".encode()
        )
    else:
        rows = end.screen.lines()
        assert rows[-3:-1] == [f"{bob.name}: xadmin: reboot" + "y", f"{bob.name}: end"], rows
        assert not any(row.startswith("admin") for row in rows), rows


# ---- a real terminal program ------------------------------------------------------------


def test_picocom_in_a_real_terminal(start_server, socat_pair, tmux_pane, clients):
    if shutil.which("picocom") is None:
        pytest.skip("picocom is not installed (apt install picocom)")
    pair = socat_pair("p")
    pane = tmux_pane(f"picocom -b 115200 {pair.term}", width=80, height=20)
    pane.wait_for_row(r"Terminal ready")
    server = start_serial_server(start_server, f"{pair.dev},name=pi")
    wait_open(server, pair.dev)

    def last_rows(*want: str):
        want_rows = list(want)
        return pane.wait_for(
            lambda rows: rows if rows[-len(want_rows) :] == want_rows else None,
            f"last rows {want_rows!r}",
        )

    pane.wait_for(
        lambda rows: BANNER.format(name="pi") in rows and rows[-1] == "You (pi):",
        "the banner and the prompt",
    )
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    pane.wait_for(
        lambda rows: (
            len(rows) >= 2
            and re.fullmatch(rf"\* (.*, )?{bob.name} joined", rows[-2])
            and rows[-1] == "You (pi):"
        ),
        f"{bob.name}'s join above the prompt",
    )

    pane.type("halx")
    pane.keys("BSpace")
    last_rows("You (pi): hal")  # the echo, and backspace
    assert pane.cursor()[0] == len("You (pi): hal")
    bob.send_line("incoming message")
    last_rows(f"{bob.name}: incoming message", "You (pi): hal")
    assert pane.cursor()[0] == len("You (pi): hal")
    pane.type("f done")
    pane.keys("Enter")
    bob.expect(r"^pi: half done$")
    last_rows("You (pi): half done", "You (pi):")


# ---- without pyserial ---------------------------------------------------------------------

NO_PYSERIAL = (
    "import sys; sys.modules['serial'] = None; "
    "from picchat.cli import server_main; raise SystemExit(server_main())"
)


def test_without_pyserial_the_server_says_what_to_install(short_tmp):
    sock = short_tmp / "s.sock"
    args = [sys.executable, "-c", NO_PYSERIAL, "--port", "0", "--socket", str(sock)]
    args += ["--console", "off"]
    server = ServerProcess([*args, "--serial", "/dev/null"], base_env(), sock)
    try:
        rc = server.wait_exit(10)
    finally:
        server.stop()
    lines = [line for line in server.lines if line.strip()]
    assert rc == EX_UNAVAILABLE, server.log
    assert len(lines) == 1, server.log
    assert "pyserial" in lines[0] and "picchat[serial]" in lines[0], lines[0]
    assert "python3-serial" in lines[0], lines[0]
    assert "Traceback" not in server.log
    assert not sock.exists()  # nothing left behind

    # The same without --serial: pyserial is not needed.
    server = ServerProcess(args, base_env(), sock)
    try:
        server.wait_ready()
        c = Client(server.port, "c")
        c.close()
    finally:
        assert server.stop() == 0, server.log


# ---- a slow line -----------------------------------------------------------------------------


def pty_capacity() -> int:
    """Bytes a pty holds for a reader that does not read (the kernel's buffer)."""
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)
        os.set_blocking(slave, False)
        total = 0
        while True:
            try:
                total += os.write(slave, b"x" * 512)
            except BlockingIOError:
                return total
    finally:
        os.close(slave)
        os.close(master)


def test_a_serial_line_that_does_not_read_loses_old_lines_not_the_chat(
    start_server, pty_line, clients
):
    end, path = pty_line()
    server = start_serial_server(start_server, f"{path},name=slow", "--serial-queue", "2048")
    wait_open(server, path)
    sender = settled_client(server, server.port, "sender")
    receiver = settled_client(server, server.port, "receiver")
    clients += [sender, receiver]
    # Far more than the pty, the bridge and the 2048-byte queue can hold.
    count = 500
    pad = max(100, 3 * (pty_capacity() + 8192) // count)
    assert pad < 3000
    lines = [f"line {i:03d} {'x' * pad}" for i in range(count)]
    sender.send_raw("".join(line + "\n" for line in lines).encode())
    for line in lines:  # the other TCP client gets every one, in order, at once
        receiver.expect(rf"^{sender.name}: {line}$", timeout=10)
    assert server.proc.poll() is None
    late = Client(server.port, "late")  # and the server still takes newcomers
    clients.append(late)

    # Now the line is read at last: old lines, a notice, the newest lines.
    end.wait_raw(rb"line 499 x+\r\nYou \(slow\): ", timeout=10)
    rows = end.screen.lines()
    assert rows[-1] == prompt("slow").rstrip()
    numbers: list[int] = []
    notices: list[tuple[int, int]] = []  # (position in numbers, dropped)
    for row in rows:
        m = re.fullmatch(rf"{sender.name}: line (\d{{3}}) x+", row)
        n = re.fullmatch(r"\* \((\d+) messages? dropped: this serial line is slower .*\)", row)
        if m:
            numbers.append(int(m.group(1)))
        elif n:
            notices.append((len(numbers), int(n.group(1))))
    assert notices, rows[-40:]
    assert numbers[-1] == count - 1 and len(numbers) < count
    assert numbers == sorted(set(numbers))  # in order, none twice
    # Every gap is exactly what a notice at that place said was dropped.
    dropped_total = 0
    for pos, dropped in notices:
        before = numbers[pos - 1] if pos else -1
        assert numbers[pos] - before - 1 == dropped, (pos, dropped, numbers)
        dropped_total += dropped
    assert dropped_total + len(numbers) == count
    assert server.proc.poll() is None


# ---- two servers, one device ---------------------------------------------------------------


def test_a_second_server_on_the_same_device_is_locked_out(
    start_server, pty_line, clients, short_tmp
):
    end, path = pty_line()
    first = start_serial_server(start_server, f"{path},name=tty1")
    wait_open(first, path)
    welcomed(end, "tty1")
    second = start_serial_server(
        start_server, f"{path},name=tty1", "--serial-retry", "0.3", sock=short_tmp / "s2.sock"
    )
    second.wait_for_log(
        rf"WARNING Cannot open serial device {re.escape(path)} \(another program, perhaps "
        r"another picchat, holds its lock"
    )
    other = Client(second.port, "other")  # the second server serves TCP regardless
    clients.append(other)
    other.send_line("/who")
    other.expect(rf"^\* 1 here: {other.name}$")

    # The first keeps the line, through several of the second's attempts.
    bob = Client(first.port, "bob")
    clients.append(bob)
    deadline = time.monotonic() + 1.0
    i = 0
    while time.monotonic() < deadline:
        end.type(f"mine {i}\r".encode())
        bob.expect(rf"^tty1: mine {i}$")
        i += 1
    bob.send_line("to the line")
    bottom(end, f"{bob.name}: to the line", prompt("tty1"))
    assert "tty1" not in "\n".join(other.history[1:])
    assert "Serial line" not in second.log

    # When the first lets go, the second takes the line.
    mark = second.mark()
    assert first.stop() == 0
    wait_open(second, path, start=mark)
    end.type(b"now second\r")
    other.expect(r"^tty1: now second$")


def test_the_log_names_every_serial_line_at_start(start_server, pty_line):
    end, path = pty_line()
    end2, path2 = pty_line()
    server = start_serial_server(
        start_server, f"{path},name=one", "--serial", f"{path2},mode=lines,name=two"
    )
    line = server.wait_for_log(r"Server is running")
    assert f"serial {path}" in line and f"serial {path2}" in line
    wait_open(server, path)
    wait_open(server, path2)
    welcomed(end, "one")
    end2.write(b"hello from two\n")
    bottom(end, "two: hello from two", prompt("one"))
