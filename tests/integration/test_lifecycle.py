"""Starting and stopping the real process: signals, exit codes, settings."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from picchat.config import SETTINGS, env_name, flag

from .support import ROOT, Client, StructuredClient, base_env, free_port, tcp_wmem_max

EX_UNAVAILABLE = 69
EX_CONFIG = 78
EX_USAGE = 64


def log_lines(server) -> list[str]:
    return [line for line in server.lines if line.strip()]


# ---- stopping ------------------------------------------------------------------


def test_sigterm_tells_everyone_and_exits_0(server, clients):
    tcp = Client(server.port, "tcp")
    unix = Client(server.sock_path, "unix")
    structured = StructuredClient(server.port, name="prog")
    clients.extend([tcp, unix, structured])
    tcp.send_line("before the end")  # everyone is really in
    unix.expect(r": before the end$")
    structured.expect(type="msg", text="before the end")
    assert server.sock_path.exists()

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    for c in (tcp, unix):
        rest = c.read_until_eof(timeout=3)
        assert rest and rest[-1].startswith("* Server is shutting down"), rest
    while (frame := structured.read_frame(timeout=3)) is not None:
        last = frame
    assert last["type"] == "bye", structured.frames
    assert server.wait_exit(timeout=3) == 0, server.log
    assert time.monotonic() - started < 3.5
    assert not server.sock_path.exists(), "the Unix socket file was left behind"
    assert "Traceback" not in server.log


def test_sigterm_does_not_wait_forever_for_a_reader_that_never_reads(start_server, clients):
    # The stuck reader must have output waiting in the server itself, beyond
    # what the kernel buffers for it (its send buffer grows up to tcp_wmem's
    # maximum): send that much plus 1 MiB, with a max-queue that keeps it.
    chunk = 60_000
    total = tcp_wmem_max() + (1 << 20)
    if total > 64 << 20:
        pytest.skip(f"tcp_wmem allows {total} bytes of kernel buffer: too much to fill quickly")
    server = start_server(
        "--shutdown-timeout", "1", "--max-line", "65536", "--max-queue", str(2 * total)
    )
    stuck = Client(server.port, "stuck", rcvbuf=1024, welcome=False)
    talker = Client(server.port, "talker")
    listener = Client(server.port, "listener")
    clients.extend([stuck, talker, listener])
    count = total // chunk + 1
    for i in range(count):
        talker.send_line(f"{i:05d} " + "z" * chunk)
        listener.expect(rf": {i:05d} z+$")
    assert "too slow" not in server.log

    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert listener.read_until_eof(timeout=3)[-1].startswith("* Server is shutting down")
    assert server.wait_exit(timeout=4) == 0, server.log
    took = time.monotonic() - started
    assert 0.8 < took < 3, f"exited after {took:.1f} s with --shutdown-timeout 1"


def test_max_clients_refuses_with_a_line(start_server, clients):
    server = start_server("--max-clients", "2")
    a = Client(server.port, "a")
    b = Client(server.sock_path, "b")
    clients.extend([a, b])
    third = Client(server.port, "third", welcome=False)
    clients.append(third)
    lines = third.read_until_eof(timeout=5)
    assert len(lines) == 1 and lines[0].startswith("! server full"), lines
    server.wait_for_log(r"max-clients")
    a.send_line("two is company")
    b.expect(rf"^{a.name}: two is company$")
    a.close()
    clients.remove(a)
    # A place is free again once a client has gone.
    server.wait_for_log(rf"{a.name} .* left")
    d = Client(server.port, "d")
    clients.append(d)


def test_sigint_stops_cleanly_too(server, clients):
    c = Client(server.port, "c")
    clients.append(c)
    server.proc.send_signal(signal.SIGINT)
    assert c.read_until_eof(timeout=3)[-1].startswith("* Server is shutting down")
    assert server.wait_exit(timeout=3) == 0, server.log
    assert "Traceback" not in server.log


def test_stale_socket_of_a_killed_server_is_replaced(server, start_server, clients):
    server.proc.kill()  # our own server process, by pid: no chance to clean up
    server.wait_exit(timeout=5)
    assert server.sock_path.exists()
    again = start_server(sock=server.sock_path)
    c = Client(again.sock_path, "after the crash")
    clients.append(c)
    assert c.name


def test_ipv6_loopback(start_server, clients):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server = start_server("--host", "::1")
    assert server.port, server.log
    s6 = socket.create_connection(("::1", server.port), timeout=5)
    try:
        assert s6.recv(200).startswith(b"* Welcome to picchat!")
    finally:
        s6.close()


# ---- startup errors --------------------------------------------------------------


def test_port_in_use_exits_69_with_one_line(start_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = start_server(port=str(port), wait=False)
        assert server.wait_exit(timeout=5) == EX_UNAVAILABLE
    lines = log_lines(server)
    assert len(lines) == 1, lines
    assert "address already in use" in lines[0].lower(), lines[0]
    assert str(port) in lines[0]
    assert "Traceback" not in server.log
    assert not server.sock_path.exists(), "the Unix socket of a server that never ran"


def test_socket_of_a_live_server_exits_69(server, start_server):
    other = start_server(sock=server.sock_path, wait=False)
    assert other.wait_exit(timeout=5) == EX_UNAVAILABLE
    lines = log_lines(other)
    assert len(lines) == 1 and "already listening" in lines[0], lines
    # The first server still owns its socket.
    c = Client(server.sock_path, "still there")
    c.close()


def test_a_state_directory_in_use_exits_69_and_leaves_the_history_alone(start_server, short_tmp):
    state = short_tmp / "state"
    first = start_server("--state-dir", str(state))
    files = {p.name: p.read_bytes() for p in state.iterdir()}
    other = start_server("--state-dir", str(state), sock=short_tmp / "other.sock", wait=False)
    assert other.wait_exit(timeout=5) == EX_UNAVAILABLE
    lines = log_lines(other)
    assert len(lines) == 1 and "in use by another picchat-server" in lines[0], lines
    assert {p.name: p.read_bytes() for p in state.iterdir()} == files
    c = Client(first.sock_path, "the first still runs")  # and still has its history
    c.close()


def test_socket_path_that_is_not_a_socket_exits_69(start_server, short_tmp):
    path = short_tmp / "file.sock"
    path.write_text("precious data\n")
    server = start_server(sock=path, wait=False)
    assert server.wait_exit(timeout=5) == EX_UNAVAILABLE
    lines = log_lines(server)
    assert len(lines) == 1 and "not a socket" in lines[0], lines
    assert path.read_text() == "precious data\n", "the server clobbered a file"


def test_fifo_path_that_is_not_a_fifo_exits_69(start_server, short_tmp):
    path = short_tmp / "in.fifo"
    path.write_text("x")
    server = start_server("--fifo", str(path), wait=False)
    assert server.wait_exit(timeout=5) == EX_UNAVAILABLE
    lines = log_lines(server)
    assert len(lines) == 1 and "not a FIFO" in lines[0], lines
    assert not server.sock_path.exists(), "listeners opened before the FIFO failed were left"


@pytest.mark.parametrize(
    ("args", "config", "mentions"),
    [
        (["--max-line", "abc"], None, "max-line"),
        (["--max-line", "10"], None, "max-line"),
        (["--port", "70000"], None, "port"),
        ([], "colour = 'blue'\n", "colour"),
        ([], "max-line = 'abc'\n", "max-line"),
        ([], "port = [\n", "TOML"),
    ],
    ids=["max-line-abc", "max-line-too-small", "port-too-big", "unknown-key", "bad-value", "toml"],
)
def test_bad_setting_exits_with_one_line(args, config, mentions, start_server, short_tmp):
    """A bad value on the command line is a usage error (64); elsewhere a
    configuration error (78)."""
    if config is not None:
        path = short_tmp / "picchat.toml"
        path.write_text(config)
        args = [*args, "--config", str(path)]
    server = start_server(*args, wait=False)
    expected = EX_USAGE if config is None else EX_CONFIG
    assert server.wait_exit(timeout=5) == expected, server.log
    lines = log_lines(server)
    assert len(lines) == 1, lines
    assert mentions in lines[0], lines[0]
    assert "Traceback" not in server.log


def test_bad_environment_setting_exits_78(start_server):
    server = start_server(env=base_env(PICCHAT_MAX_LINE="abc"), wait=False)
    assert server.wait_exit(timeout=5) == EX_CONFIG
    lines = log_lines(server)
    assert len(lines) == 1 and "PICCHAT_MAX_LINE" in lines[0], lines


def test_usage_error_exits_64(start_server):
    server = start_server("--no-such-option", wait=False)
    assert server.wait_exit(timeout=5) == EX_USAGE
    assert "Traceback" not in server.log


def test_picchat_port_environment_sets_the_port(start_server, clients):
    port = free_port()
    server = start_server(port=None, env=base_env(PICCHAT_PORT=str(port)))
    assert server.port == port, server.log
    c = Client(port, "env port")
    clients.append(c)


def test_command_line_beats_environment(start_server):
    port = free_port()
    server = start_server(env=base_env(PICCHAT_PORT=str(port)))  # with --port 0
    assert server.port != port, server.log


# ---- help ------------------------------------------------------------------------


def test_help_shows_every_setting():
    proc = subprocess.run(
        [sys.executable, "-m", "picchat", "--help"],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\s+", " ", proc.stdout)
    missing = [name for name in SETTINGS if flag(name) not in text or env_name(name) not in text]
    assert not missing, f"--help does not show {missing}"
    for word in ("--config", "default:", "Exit codes", "69", "78"):
        assert word in text, word


def test_the_soft_fd_limit_is_raised_to_the_hard_one_and_a_low_one_is_explained(start_server):
    import shutil
    from pathlib import Path

    if shutil.which("prlimit") is None:
        pytest.skip("prlimit (util-linux) is needed to start the server with a low fd limit")

    def soft_limit(pid: int) -> int:
        text = Path(f"/proc/{pid}/limits").read_text()
        return int(re.search(r"Max open files\s+(\d+)", text).group(1))

    server = start_server("--max-clients", "1000", prefix=["prlimit", "--nofile=256:4096"])
    assert soft_limit(server.pid) == 4096
    assert not any("file descriptors are allowed" in line for line in server.lines)
    # A hard limit below max-clients: said once at start, with the setting to change.
    low = start_server("--max-clients", "10000", sock=None, prefix=["prlimit", "--nofile=512:512"])
    line = low.wait_for_log(r"max-clients is 10000 but only 512 file descriptors")
    assert "LimitNOFILE=" in line


def test_idle_listeners_cost_no_timer_and_no_wake_up_but_a_begun_line_has_a_deadline(
    start_server, clients
):
    from .support import voluntary_ctxt_switches

    server = start_server("--login-timeout", "1")
    listeners = []
    for i in range(6):  # 150 ms apart: six login timers would fire at six moments
        listeners.append(Client(server.port, f"idle{i}"))
        time.sleep(0.15)
    clients.extend(listeners)
    slow = Client(server.port, "slow")
    clients.append(slow)
    slow.send_raw(b"half a line, never ended")
    time.sleep(0.3)  # the server reads it and arms the deadline for that one only
    v0 = voluntary_ctxt_switches(server.pid)
    time.sleep(1.5)  # past every listener's login deadline
    v1 = voluntary_ctxt_switches(server.pid)
    # One wake-up for the slow one's deadline (and its close), none for the six.
    assert v1 - v0 <= 3, f"{v1 - v0} wake-ups: the idle listeners have timers"
    server.wait_for_log(r"it did not finish its first line within 1 s \(login-timeout\)")
    slow.read_until_eof(timeout=5)
    # The listeners are still here and still get the chat.
    talker = Client(server.port, "talker")
    clients.append(talker)
    talker.send_line("still there?")
    for c in listeners:
        c.expect(r": still there\?$")
