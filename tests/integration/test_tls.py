"""TLS against the real server: picchat's own clients (pinned, trust on first
use), openssl s_client and socat, handshakes that never finish, and a TLS
client that knocks at the plain port.

Certificates are self-signed, made by the openssl CLI (the ``cert`` fixture).
Everything here is on loopback, which needs no token, except one test in a
network namespace of its own (see test_auth.py) where it does.
"""

from __future__ import annotations

import re
import selectors
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .support import (
    DEFAULT_TIMEOUT,
    ROOT,
    Client,
    ProcessPeer,
    TlsClient,
    base_env,
    client_cmd,
    client_hello,
    free_port,
    listen_port,
    openssl_fingerprint,
    send_cmd,
    settled_client,
    write_secret,
)

EX_PROTOCOL = 76
TOKEN = "token-" + "c3" * 12
LATENCY = 0.1  # seconds: what a message between two others may take at most
WELCOME = r"^\* Welcome to picchat! You are (\S+)\."


def tls_server(start_server, cert_key, *extra, tls_port: int | None = None):
    """A server with a TLS listener (on ``tls_port``, else a free one);
    returns (server, TLS port)."""
    cert, key = cert_key
    port = tls_port or free_port()
    server = start_server(
        "--tls-port", str(port), "--tls-cert", str(cert), "--tls-key", str(key), *extra
    )
    assert listen_port(server, "127.0.0.1", tls=True) == port
    return server, port


def print_fingerprint(cert) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "picchat", "--tls-cert", str(cert), "--print-fingerprint"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    return r.stdout.strip()


def run_send(*args: str, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*send_cmd(), *args],
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )


def picchat_client(port: int, *args: str, env=None, label="picchat-client") -> ProcessPeer:
    """picchat-client over TLS (pipe mode), stderr in its output."""
    return ProcessPeer(
        client_cmd("--port", str(port), "--retry", "0.5", *args),
        label,
        env=env or base_env(),
        cwd=ROOT,
        stderr=subprocess.STDOUT,
    )


def config_env(tmp) -> dict[str, str]:
    """An environment whose known_hosts is ``tmp/xdg/picchat/known_hosts``
    (or, without XDG_CONFIG_HOME, ``tmp/home/.config/picchat/known_hosts``)."""
    return base_env(XDG_CONFIG_HOME=str(tmp / "xdg"), HOME=str(tmp / "home"))


def nodelay(c):
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as timed lines need
    return c


def delivery(a, b, text: str, timeout: float = 2.0) -> float:
    """Seconds from ``a`` sending ``text`` to ``b`` receiving it."""
    started = time.monotonic()
    a.send_line(text)
    b.expect(rf"^{re.escape(a.name)}: {re.escape(text)}$", timeout)
    return time.monotonic() - started


# ---- picchat's clients: a pinned certificate, and trust on first use ----------------------


def test_chat_over_tls_with_a_pinned_fingerprint(start_server, cert, short_tmp, clients):
    cert_key = cert()
    fp = print_fingerprint(cert_key[0])
    assert fp == openssl_fingerprint(cert_key[0]), "not the certificate's SHA-256"
    server, port = tls_server(start_server, cert_key)
    env = config_env(short_tmp)
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    bob.nick("bob")

    alice = picchat_client(port, "--name", "alice", "--fingerprint", fp, env=env)
    clients.append(alice)
    alice.expect(r"^Connected to the server!$")
    alice.send_line("hello over TLS")
    bob.expect(r"^alice: hello over TLS$")
    bob.send_line("hello back, in clear to me")
    alice.expect(r"^bob: hello back, in clear to me$")
    # The fingerprint openssl prints (hex) pins as well, with picchat-send.
    hexfp = subprocess.run(
        ["openssl", "x509", "-in", str(cert_key[0]), "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.split("=", 1)[1]
    r = run_send("--port", str(port), "--fingerprint", hexfp.strip(), "--name", "cron", "pinned")
    assert r.returncode == 0 and r.stderr == "", (r.returncode, r.stderr)
    bob.expect(r"^cron: pinned$")
    alice.expect(r"^cron: pinned$")
    # A pin is not trust on first use: nothing was recorded.
    assert not (short_tmp / "xdg").exists()
    assert "TLS with" not in server.log, server.log  # no handshake failed


def test_a_wrong_pin_is_refused(start_server, cert, short_tmp, clients):
    cert_key = cert()
    server, port = tls_server(start_server, cert_key)
    reader = settled_client(server, server.port, "reader")
    clients.append(reader)
    wrong = openssl_fingerprint(cert("other")[0])
    right = print_fingerprint(cert_key[0])
    assert wrong != right

    r = run_send("--port", str(port), "--fingerprint", wrong, "--name", "cron", "mitm?")
    assert r.returncode == EX_PROTOCOL, (r.returncode, r.stderr)
    assert wrong in r.stderr and right in r.stderr and "pinned" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr

    alice = picchat_client(port, "--name", "alice", "--fingerprint", wrong, label="alice")
    clients.append(alice)
    assert alice.proc.wait(DEFAULT_TIMEOUT) == EX_PROTOCOL
    out = "\n".join(alice.read_until_eof())
    assert "pinned" in out and right in out and "Traceback" not in out, out

    reader.send_line("/who")
    reader.expect(r"^\* 1 here")  # alice never got in
    assert not [line for line in reader.history if "mitm?" in line]


def test_a_ca_file_verifies_the_certificate(start_server, cert, short_tmp, clients):
    # A self-signed certificate is its own CA; it names localhost and 127.0.0.1.
    cert_key, other = cert(), cert("other")
    server, port = tls_server(start_server, cert_key)
    reader = settled_client(server, server.port, "reader")
    clients.append(reader)
    env = config_env(short_tmp)
    r = run_send("--port", str(port), "--ca-file", str(cert_key[0]), "verified", env=env)
    assert (r.returncode, r.stderr) == (0, "")
    reader.expect(r": verified$")
    r = run_send("--port", str(port), "--ca-file", str(other[0]), "unverified", env=env)
    assert r.returncode == EX_PROTOCOL, (r.returncode, r.stderr)
    assert "does not verify" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (short_tmp / "xdg").exists(), "a CA file is not trust on first use"
    reader.send_line("/who")
    reader.expect(r"^\* 1 here")
    assert not [line for line in reader.history if "unverified" in line]


def test_trust_on_first_use_then_a_changed_certificate_is_refused(
    start_server, cert, short_tmp, clients
):
    first, second = cert("first"), cert("second")
    fp1, fp2 = openssl_fingerprint(first[0]), openssl_fingerprint(second[0])
    server, port = tls_server(start_server, first)
    reader = settled_client(server, server.port, "reader")
    clients.append(reader)
    env = config_env(short_tmp)
    known = short_tmp / "xdg" / "picchat" / "known_hosts"

    # First use: recorded, and said so.
    r = run_send("--tls", "--port", str(port), "--name", "cron", "first use", env=env)
    assert r.returncode == 0, r.stderr
    assert fp1 in r.stderr and str(known) in r.stderr, r.stderr
    assert known.read_text() == f"127.0.0.1:{port} {fp1}\n"
    assert known.stat().st_mode & 0o077 == 0, oct(known.stat().st_mode)
    reader.expect(r"^cron: first use$")
    # Then: silently trusted.
    r = run_send("--tls", "--port", str(port), "--name", "cron", "second use", env=env)
    assert (r.returncode, r.stderr) == (0, "")
    reader.expect(r"^cron: second use$")
    # Without XDG_CONFIG_HOME, it is ~/.config/picchat/known_hosts.
    home_env = {k: v for k, v in env.items() if k != "XDG_CONFIG_HOME"}
    r = run_send("--tls", "--port", str(port), "--name", "cron", "from home", env=home_env)
    assert r.returncode == 0, r.stderr
    home_known = short_tmp / "home" / ".config" / "picchat" / "known_hosts"
    assert home_known.read_text() == f"127.0.0.1:{port} {fp1}\n"
    reader.expect(r"^cron: from home$")

    # The same port, another certificate: refused, loudly, and nothing sent.
    server.stop()
    clients.remove(reader)
    reader.close()
    server, _ = tls_server(start_server, second, tls_port=port)
    reader = settled_client(server, server.port, "reader")
    clients.append(reader)
    r = run_send("--tls", "--port", str(port), "--name", "cron", "intercepted?", env=env)
    assert r.returncode == EX_PROTOCOL, (r.returncode, r.stderr)
    assert "CHANGED" in r.stderr and fp1 in r.stderr and fp2 in r.stderr, r.stderr
    assert str(known) in r.stderr and "line 1" in r.stderr, r.stderr
    assert known.read_text() == f"127.0.0.1:{port} {fp1}\n", "known_hosts was changed"
    alice = picchat_client(port, "--tls", "--name", "alice", env=env, label="alice")
    clients.append(alice)
    assert alice.proc.wait(DEFAULT_TIMEOUT) == EX_PROTOCOL
    out = "\n".join(alice.read_until_eof())
    assert "CHANGED" in out and fp2 in out and "Traceback" not in out, out
    reader.send_line("/who")
    reader.expect(r"^\* 1 here")
    assert not [line for line in reader.history if "intercepted?" in line]


def test_tls_from_another_machine_needs_the_token_too(netns, start_server, cert, short_tmp):
    crt, key = cert()
    fp = openssl_fingerprint(crt)
    token_file = write_secret(short_tmp / "token", TOKEN + "\n")
    server = start_server(
        *("--host", "0.0.0.0", "--tls-port", "12345", "--tls-cert", str(crt)),
        *("--tls-key", str(key), "--token-file", str(token_file)),
        prefix=netns.prefix,
    )
    port = listen_port(server, "0.0.0.0")
    assert listen_port(server, "0.0.0.0", tls=True) == 12345
    reader = Client(server.sock_path, "reader")

    def send(host: str, *args: str, env=None) -> subprocess.CompletedProcess[str]:
        cmd = [*send_cmd(), "--host", host, "--port", "12345", "--fingerprint", fp, *args]
        return netns.run(cmd, env=env or base_env(), capture_output=True, text=True)

    try:
        # From 10.99.0.2 over TLS: without the token, refused (exit 77) ...
        r = send("10.99.0.2", "--name", "cron", "no token")
        assert r.returncode == 77 and "--token-file" in r.stderr, (r.returncode, r.stderr)
        # ... with it, posted.
        r = send("10.99.0.2", "--name", "cron", "with token", env=base_env(PICCHAT_TOKEN=TOKEN))
        assert r.returncode == 0, r.stderr
        reader.expect(r"^cron: with token$")
        # A raw ClientHello on the plain port from another machine: refused as
        # what it is, not counted as a failed /auth.
        raw = netns.client("10.99.0.1", port, "10.99.0.3", "raw hello")
        try:
            raw.send_raw(client_hello())
            assert any("plain_port" in line for line in raw.read_until_eof()), raw.history
        finally:
            raw.close()
        server.wait_for_log(r"Refused 10\.99\.0\.3:\d+: this is picchat's plain-text port")
        reader.send_line("/who")
        reader.expect(r"^\* 1 here")
        assert [line for line in reader.history if line.startswith("cron: ")] == [
            "cron: with token"
        ]
        assert "Failed authentication" not in server.log, server.log
    finally:
        reader.close()


# ---- other TLS clients ----------------------------------------------------------------------


TOOLS = {
    "openssl s_client": lambda port: [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-quiet",
        "-nocommands",
    ],
    "socat": lambda port: ["socat", "-", f"OPENSSL:127.0.0.1:{port},verify=0"],
}


@pytest.mark.parametrize("tool", TOOLS)
def test_openssl_and_socat_chat_over_tls(tool, start_server, cert, clients):
    argv = TOOLS[tool](0)
    if shutil.which(argv[0]) is None:
        pytest.skip(f"{argv[0]} is not installed (apt install {argv[0]})")
    server, port = tls_server(start_server, cert())
    bob = settled_client(server, server.port, "bob")
    clients.append(bob)
    bob.nick("bob")
    peer = ProcessPeer(TOOLS[tool](port), tool, stderr=subprocess.DEVNULL)
    clients.append(peer)
    name = peer.expect(WELCOME).group(1)
    peer.send_line(f"hello from {tool}")
    bob.expect(rf"^{name}: hello from {re.escape(tool)}$")
    bob.send_line("hello back ✓")
    peer.expect(r"^bob: hello back ✓$")
    bob.expect(rf"^\* .*\b{name}\b.* joined")  # announced: its rename and leave will be too
    peer.send_line("/nick viatls")
    peer.expect(r"is now known as viatls$")
    bob.expect(rf"^\* {name} is now known as viatls$")
    peer.send_line("/quit")
    peer.expect(r"^\* Goodbye")
    bob.expect(r"^\* .*\bviatls\b.* left$")


# ---- handshakes that never finish --------------------------------------------------------


SILENT = 180
HALF = 20


def test_silent_and_half_finished_handshakes_delay_no_one_and_are_dropped(
    start_server, cert, clients
):
    server, port = tls_server(start_server, cert(), "--login-timeout", "1")
    a = nodelay(settled_client(server, server.port, "a"))
    b = nodelay(TlsClient(port, "b"))
    clients.extend([a, b])
    assert delivery(a, b, "warm-up") < 1

    hello = client_hello()
    mark = server.mark()
    opened_at: dict[socket.socket, float] = {}
    dropped_after: dict[socket.socket, float] = {}  # seconds after its own opening
    sel = selectors.DefaultSelector()

    def reap(timeout: float) -> None:
        """Note the bad connections that the server has closed (EOF)."""
        for key, _ in sel.select(timeout):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"a bad connection got {data[:60]!r} instead of EOF"
            dropped_after[s] = time.monotonic() - opened_at[s]
            sel.unregister(s)

    times: list[float] = []
    first = time.monotonic()
    try:
        for i in range(SILENT + HALF):
            s = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
            opened_at[s] = time.monotonic()
            sel.register(s, selectors.EVENT_READ)
            if i >= SILENT:
                s.sendall(hello[: len(hello) // 2])  # half a ClientHello, then nothing
            if i % 10 == 9:  # the pair chats, both ways, while they pile up
                times.append(delivery(a, b, f"a {i}", timeout=LATENCY * 10))
                times.append(delivery(b, a, f"b {i}", timeout=LATENCY * 10))
        all_open = time.monotonic() - first
        # And while they wait for their login timeout, and while they are dropped.
        for i in range(200):  # bounded: 20 ms rounds until all are dropped, or 4 s
            if len(dropped_after) == len(opened_at) or time.monotonic() - first > 4:
                break
            sender, receiver = (a, b) if i % 2 == 0 else (b, a)
            times.append(delivery(sender, receiver, f"wait {i}", timeout=LATENCY * 10))
            reap(0.02)
        assert len(times) >= 40, (len(times), all_open)
        assert max(times) < LATENCY, f"slowest of {len(times)} deliveries: {max(times):.3f} s"
        # Each was dropped at its login timeout: not before, and not much later.
        assert len(dropped_after) == len(opened_at), (
            f"{len(opened_at) - len(dropped_after)} still open 4 s after the first was opened"
        )
        assert min(dropped_after.values()) > 0.95, min(dropped_after.values())
        assert max(dropped_after.values()) < 3, max(dropped_after.values())
    finally:
        sel.close()
        for s in opened_at:
            s.close()
    pattern = r"Dropped 127\.0\.0\.1:\d+: it did not finish its TLS handshake within 1 s"
    server.wait_for_log(pattern, start=mark, count=SILENT + HALF)
    lines = [line for line in server.lines[mark:] if re.search(pattern, line)]
    assert len(lines) == SILENT + HALF, f"{len(lines)} drops logged"
    assert "(login-timeout)" in lines[0], lines[0]
    # The pair, whose TLS handshake was done in time, is still there.
    assert delivery(b, a, "still here") < 1
    print(
        f"\n{SILENT} silent + {HALF} half-hello TLS connections opened in {all_open:.2f} s; "
        f"{len(times)} deliveries meanwhile: max {max(times) * 1000:.1f} ms, median "
        f"{sorted(times)[len(times) // 2] * 1000:.1f} ms; each dropped "
        f"{min(dropped_after.values()):.2f} to {max(dropped_after.values()):.2f} s after it opened"
    )


# ---- TLS on the plain port ------------------------------------------------------------------


def test_a_tls_client_on_the_plain_port_is_refused_and_nothing_reaches_the_chat(
    start_server, cert, clients
):
    server, _ = tls_server(start_server, cert())
    a = settled_client(server, server.port, "a")
    b = settled_client(server, server.port, "b")
    clients.extend([a, b])
    mark = server.mark()

    # Raw ClientHello bytes: answered with why, and closed.
    raw = Client(server.port, "raw hello", welcome=False)
    clients.append(raw)
    raw.send_raw(client_hello())
    lines = raw.read_until_eof()
    assert any("plain_port" in line and "tls-port" in line for line in lines), raw.history
    # A TLS client: its handshake fails (what it reads is no TLS).
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=DEFAULT_TIMEOUT) as s,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        ctx.wrap_socket(s, server_hostname="localhost")
    # openssl s_client too gives up (it gets no TLS answer).
    if shutil.which("openssl"):
        r = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert r.returncode != 0, r.stdout[-500:]
    server.wait_for_log(r"Refused 127\.0\.0\.1:\d+: this is picchat's plain-text port", mark)

    # The members saw nothing of any of them: no chat line but each other's.
    a.send_line("marker")
    b.expect(rf"^{a.name}: marker$")
    b.send_line("marker back")
    a.expect(rf"^{b.name}: marker back$")
    for c, expected in ((a, f"{b.name}: marker back"), (b, f"{a.name}: marker")):
        chat = [line for line in c.history if not line.startswith("* ")]
        assert chat == [expected], chat
