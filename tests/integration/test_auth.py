"""Tokens for clients on other machines, against the real server in a network
namespace of the test's own (the ``netns`` fixture).

In there, 10.99.0.1 to 10.99.0.4 are addresses of the machine but not loopback
addresses: to a server inside, a connection from 10.99.0.2 is one from another
machine, and so needs a token, while 127.0.0.1 and the Unix socket never do.
The test's socket clients are made inside it (``netns.client``) and then
read and written by the test like any other; picchat-send and picchat-client
run inside it under nsenter. A program inside that connects to one of these
addresses comes *from* that address, so each address is one "machine".
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

from .support import (
    DEFAULT_TIMEOUT,
    Client,
    ProcessPeer,
    base_env,
    client_cmd,
    listen_port,
    send_cmd,
    settled_client,
    write_secret,
)

EX_USAGE = 64
EX_NOPERM = 77
EX_CONFIG = 78

TOKEN = "token-" + "a1" * 12  # at least 16 printable characters
OTHER = "token-" + "b2" * 12
AUTH_FIRST = "this server needs a token first: send /auth TOKEN"
WELCOME = r"^\* Welcome to picchat! You are (\S+)\."
FAILED = "! authentication failed"
LATENCY = 0.1  # seconds: what a message between two others may take at most


def ns_server(start_server, netns, tmp, *extra, host="0.0.0.0", token=TOKEN, wait=True):
    """A server inside the namespace listening on ``host`` with a token file
    (``token=None``: none); returns (server, port)."""
    args = ["--host", host, *extra]
    if token is not None:
        args += ["--token-file", str(write_secret(tmp / "server-token", token + "\n"))]
    server = start_server(*args, prefix=netns.prefix, wait=wait)
    if not wait:
        return server, None
    return server, listen_port(server, host)


def member(netns, port, source, label, token=TOKEN):
    """An authenticated client from ``source`` (an address of the namespace)."""
    c = netns.client(source, port, source, label)
    assert c.read_line() == "* " + AUTH_FIRST, c.history
    c.auth(token)
    return c


def readable(c) -> bool:
    """Whether anything (or EOF) waits to be read on ``c``, without reading it."""
    return bool(c._pending) or bool(select.select([c.sock], [], [], 0)[0])


def delivery(a, b, text: str, timeout: float = 2.0) -> float:
    """Seconds from ``a`` sending ``text`` to ``b`` receiving it."""
    started = time.monotonic()
    a.send_line(text)
    b.expect(rf"^{re.escape(a.name)}: {re.escape(text)}$", timeout)
    return time.monotonic() - started


def run_in(netns, args, env=None, timeout=15):
    """Run a program inside the namespace; its output as text."""
    return netns.run(args, env=env or base_env(), capture_output=True, text=True, timeout=timeout)


# ---- start-up -----------------------------------------------------------------------


def test_listening_beyond_loopback_without_a_token_is_refused(netns, start_server, short_tmp, cert):
    crt, key = cert()
    tls = ["--tls-port", "12345", "--tls-cert", str(crt), "--tls-key", str(key)]
    # (host, extra settings, the address the refusal names): the namespace is
    # new, so port 12345 is free in it.
    for host, extra, where in (
        ("0.0.0.0", [], "0.0.0.0:"),
        ("10.99.0.1", [], "10.99.0.1:"),
        ("127.0.0.1", [*tls, "--tls-host", "0.0.0.0"], "0.0.0.0:12345"),
    ):
        server, _ = ns_server(
            start_server, netns, short_tmp, *extra, host=host, token=None, wait=False
        )
        assert server.wait_exit() == EX_CONFIG, server.log
        line = server.wait_for_log(r"refusing to listen", 0)
        assert where in line, line
        for setting in ("token-file", "PICCHAT_TOKEN", "allow-anonymous"):
            assert setting in line, f"{setting} not named in: {line}"
    # Loopback needs nothing: the same server on 127.0.0.1 starts.
    server, port = ns_server(start_server, netns, short_tmp, host="127.0.0.1", token=None)
    assert port > 0 and server.proc.poll() is None


def test_a_token_file_others_may_read_is_refused(netns, start_server, short_tmp, clients):
    loose = write_secret(short_tmp / "loose", TOKEN + "\n", mode=0o644)
    server = start_server(
        "--host", "0.0.0.0", "--token-file", str(loose), prefix=netns.prefix, wait=False
    )
    assert server.wait_exit() == EX_CONFIG, server.log
    assert f"chmod 600 {loose}" in server.log, server.log
    # picchat-send refuses to use it as well, as a usage error, before connecting.
    good, port = ns_server(start_server, netns, short_tmp)
    reader = Client(good.sock_path, "reader")
    clients.append(reader)
    cmd = [*send_cmd(), "--host", "10.99.0.1", "--port", str(port), "--token-file", str(loose)]
    r = run_in(netns, [*cmd, "leaked?"])
    assert r.returncode == EX_USAGE, (r.returncode, r.stderr)
    assert f"chmod 600 {loose}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    reader.send_line("/who")  # answered after anything sent to it before
    reader.expect(r"^\* 1 here")
    assert not any("leaked?" in line for line in reader.history)


def test_allow_anonymous_lets_other_machines_in(netns, start_server, short_tmp, clients):
    _, port = ns_server(start_server, netns, short_tmp, "--allow-anonymous", token=None)
    c = netns.client("10.99.0.1", port, "10.99.0.2", "anonymous")
    clients.append(c)
    c.expect(WELCOME)
    assert not any(AUTH_FIRST in line for line in c.history)


# ---- tokens ---------------------------------------------------------------------------


def test_wrong_token_refused_and_logged_right_token_works(netns, start_server, short_tmp, clients):
    server, port = ns_server(start_server, netns, short_tmp)
    local = Client(server.sock_path, "local")  # the Unix socket never needs a token
    clients.append(local)
    loopback = netns.client("127.0.0.1", port, None, "loopback")  # nor does loopback TCP
    clients.append(loopback)
    loopback.expect(WELCOME)

    # The right token, from 10.99.0.1: in the room, chatting both ways.
    good = member(netns, port, "10.99.0.1", "good")
    clients.append(good)
    mark = server.mark()
    server.wait_for_log(r"^.* 10\.99\.0\.1:\d+ authenticated$", 5)  # written by the end of the turn
    good.send_line("hello from afar")
    local.expect(rf"^{good.name}: hello from afar$")
    local.send_line("hello back")
    good.expect(rf"^{local.name}: hello back$")

    # A wrong token, from 10.99.0.2: refused, closed, and logged with its address.
    bad = netns.client("10.99.0.1", port, "10.99.0.2", "bad")
    clients.append(bad)
    assert bad.read_line() == "* " + AUTH_FIRST
    bad.send_line("/auth " + OTHER)
    assert bad.read_line(timeout=5) == FAILED, bad.history
    assert bad.read_until_eof() == []
    bad_port = bad.sock.getsockname()[1]
    line = server.wait_for_log(r"Failed authentication from", start=mark)
    assert f"10.99.0.2:{bad_port}" in line, line
    assert OTHER not in server.log and TOKEN not in server.log, "a token in the log"

    # picchat-send with --token-file, from 10.99.0.3: posted.
    def send(host: str) -> list[str]:
        return [*send_cmd(), "--host", host, "--port", str(port), "--name", "cron"]

    mine = write_secret(short_tmp / "client-token", TOKEN + "\n")
    r = run_in(netns, [*send("10.99.0.3"), "--token-file", str(mine), "via token file"])
    assert r.returncode == 0, r.stderr
    local.expect(r"^cron: via token file$")
    # ... and with PICCHAT_TOKEN instead of a file.
    r = run_in(netns, [*send("10.99.0.3"), "via env"], env=base_env(PICCHAT_TOKEN=TOKEN))
    assert r.returncode == 0, r.stderr
    local.expect(r"^cron: via env$")
    # Without a token: exit 77 and what to do.
    r = run_in(netns, [*send("10.99.0.3"), "no token"])
    assert r.returncode == EX_NOPERM, (r.returncode, r.stderr)
    assert "--token-file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A wrong one (from 10.99.0.4, whose first failure it is): exit 77 too.
    wrong = write_secret(short_tmp / "wrong-token", OTHER + "\n")
    r = run_in(netns, [*send("10.99.0.4"), "--token-file", str(wrong), "wrong token"])
    assert r.returncode == EX_NOPERM, (r.returncode, r.stderr)
    assert "refused our token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    local.send_line("/who")  # local, loopback, good: none of cron's visits stayed
    local.expect(r"^\* 3 here")
    posted = [line for line in local.history if line.startswith("cron: ")]
    assert posted == ["cron: via token file", "cron: via env"], posted


def test_picchat_client_with_a_token(netns, start_server, short_tmp, clients):
    server, port = ns_server(start_server, netns, short_tmp)
    local = Client(server.sock_path, "local")
    clients.append(local)
    mine = write_secret(short_tmp / "client-token", TOKEN + "\n")
    args = ["--host", "10.99.0.2", "--port", str(port), "--name", "alice", "--retry", "0.5"]
    alice = ProcessPeer(
        [*netns.prefix, *client_cmd(*args, "--token-file", str(mine))],
        "picchat-client",
        env=base_env(),
        stderr=subprocess.STDOUT,
    )
    clients.append(alice)
    alice.expect(r"^Connected to the server!$")
    alice.send_line("hi from picchat-client")
    local.expect(r"^alice: hi from picchat-client$")
    local.send_line("hi alice")
    alice.expect(rf"^{re.escape(local.name)}: hi alice$")

    # A wrong token: it stops (exit 77) instead of retrying for ever.
    wrong = write_secret(short_tmp / "wrong-token", OTHER + "\n")
    args[1] = "10.99.0.3"
    args[5] = "mallory"
    mallory = ProcessPeer(
        [*netns.prefix, *client_cmd(*args, "--token-file", str(wrong))],
        "picchat-client mallory",
        env=base_env(),
        stderr=subprocess.STDOUT,
    )
    clients.append(mallory)
    assert mallory.proc.wait(DEFAULT_TIMEOUT) == EX_NOPERM, mallory.read_until_eof()
    assert any("token" in line for line in mallory.read_until_eof()), mallory.history


def test_an_unauthenticated_client_gets_nothing_of_the_chat(
    netns, start_server, short_tmp, clients
):
    server, port = ns_server(start_server, netns, short_tmp)
    lurker = netns.client("10.99.0.1", port, "10.99.0.2", "lurker")
    clients.append(lurker)
    assert lurker.read_line() == "* " + AUTH_FIRST

    a = member(netns, port, "10.99.0.3", "a")
    clients.append(a)
    b = Client(server.sock_path, "b")
    clients.append(b)
    a.nick("alice")
    b.nick("bob")
    for i in range(5):
        a.send_line(f"secret {i}")
        b.expect(rf"^alice: secret {i}$")
        b.send_line(f"reply {i}")
        a.expect(rf"^bob: reply {i}$")
    c = settled_client(server, server.sock_path, "c")  # a join summary goes out, too
    clients.append(c)
    a.expect(rf"^\* .*\b{c.name}\b.* joined")
    a.send_line("/who")
    m = a.expect(r"^\* (\d+) here: (.*)$")
    assert (m.group(1), set(m.group(2).split(", "))) == ("3", {"alice", "bob", c.name}), m.string

    # Its own request is answered after anything queued for it before.
    lurker.send_line("/who")
    assert lurker.read_line() == "! " + AUTH_FIRST
    assert lurker.history == ["* " + AUTH_FIRST, "! " + AUTH_FIRST], lurker.history
    leak = re.search(rf"secret|reply|alice|bob|joined|{c.name}".encode(), lurker.raw)
    assert not leak, bytes(lurker.raw)

    # Once authenticated it is in the room: the chat from then on, none before.
    lurker.auth(TOKEN)
    a.send_line("now you see it")
    lurker.expect(r"^alice: now you see it$")
    assert not [line for line in lurker.history if "secret" in line or "reply" in line]

    # A structured hello instead of /auth: refused and closed, with the reason.
    prog = netns.client("10.99.0.1", port, "10.99.0.2", "program")
    clients.append(prog)
    prog.send_line('PICCHAT/1 {"name": "bot"}')
    reply = prog.expect(r"^PICCHAT/1 (\{.*\})$").group(1)
    assert '"auth_required"' in reply and "/auth TOKEN" in reply, reply
    assert prog.read_until_eof() == []


def test_login_timeout_drops_a_client_that_never_authenticates(netns, start_server, short_tmp):
    server, port = ns_server(start_server, netns, short_tmp, "--login-timeout", "1")
    silent = netns.client("10.99.0.1", port, "10.99.0.2", "silent")
    started = time.monotonic()
    try:
        assert silent.read_line() == "* " + AUTH_FIRST
        assert silent.read_until_eof(timeout=4) == []
        took = time.monotonic() - started
        assert 0.9 < took < 3, took
        line = server.wait_for_log(r"^.*Dropped 10\.99\.0\.2:\d+: it did not authenticate", 5)
        assert "within 1 s (login-timeout)" in line, line
    finally:
        silent.close()


# ---- the back-off ------------------------------------------------------------------


def test_backoff_holds_the_offending_address_and_no_one_else(
    netns, start_server, short_tmp, clients
):
    server, port = ns_server(start_server, netns, short_tmp)
    a = member(netns, port, "10.99.0.1", "a")
    b = member(netns, port, "10.99.0.1", "b")
    clients.extend([a, b])
    assert delivery(a, b, "warm-up") < 1  # both in the room

    # 10.99.0.2 guesses wrong; a moment later it tries the right token on
    # another connection: that too waits for the back-off to end.
    guesser = netns.client("10.99.0.1", port, "10.99.0.2", "guesser")
    patient = netns.client("10.99.0.1", port, "10.99.0.2", "patient")
    clients.extend([guesser, patient])
    for c in (guesser, patient):
        assert c.read_line() == "* " + AUTH_FIRST
    started = time.monotonic()
    guesser.send_line("/auth " + OTHER)
    patient.send_line("/auth " + TOKEN)

    # Meanwhile the pair chats, and someone from 10.99.0.3 gets in at once.
    times = []
    elsewhere_took = None
    for i in range(100):  # bounded: about 1 s of 20 ms rounds
        if time.monotonic() - started > 0.95:
            break
        assert not readable(guesser), f"answered after {time.monotonic() - started:.2f} s"
        assert not readable(patient), f"let in after {time.monotonic() - started:.2f} s"
        sender, receiver = (a, b) if i % 2 == 0 else (b, a)
        times.append(delivery(sender, receiver, f"ping {i}", timeout=LATENCY * 10))
        if i == 5:
            t = time.monotonic()
            other = member(netns, port, "10.99.0.3", "elsewhere")
            clients.append(other)
            elsewhere_took = time.monotonic() - t
        time.sleep(0.02)
    assert len(times) >= 20, times
    assert max(times) < LATENCY, f"slowest of {len(times)} deliveries: {max(times):.3f} s"
    assert elsewhere_took is not None and elsewhere_took < LATENCY, elsewhere_took

    assert guesser.read_line(timeout=3) == FAILED, guesser.history
    answered = time.monotonic() - started
    assert guesser.read_until_eof() == []
    patient.expect(WELCOME, timeout=3)
    let_in = time.monotonic() - started
    assert 0.95 <= answered < 2, answered
    assert 0.95 <= let_in < 2, let_in
    line = server.wait_for_log(r"Failed authentication from 10\.99\.0\.2:\d+", 5)
    assert "answered after 1 s" in line, line
    print(
        f"\n{len(times)} deliveries during the back-off: max {max(times) * 1000:.1f} ms, "
        f"median {sorted(times)[len(times) // 2] * 1000:.1f} ms; another address let in "
        f"after {elsewhere_took * 1000:.1f} ms; wrong token answered after {answered:.2f} s; "
        f"right token from the same address let in after {let_in:.2f} s"
    )


def test_backoff_grows_up_to_auth_backoff(netns, start_server, short_tmp, clients):
    _, port = ns_server(start_server, netns, short_tmp, "--auth-backoff", "1.5")
    answered = []
    for i in range(2):  # 1 s, then 2 s capped to 1.5 s
        c = netns.client("10.99.0.1", port, "10.99.0.2", f"guess {i}")
        clients.append(c)
        assert c.read_line() == "* " + AUTH_FIRST
        started = time.monotonic()
        c.send_line("/auth " + OTHER)
        assert c.read_line(timeout=4) == FAILED, c.history
        answered.append(time.monotonic() - started)
    assert 0.95 <= answered[0] < 1.4, answered
    assert 1.45 <= answered[1] < 1.95, answered


# ---- rotation ---------------------------------------------------------------------------


def test_sighup_rotates_the_tokens_and_keeps_who_is_in(netns, start_server, short_tmp, clients):
    server, port = ns_server(start_server, netns, short_tmp)
    a = member(netns, port, "10.99.0.2", "a")
    b = member(netns, port, "10.99.0.3", "b")
    clients.extend([a, b])
    assert delivery(a, b, "before") < 1

    mark = server.mark()
    write_secret(short_tmp / "server-token", OTHER + "\n")
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for_log(r"Reloaded: .*\btokens\b", start=mark)

    # Those in with the old token stay, and chat on both ways.
    assert delivery(a, b, "after the rotation") < 1
    assert delivery(b, a, "still here") < 1
    # Newcomers need the new one.
    new = member(netns, port, "10.99.0.4", "new", token=OTHER)
    clients.append(new)
    a.send_line("hello newcomer")
    new.expect(rf"^{a.name}: hello newcomer$")
    old = netns.client("10.99.0.1", port, "10.99.0.1", "old token")
    clients.append(old)
    assert old.read_line() == "* " + AUTH_FIRST
    old.send_line("/auth " + TOKEN)
    assert old.read_line(timeout=4) == FAILED
    assert old.read_until_eof() == []

    # A token file that went bad is not taken: the server keeps the last tokens.
    mark = server.mark()
    write_secret(short_tmp / "server-token", TOKEN + "\n", mode=0o644)
    os.kill(server.pid, signal.SIGHUP)
    line = server.wait_for_log(r"Reload failed", start=mark)
    assert "chmod 600" in line, line
    assert delivery(b, a, "after a failed reload") < 1
    late = member(netns, port, "10.99.0.4", "late", token=OTHER)
    clients.append(late)
    assert server.proc.poll() is None
