"""picchat-send against the real server: targets, stdin, exit codes, silence."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .support import Client, base_env, free_port, send_cmd, settled_client

EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_NOPERM = 77


def run_send(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None, prefix=(), python=None
) -> tuple[subprocess.CompletedProcess[str], float]:
    cmd = [*prefix, *send_cmd(python or sys.executable), *args]
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        env=env if env is not None else base_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=15,
    )
    return proc, time.monotonic() - started


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return lines[0]


def test_send_over_unix_socket(server, clients):
    c = Client(server.port, "reader")
    clients.append(c)
    proc, _ = run_send("--socket", str(server.sock_path), "--name", "cronjob", "backup finished")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    c.expect(r"^cronjob: backup finished$")


def test_send_over_tcp(server, clients):
    c = Client(server.sock_path, "reader")
    clients.append(c)
    proc, _ = run_send("--port", str(server.port), "--name", "tcpjob", "over tcp")
    assert proc.returncode == 0, proc.stderr
    c.expect(r"^tcpjob: over tcp$")


def test_send_stdin_lines_in_order(server, clients):
    c = Client(server.port, "reader")
    clients.append(c)
    lines = [f"line {i}" for i in range(150)]  # more than picchat-send's window of 64
    proc, _ = run_send(
        "--socket", str(server.sock_path), "--name", "batch", "-", stdin="\n".join(lines) + "\n"
    )
    assert proc.returncode == 0, proc.stderr
    for line in lines:
        m = c.expect(r"^batch: ")
        assert m.string == f"batch: {line}"
        assert not [s for s in c.skipped if s.startswith("batch: ")]


def test_refused_messages_exit_65_and_the_others_go_through(server, clients):
    c = Client(server.port, "reader")
    clients.append(c)
    # Too long for the server's max-line: picchat-send refuses it itself.
    proc, _ = run_send("--socket", str(server.sock_path), "--name", "big", "a" * 5000)
    assert proc.returncode == EX_DATAERR, (proc.returncode, proc.stderr)
    assert "too long" in one_line(proc.stderr)
    # Empty once the escape sequence is removed: the server refuses it.
    stdin = "good 1\n\x1b[2J\ngood 2\n"
    proc, _ = run_send("--socket", str(server.sock_path), "--name", "mixed", "-", stdin=stdin)
    assert proc.returncode == EX_DATAERR, (proc.returncode, proc.stderr)
    assert "refused" in one_line(proc.stderr)
    c.expect(r"^mixed: good 1$")
    c.expect(r"^mixed: good 2$")
    assert not [line for line in c.history if line.startswith("big: ")]


def test_bad_sender_name_exits_65(server):
    proc, _ = run_send("--socket", str(server.sock_path), "--name", "two words", "hi")
    assert proc.returncode == EX_DATAERR, (proc.returncode, proc.stderr)
    assert "name" in one_line(proc.stderr)


def test_send_without_server_exits_69(short_tmp):
    port = free_port()
    proc, took = run_send("--port", str(port), "hello")
    assert proc.returncode == EX_UNAVAILABLE, proc.stderr
    assert took < 5
    line = one_line(proc.stderr)
    assert str(port) in line, line

    missing = short_tmp / "missing.sock"
    proc, took = run_send("--socket", str(missing), "hello")
    assert proc.returncode == EX_UNAVAILABLE, proc.stderr
    assert took < 5
    line = one_line(proc.stderr)
    assert str(missing) in line, line


def test_send_default_target_is_the_runtime_dir_socket(start_server, short_tmp, clients):
    # No TCP listener at all: if picchat-send works, it used the local socket.
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    sock_path = xdg / "picchat" / "picchat.sock"
    server = start_server(
        "--host", "", "--log-level", "debug", port=None, sock=sock_path, env=base_env()
    )
    assert server.port is None, "a TCP listener although --host ''"
    c = Client(sock_path, "reader")
    clients.append(c)
    mark = server.mark()
    proc, _ = run_send("--name", "default", "found you", env=base_env(XDG_RUNTIME_DIR=str(xdg)))
    assert proc.returncode == 0, proc.stderr
    c.expect(r"^default: found you$")
    server.wait_for_log(r"connection from local uid \d+", start=mark)


def test_send_default_target_with_socket_auto(start_server, short_tmp, clients):
    # Both sides compute the same default path from XDG_RUNTIME_DIR.
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o700)
    env = base_env(XDG_RUNTIME_DIR=str(xdg))
    server = start_server("--host", "", port=None, sock="auto", env=env)
    assert (xdg / "picchat" / "picchat.sock").exists(), server.log
    c = Client(xdg / "picchat" / "picchat.sock", "reader")
    clients.append(c)
    proc, _ = run_send("--name", "auto", "auto path", env=env)
    assert proc.returncode == 0, proc.stderr
    c.expect(r"^auto: auto path$")


def test_sender_is_not_announced(server, clients):
    watcher = settled_client(server, server.port, "watcher")
    clients.append(watcher)
    proc, _ = run_send("--socket", str(server.sock_path), "--name", "quiet", "no fanfare")
    assert proc.returncode == 0, proc.stderr
    watcher.expect(r"^quiet: no fanfare$")
    # A newcomer after it: its join line is the first presence line the watcher
    # gets, and it mentions the newcomer only (no join or leave of the sender,
    # which would be pending or announced by then).
    probe = Client(server.port, "probe")
    clients.append(probe)
    m = watcher.expect(rf"^\* .*\b{probe.name}\b")
    assert m.string == f"* {probe.name} joined", m.string
    presence = [line for line in watcher.history[1:] if line.startswith("* ")]
    assert presence == [m.string], presence


# ---- a socket we may not use ---------------------------------------------------


def unprivileged_python() -> tuple[list[str], str]:
    """A command prefix running as nobody, and a Python >= 3.11 that nobody can run."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    if shutil.which("setpriv"):
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    elif shutil.which("runuser"):
        prefix = ["runuser", "-u", "nobody", "--"]
    else:
        pytest.skip("neither setpriv nor runuser is installed")
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        probe = subprocess.run(
            [*prefix, python, "-c", "import sys; assert sys.version_info >= (3, 11)"],
            capture_output=True,
            timeout=10,
            cwd="/",
        )
        if probe.returncode == 0:
            return prefix, python
    pytest.skip("no Python >= 3.11 that the user nobody may run")


def catch_tcp_1234() -> socket.socket | None:
    """Listen on picchat-send's default TCP target, to see whether it falls back."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 1234))
    except OSError as exc:
        s.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise
    s.listen(8)
    s.setblocking(False)
    return s


def assert_no_fallback(catcher: socket.socket | None) -> None:
    if catcher is None:
        return  # port 1234 is someone else's: the exit code has to do
    with catcher:
        try:
            conn, _ = catcher.accept()
        except BlockingIOError:
            return
        conn.close()
        raise AssertionError("picchat-send fell back to TCP 127.0.0.1:1234")


@pytest.mark.parametrize("how", ["--socket", "default path"])
def test_send_socket_without_permission_exits_77(how, start_server, short_tmp):
    prefix, python = unprivileged_python()
    # nobody may pass through the directories, but not write to the socket (0660 root:root).
    short_tmp.chmod(0o711)
    xdg = short_tmp / "xdg"
    xdg.mkdir(mode=0o711)
    sock_path = xdg / "picchat" / "picchat.sock"
    server = start_server(sock=sock_path)
    (xdg / "picchat").chmod(0o711)
    assert oct(sock_path.stat().st_mode & 0o777) == "0o660"

    env = base_env(XDG_RUNTIME_DIR=str(xdg), HOME="/")
    args = ["--socket", str(sock_path)] if how == "--socket" else []
    catcher = catch_tcp_1234()
    try:
        proc, took = run_send(
            *args, "--name", "intruder", "hi", env=env, prefix=prefix, python=python
        )
    finally:
        assert_no_fallback(catcher)
    assert proc.returncode == EX_NOPERM, (proc.returncode, proc.stderr)
    assert took < 5
    line = one_line(proc.stderr)
    assert "permission" in line.lower() and str(sock_path) in line, line
    assert "intruder" not in server.log


def test_send_takes_input_that_is_not_utf8(server, clients):
    c = Client(server.port, "reader")
    clients.append(c)
    proc = subprocess.run(
        [*send_cmd(), "--socket", str(server.sock_path), "--name", "bin", "-"],
        env=base_env(),
        input=b"ok\nbad \xff byte\n",
        capture_output=True,
        timeout=15,
    )
    assert proc.returncode == 0, proc.stderr
    c.expect(r"^bin: ok$")
    c.expect("^bin: bad \ufffd byte$")


def test_send_rejects_a_bad_timeout(server):
    proc, _ = run_send("--socket", str(server.sock_path), "--timeout", "-1", "x")
    assert proc.returncode == 64
    assert "--timeout" in one_line(proc.stderr)


def test_send_to_a_service_that_is_not_picchat_exits_76():
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def banner_then_close():
        conn, _ = listener.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        conn.recv(4096)  # the hello
        conn.close()

    t = threading.Thread(target=banner_then_close, daemon=True)
    t.start()
    proc, _ = run_send("--port", str(port), "--timeout", "5", "hello?")
    t.join(timeout=5)
    listener.close()
    assert proc.returncode == 76, proc.stderr
    assert "does not speak picchat" in one_line(proc.stderr)
