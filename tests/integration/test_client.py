"""picchat-client as a real process (stdin a pipe), and what it does when the
link to the server breaks: resume, replay of what it missed, resending of what
it typed, gaps, names.

The link is cut with a ``Forwarder`` between the client and the server: the
test closes every socket of it (or only the client's side) and reopens it on
the same port. The client runs with ``--retry 0.5`` so that it comes back
quickly.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from .support import (
    DEFAULT_TIMEOUT,
    REPLAY_PREFIX,
    ROOT,
    Client,
    ClientProcess,
    ProcessPeer,
    StructuredClient,
    base_env,
    client_cmd,
    free_port,
    settled_client,
)

RETRY = "0.5"
ADDR = r"\(127\.0\.0\.1:\d+\)"


def chat(sender: str, text: str) -> str:
    """A regex for one chat line as the client prints it, live or replayed."""
    return rf"^{REPLAY_PREFIX}{re.escape(sender)}: {re.escape(text)}$"


def start_client(server, port: int, name: str = "alice") -> ClientProcess:
    """A picchat-client (pipe mode) on ``port``, connected and announced as a member."""
    mark = server.mark()
    c = ClientProcess(port, "--name", name, "--retry", RETRY, label=f"client {name}")
    c.expect(r"^Connected to the server!$")
    server.wait_for_log(rf"\b{name} connected from", start=mark)
    return c


def bob(server, clients) -> Client:
    b = settled_client(server, server.port, "bob")
    clients.append(b)
    b.nick("bob")
    return b


def wait_until(check, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.02)


# ---- plain chat between real programs --------------------------------------------


def test_client_and_nc_chat_both_ways(server, clients):
    if shutil.which("nc") is None:
        pytest.skip("nc is not installed (the CI installs it: .ci/run)")
    nc = ProcessPeer(["nc", "127.0.0.1", str(server.port)], "nc")
    clients.append(nc)
    nc_name = nc.expect(r"^\* Welcome to picchat! You are (\S+)\.").group(1)
    alice = start_client(server, server.port)
    clients.append(alice)

    alice.send_line("hello nc, héllo 日本")
    nc.expect(r"^alice: hello nc, héllo 日本$")
    nc.send_line("hello alice")
    alice.expect(chat(nc_name, "hello alice"))
    # Pipe mode prints bare lines: no prompt, no escape sequences, and
    # nothing of its own comes back to it.
    assert not any("\x1b" in line or line.startswith("You (") for line in alice.history)
    assert not any(line.startswith("alice: ") for line in alice.history)

    # At the end of its input, once everything is acknowledged, it leaves.
    assert alice.proc.stdin is not None
    alice.send_line("bye now")
    alice.proc.stdin.close()
    assert alice.wait_exit() == 0
    nc.expect(r"^alice: bye now$")
    server.wait_for_log(rf"alice {ADDR} left: quit")


# ---- the link is cut and comes back --------------------------------------------------


def test_messages_missed_during_a_cut_are_shown_once(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)
    b.send_line("before the cut")
    alice.expect(chat("bob", "before the cut"))

    mark = server.mark()
    link.cut()
    alice.expect(r"^\* Connection lost\b.*retrying every 0\.5 s$")
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    missed = [f"missed {i}" for i in range(1, 6)]
    for text in missed:
        b.send_line(text)
    server.wait_for_log(r"bob: missed 5$", start=mark)

    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$", timeout=5)
    for text in missed:
        m = alice.expect(chat("bob", text))
        # Replayed messages carry the time the server accepted them.
        assert re.match(r"^\[\d\d:\d\d\] bob: ", m.string), m.string
    # A live line after the replay: everything before it has arrived.
    b.send_line("live again")
    alice.expect(chat("bob", "live again"))
    for text in ["before the cut", *missed, "live again"]:
        assert alice.count(chat("bob", text)) == 1, f"{text!r} not shown exactly once"
    server.wait_for_log(r"alice resumed its session from", start=mark)


def test_lines_typed_during_a_cut_are_sent_once_after_reconnection(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    link.cut()
    alice.expect(r"^\* Connection lost\b")
    typed = [f"typed while cut {i}" for i in range(1, 4)]
    for text in typed:
        alice.send_line(text)
        alice.expect(rf"^\* \(pending\) {text}$")  # the user sees it is not sent yet

    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    alice.expect(r"^\* sending 3 pending message\(s\)$")
    for text in typed:
        b.expect(rf"^alice: {text}$")
    alice.send_line("after the cut")
    b.expect(r"^alice: after the cut$")
    for text in typed:
        assert b.history.count(f"alice: {text}") == 1, f"{text!r} not received exactly once"
        assert len(re.findall(rf"\balice: {text}$", server.log, re.M)) == 1, server.log


def test_a_message_whose_ack_was_lost_is_not_posted_twice(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    # The server gets the message and acknowledges it, but the ack never
    # reaches the client: it is held in the forwarder, and then the link goes.
    link.pause_down()
    mark = server.mark()
    alice.send_line("did you get this?")
    server.wait_for_log(r"alice: did you get this\?$", start=mark)
    b.expect(r"^alice: did you get this\?$")
    link.cut()
    alice.expect(r"^\* Connection lost\b")

    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    # The client does not know whether the message got through: it resends it
    # and the server, which has it already, only acknowledges it again.
    alice.expect(r"^\* sending 1 pending message\(s\)$")
    alice.send_line("and this one")
    b.expect(r"^alice: and this one$")
    assert b.history.count("alice: did you get this?") == 1, b.history
    assert len(re.findall(r"\balice: did you get this\?$", server.log, re.M)) == 1, server.log

    # Every message was acknowledged in the end: at the end of input it quits.
    assert alice.proc.stdin is not None
    alice.proc.stdin.close()
    assert alice.wait_exit() == 0


def test_server_drops_a_message_resent_under_the_same_session_and_id(server, clients):
    b = bob(server, clients)
    first = StructuredClient(server.port, name="alice")
    clients.append(first)
    token = first.welcome["session"]
    assert isinstance(token, str) and token
    first.send({"type": "msg", "id": "x1", "text": "once only"})
    seq = first.expect(type="ack", id="x1")["seq"]
    b.expect(r"^alice: once only$")

    mark = server.mark()
    first.close()
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    again = StructuredClient(
        server.port,
        name="alice",
        session=token,
        resume={"history_id": first.welcome["history_id"], "seq": 0},
    )
    clients.append(again)
    assert again.welcome["name"] == "alice"
    again.send({"type": "msg", "id": "x1", "text": "once only"})
    assert again.expect(type="ack", id="x1")["seq"] == seq  # the original ack, again
    again.send({"type": "msg", "id": "x2", "text": "something new"})
    assert again.expect(type="ack", id="x2")["seq"] == seq + 1
    b.expect(r"^alice: something new$")
    assert b.history.count("alice: once only") == 1, b.history
    # Its own message is not replayed to it either.
    assert not [f for f in again.frames if f.get("type") == "msg"], again.frames


# ---- the server restarts; the client is away longer than history --------------------------


def test_server_restart_is_reported_as_a_possible_gap(start_server, clients):
    first = start_server()  # its socket: private to this test
    port = first.port
    assert port is not None
    b = settled_client(first, port, "bob")
    clients.append(b)
    alice = start_client(first, port)
    clients.append(alice)
    b.send_line("before the restart")
    alice.expect(chat(b.name, "before the restart"))

    first.stop()
    alice.expect(r"^\* Connection lost\b")
    second = start_server(port=str(port))
    alice.expect(r"^\* Reconnected to the server\.$", timeout=5)
    gap = alice.expect(r"^\* .*\bgap\b")
    assert "restarted" in gap.string, gap.string

    # It keeps working with the new server, both ways.
    b2 = settled_client(second, port, "bob2")
    clients.append(b2)
    alice.send_line("still here")
    b2.expect(r"^alice: still here$")
    b2.send_line("welcome back")
    alice.expect(chat(b2.name, "welcome back"))
    assert alice.count(chat(b.name, "before the restart")) == 1


def test_client_away_longer_than_history_is_told_how_many_it_missed(
    start_server, forwarder, clients
):
    server = start_server("--history", "5")
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    mark = server.mark()
    link.cut()
    alice.expect(r"^\* Connection lost\b")
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    for i in range(1, 13):
        b.send_line(f"m{i}")
    server.wait_for_log(r"bob: m12$", start=mark)

    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    notice = alice.expect(r"^\* You missed (\d+) messages?\b")
    assert notice.group(1) == "7", notice.string
    for i in range(8, 13):
        alice.expect(chat("bob", f"m{i}"))
    b.send_line("live")
    alice.expect(chat("bob", "live"))
    for i in range(1, 13):
        expected = 1 if i >= 8 else 0
        assert alice.count(chat("bob", f"m{i}")) == expected, f"m{i}: {alice.history}"


# ---- names survive a drop -------------------------------------------------------------------


def test_name_survives_a_drop(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    mark = server.mark()
    link.cut()
    alice.expect(r"^\* Connection lost\b")
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    server.wait_for_log(r"\balice resumed its session from", start=mark)
    alice.send_line("still me")
    b.expect(r"^alice: still me$")
    b.send_line("/who")
    names = b.expect(r"^\* 2 here: (.*)$").group(1)
    assert sorted(names.split(", ")) == ["alice", "bob"], names


def presence_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if re.search(r" (joined|left)(;|$)", line)]


def sentinel_join(server, watcher: Client, clients) -> str:
    """A newcomer who speaks at once: when the watcher sees its join, every
    presence window before it has been announced."""
    dave = Client(server.port, "dave")
    clients.append(dave)
    dave.send_line("hi all")
    watcher.expect(rf"^{dave.name}: hi all$")
    watcher.expect(rf"^\* {dave.name} joined$")
    return dave.name or ""


def test_reconnect_before_the_server_noticed_replaces_the_old_connection(
    server, forwarder, clients
):
    carol = settled_client(server, server.port, "carol")
    clients.append(carol)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)
    carol.expect(r"^\* alice joined$")
    seen = len(carol.history)

    # The client's side of the link dies; the server's side stays open and
    # silent, as after a network drop the server has not noticed yet.
    mark = server.mark()
    link.drop_clients()
    alice.expect(r"^\* Connection lost\b")
    alice.expect(r"^\* Reconnected to the server\.$")
    server.wait_for_log(r"\balice resumed its session from", start=mark)
    # The server closed the old connection itself.
    wait_until(lambda: link.orphans_closed == 1, "the old connection closed by the server")
    assert link.accepted == 2

    alice.send_line("still alice")
    carol.expect(r"^alice: still alice$")
    dave = sentinel_join(server, carol, clients)
    assert presence_lines(carol.history[seen:]) == [f"* {dave} joined"], carol.history[seen:]
    assert not re.search(r"\balice .*\bleft\b", server.log[server.log.find("resumed") :])


def test_session_token_takes_over_a_connection_still_open(server, clients):
    carol = settled_client(server, server.port, "carol")
    clients.append(carol)
    old = StructuredClient(server.port, name="alice")
    clients.append(old)
    carol.expect(r"^\* alice joined$")
    seen = len(carol.history)

    new = StructuredClient(server.port, name="alice", session=old.welcome["session"])
    clients.append(new)
    assert new.welcome["name"] == "alice"
    assert new.welcome["session"] == old.welcome["session"]
    deadline = time.monotonic() + 5
    while old.read_frame(max(deadline - time.monotonic(), 0.0)) is not None:
        pass  # the old connection is closed by the server

    new.send({"type": "msg", "id": "1", "text": "from the new connection"})
    new.expect(type="ack", id="1")
    carol.expect(r"^alice: from the new connection$")
    dave = sentinel_join(server, carol, clients)
    assert presence_lines(carol.history[seen:]) == [f"* {dave} joined"], carol.history[seen:]
    carol.send_line("/who")
    names = carol.expect(r"^\* 3 here: (.*)$").group(1)
    assert sorted(names.split(", ")) == sorted(["alice", carol.name, dave]), names


def test_history_from_before_the_client_came_is_not_replayed_on_reconnection(
    server, forwarder, clients
):
    b = bob(server, clients)
    b.send_line("old news")
    server.wait_for_log(r"bob: old news$")
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    mark = server.mark()
    link.cut()
    alice.expect(r"^\* Connection lost\b")
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    b.send_line("while away")
    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    alice.expect(chat("bob", "while away"))
    b.send_line("live")
    alice.expect(chat("bob", "live"))
    # It was never shown "old news" when it came; a reconnection is no reason to.
    assert alice.count(chat("bob", "old news")) == 0, alice.history


def test_a_name_taken_while_away_is_reported(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    alice = start_client(server, link.port)
    clients.append(alice)

    mark = server.mark()
    link.cut()
    alice.expect(r"^\* Connection lost\b")
    server.wait_for_log(rf"alice {ADDR} left", start=mark)
    b.nick("alice")
    link.restart()
    alice.expect(r"^\* Reconnected to the server\.$")
    alice.expect(r"^! the name alice is taken\b")
    alice.send_line("who am I now?")
    name = b.expect(r"^(\S+): who am I now\?$").group(1)
    assert re.fullmatch(r"guest\d+", name), name


def test_a_message_longer_than_the_server_takes_is_refused_not_stuck(server, clients):
    # {"type":"msg","id":"1","text":"..."} is 33 bytes around the text; the
    # server takes lines of at most 4096 bytes (max_line, in its welcome).
    b = bob(server, clients)
    alice = start_client(server, server.port)
    clients.append(alice)
    fits, too_long = "y" * (4096 - 33), "z" * (4096 - 33 + 1)
    alice.send_line(fits)
    b.expect(rf"^alice: {fits}$")
    alice.send_line(too_long)
    alice.expect(r"^! not sent: the message is too long \(4097 bytes encoded; .* 4096\)$")
    alice.send_line("short")
    b.expect(r"^alice: short$")
    # Nothing waits for an ack that cannot come: at the end of input it quits.
    assert alice.proc.stdin is not None
    alice.proc.stdin.close()
    assert alice.wait_exit() == 0
    assert not any(line.startswith("alice: z") for line in b.history)


def test_piped_lines_beyond_max_pending_wait_in_the_pipe_and_all_arrive(server, forwarder, clients):
    b = bob(server, clients)
    link = forwarder(server.port)
    mark = server.mark()
    alice = ClientProcess(link.port, "--name", "alice", "--retry", RETRY, "--max-pending", "2")
    clients.append(alice)
    alice.expect(r"^Connected to the server!$")
    server.wait_for_log(r"\balice connected from", start=mark)

    link.cut()
    alice.expect(r"^\* Connection lost\b")
    for text in ("one", "two", "three"):
        alice.send_line(text)
    alice.expect(r"^\* \(pending\) one$")
    alice.expect(r"^\* \(pending\) two$")
    # The third is not read while two wait for their ack: it waits in the pipe,
    # neither refused nor dropped (a script's lines all arrive, in order).
    time.sleep(0.3)
    assert alice.count(r"three") == 0, alice.history
    # Input ends while the link is down: the client waits to deliver what it holds.
    assert alice.proc.stdin is not None
    alice.proc.stdin.close()
    link.restart()
    for text in ("one", "two", "three"):
        b.expect(rf"^alice: {text}$")
    assert alice.wait_exit() == 0
    assert [line for line in b.history if line.startswith("alice: ")] == [
        "alice: one",
        "alice: two",
        "alice: three",
    ]


def run_client(port: int, stdin, *args: str) -> subprocess.CompletedProcess[str]:
    """picchat-client with ``stdin`` (a file, /dev/null, or bytes through a pipe), to its end."""
    piped = isinstance(stdin, bytes)
    return subprocess.run(
        client_cmd("--port", str(port), "--retry", RETRY, *args),
        stdin=None if piped else stdin,
        input=stdin.decode() if piped else None,
        capture_output=True,
        text=True,
        timeout=DEFAULT_TIMEOUT,
        env=base_env(),
        cwd=ROOT,
    )


def test_a_file_on_stdin_is_sent_whole_beyond_max_pending(server, clients, tmp_path):
    b = bob(server, clients)
    lines = [f"line {i}" for i in range(1, 301)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    with open(path, "rb") as f:  # a regular file: epoll cannot watch it
        done = run_client(server.port, f, "--name", "filer", "--max-pending", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "not sent" not in done.stdout, done.stdout
    for text in lines:
        b.expect(rf"^filer: {text}$")


def test_dev_null_on_stdin_ends_with_nothing_to_send(server):
    with open(os.devnull, "rb") as f:  # a character device epoll cannot watch (cron, systemd)
        done = run_client(server.port, f, "--name", "nobody")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_piped_commands_wait_for_the_server(server, clients):
    b = bob(server, clients)
    done = run_client(server.port, b"first\n/who\n/nick piped\nlast", "--name", "piper")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not connected" not in done.stdout, done.stdout
    assert re.search(r"^\* \d+ here: .*\bpiper\b", done.stdout, re.M), done.stdout
    b.expect(r"^piper: first$")
    b.expect(r"^piped: last$")  # the /nick before it took effect


def test_blank_piped_lines_take_no_room_among_max_pending(server, clients):
    b = bob(server, clients)
    done = run_client(
        server.port, b"\n" * 150 + b"\n\nhello\n", "--name", "blanks", "--max-pending", "1"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    b.expect(r"^blanks: hello$")


def test_empty_input_ends_at_once_even_without_a_server():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    done = run_client(port, b"", "--name", "nobody")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < DEFAULT_TIMEOUT


def test_piped_lines_read_before_the_server_is_up_wait_for_it(short_tmp, start_server):
    port = free_port()
    proc = subprocess.Popen(
        client_cmd("--port", str(port), "--retry", RETRY, "--name", "early"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=base_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"/nick early2\nheld line\nlast without a line ending")
        proc.stdin.close()
        time.sleep(0.5)  # the client has read it all, and retries
        server = start_server(port=str(port))
        watcher = settled_client(server, server.port, "watcher")
        watcher.expect(r"^early2: held line$", timeout=DEFAULT_TIMEOUT + 2)
        watcher.expect(r"^early2: last without a line ending$")
        watcher.close()
        assert proc.wait(DEFAULT_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
