"""picchat-client on a real terminal: a 40-column tmux pane.

The pane runs ``stty -g > before; picchat-client ...; stty -g > after``, so a
test can check that the client leaves the terminal as it found it. Every wait
polls the pane (capture-pane) until a deadline.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
import unicodedata
from pathlib import Path

import pytest

from .support import ROOT, Client, ServerProcess, TmuxPane, client_cmd, settled_client

WIDTH = 40
PROMPT = "You (alice): "


class TtyClient:
    """picchat-client --name alice in a tmux pane, and the files its shell writes."""

    def __init__(self, make_pane, tmp: Path, port: int, *args: str) -> None:
        self.tmp = tmp
        argv = shlex.join(client_cmd("--port", str(port), "--name", "alice", *args))
        d = shlex.quote(str(tmp))
        command = (
            f"cd {shlex.quote(str(ROOT))} && stty -g > {d}/before; {argv}; rc=$?; "
            f"stty -g > {d}/after; echo $rc > {d}/rc; sleep 60"
        )
        self.pane: TmuxPane = make_pane(command, width=WIDTH, height=15)
        self.wait_input("")

    def input_ok(self, rows: list[str], text: str) -> bool:
        """The input area, ``PROMPT + text`` wrapped at WIDTH, is the last thing on screen."""
        want = wrap(PROMPT + text)
        return rows[-len(want) :] == want

    def wait_input(self, text: str, timeout: float = 5.0) -> list[str]:
        return self.pane.wait_for(
            lambda rows: rows if self.input_ok(rows, text) else None,
            f"input line {PROMPT + text!r}",
            timeout,
        )

    def wait_message_above_input(self, message: str, text: str) -> list[str]:
        """``message`` on screen above an intact input area holding ``text``."""

        def check(rows: list[str]) -> list[str] | None:
            if not self.input_ok(rows, text):
                return None
            above = rows[: -len(wrap(PROMPT + text))]
            return rows if starts_rows(above, message) else None

        return self.pane.wait_for(check, f"{message!r} above the input line {text!r}")

    def exit_code(self) -> int:
        return int(self.pane.wait_for_file(self.tmp / "rc").strip())

    def terminal_restored(self) -> None:
        before = (self.tmp / "before").read_text()
        after = (self.tmp / "after").read_text()
        assert before == after, f"stty settings changed:\n{before}{after}"


def cells(text: str) -> int:
    return sum(
        2 if unicodedata.east_asian_width(c) in ("W", "F") else 0 if unicodedata.combining(c) else 1
        for c in text
    )


def wrap(text: str, width: int = WIDTH) -> list[str]:
    """``text`` as the terminal shows it on rows ``width`` cells wide
    (trailing blanks removed, as capture-pane gives them)."""
    rows, row, col = [], "", 0
    for ch in text:
        w = cells(ch)
        if col + w > width:
            rows.append(row)
            row, col = "", 0
        row += ch
        col += w
    rows.append(row)
    return [r.rstrip() for r in rows]


def starts_rows(rows: list[str], text: str) -> bool:
    """Some row starts ``text`` as printed from column 0 (wrapped at WIDTH)."""
    want = wrap(text)
    k = len(want)
    for i in range(len(rows) - k + 1):
        if rows[i : i + k - 1] == want[:-1] and rows[i + k - 1].startswith(want[-1]):
            return True
    return False


@pytest.fixture
def bob(server: ServerProcess, clients) -> Client:
    b = settled_client(server, server.port, "bob")
    clients.append(b)
    b.nick("bob")
    return b


@pytest.fixture
def alice(server: ServerProcess, tmux_pane, short_tmp: Path, bob: Client) -> TtyClient:
    mark = server.mark()
    c = TtyClient(tmux_pane, short_tmp, server.port)
    server.wait_for_log(r"\balice connected from", start=mark)
    c.pane.wait_for_row(r"^Connected to the server!$")
    return c


def test_half_typed_multibyte_line_survives_an_incoming_message(alice, bob):
    alice.pane.type("héllo 日本")
    alice.wait_input("héllo 日本")
    bob.send_line("hi alice")
    rows = alice.wait_message_above_input("bob: hi alice", "héllo 日本")
    assert sum("héllo" in row for row in rows) == 1, rows  # no stale copy of the input
    # The cursor is right after the text: 13 + 6 + 2 * 2 cells.
    alice.pane.wait_for(
        lambda rows: alice.pane.cursor() == (cells(PROMPT + "héllo 日本"), len(rows) - 1),
        "the cursor right after the half-typed text",
    )
    alice.pane.type(" ok")
    alice.pane.keys("Enter")
    bob.expect(r"^alice: héllo 日本 ok$")


def test_backspace_removes_a_whole_multibyte_character(alice, bob):
    alice.pane.type("aé日")
    alice.wait_input("aé日")
    alice.pane.keys("BSpace")
    alice.wait_input("aé")
    alice.pane.keys("BSpace")
    alice.wait_input("a")
    # A base letter with a combining accent goes as one character too.
    alice.pane.type("be\u0301")
    alice.pane.keys("BSpace")
    alice.pane.type("c")
    alice.wait_input("abc")
    alice.pane.keys("Enter")
    line = bob.expect(r"^alice: ").string
    assert line == "alice: abc", ascii(line)


@pytest.mark.parametrize("length", [97, 67], ids=["wraps-twice", "ends-at-margin"])
def test_a_line_wider_than_the_pane_wraps_and_is_sent_whole(alice, bob, length):
    text = " ".join(f"w{i:03d}" for i in range(20))[:length].rstrip()
    text = text + "x" * (length - len(text))
    assert len(PROMPT + text) in (110, 80)  # 80: ends exactly at the right margin
    alice.pane.type(text)
    rows = alice.wait_input(text)
    if len(PROMPT + text) == 80:
        # The cursor went to the start of the next row, not past the margin.
        assert alice.pane.cursor() == (0, len(rows))
    # A message arrives while the wrapped line is half typed: it goes above,
    # and the whole input area is redrawn below it, with nothing left over.
    bob.send_line("interrupting")
    rows = alice.wait_message_above_input("bob: interrupting", text)
    joined = alice.pane.screen(joined=True)
    assert sum(text[:20] in row for row in joined) == 1, rows
    alice.pane.keys("Enter")
    got = bob.expect(r"^alice: (.*)$").group(1)
    assert got == text
    # The sent line stays on screen, the new prompt right below it (no blank row).
    want = [*wrap(PROMPT + text), PROMPT.rstrip()]
    alice.pane.wait_for(lambda rows: rows[-len(want) :] == want, "the prompt below the sent line")


def test_ctrl_c_drops_the_line_then_quits_on_an_empty_line(alice, bob, server):
    alice.pane.type("drop me")
    alice.wait_input("drop me")
    alice.pane.keys("C-c")
    alice.pane.wait_for_row(r"^You \(alice\): drop me\^C$")
    alice.wait_input("")
    alice.pane.type("keep me")
    alice.pane.keys("Enter")
    bob.expect(r"^alice: keep me$")

    mark = server.mark()
    alice.pane.keys("C-c")
    assert alice.exit_code() == 0
    alice.terminal_restored()
    server.wait_for_log(r"\balice \(.*\) left: quit", start=mark)
    assert not any("drop me" in line for line in bob.history)


def test_ctrl_d_quits_on_an_empty_line_only(alice, bob, server):
    alice.pane.type("x")
    alice.pane.keys("C-d")
    alice.pane.type("y")  # still running, and Ctrl-D did not touch the line
    alice.wait_input("xy")
    alice.pane.keys("BSpace", "BSpace")
    alice.wait_input("")
    mark = server.mark()
    alice.pane.keys("C-d")
    assert alice.exit_code() == 0
    alice.terminal_restored()
    server.wait_for_log(r"\balice \(.*\) left: quit", start=mark)
    rows = alice.pane.screen()
    assert not re.search(r"Traceback|Error", "\n".join(rows)), rows


def test_reconnection_keeps_the_name_and_the_half_typed_line(
    server, bob, forwarder, tmux_pane, short_tmp
):
    link = forwarder(server.port)
    alice = TtyClient(tmux_pane, short_tmp, link.port, "--retry", "0.5")
    alice.pane.wait_for_row(r"^Connected to the server!$")
    alice.pane.type("first")
    alice.wait_input("first")

    mark = server.mark()
    link.cut()
    alice.wait_message_above_input("* Connection lost", "first")
    alice.pane.keys("Enter")  # typed while the link is down: it waits
    alice.wait_message_above_input("* (pending) first", "")
    alice.pane.type("second, half typed")
    link.restart()
    rows = alice.wait_message_above_input("* Reconnected to the server.", "second, half typed")
    server.wait_for_log(r"\balice resumed its session from", start=mark)
    assert rows[-1].startswith(PROMPT), rows  # still alice
    bob.expect(r"^alice: first$")
    alice.pane.keys("Enter")
    bob.expect(r"^alice: second, half typed$")
    assert bob.history.count("alice: first") == 1, bob.history


def client_pid(alice: TtyClient) -> int:
    """The client's pid: the pane shell's child running python."""
    pids = alice.pane.wait_for(lambda _: alice.pane.children(), "the client process")
    assert len(pids) == 1, pids
    return pids[0]


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"  # exited, not reaped yet


def test_sigterm_restores_the_terminal(alice, bob):
    alice.pane.type("half typed")
    alice.wait_input("half typed")
    os.kill(client_pid(alice), signal.SIGTERM)
    assert alice.exit_code() == 0
    alice.terminal_restored()


def test_client_exits_when_its_terminal_goes_away(alice, server):
    pid = client_pid(alice)
    mark = server.mark()
    alice.pane.tmux("kill-pane", "-t", alice.pane.name)
    deadline = time.monotonic() + 5
    while not gone(pid):
        assert time.monotonic() < deadline, f"the client {pid} still runs without a terminal"
        time.sleep(0.02)
    server.wait_for_log(r"\balice \(.*\) left", start=mark)
