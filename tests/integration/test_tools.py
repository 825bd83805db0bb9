"""The everyday programs people use as chat clients: nc, socat, telnet."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .support import Client, ProcessPeer

TOOLS = {
    "nc": ["nc", "127.0.0.1", "{port}"],
    "socat": ["socat", "-", "TCP:127.0.0.1:{port}"],
    # telnet with piped stdin works line by line (it prints "Trying ..." first).
    "telnet": ["telnet", "127.0.0.1", "{port}"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_as_participant(tool, server, clients):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (the CI installs it: .ci/run)")
    argv = [a.format(port=server.port) for a in TOOLS[tool]]
    peer = ProcessPeer(argv, tool)
    clients.append(peer)
    m = peer.expect(r"^\* Welcome to picchat! You are (\S+)\.", timeout=5)
    tool_name = m.group(1)
    sock = Client(server.port, "socket")
    clients.append(sock)

    peer.send_line(f"hello from {tool}")
    sock.expect(rf"^{tool_name}: hello from {tool}$")
    sock.send_line(f"hello {tool}, from a socket")
    peer.expect(rf"^{sock.name}: hello {tool}, from a socket$")

    # A command from the tool works too, and the rename is seen by the other.
    peer.send_line(f"/nick {tool}-user")
    peer.expect(rf"is now known as {re.escape(tool)}-user$")
    peer.send_line("second line")
    sock.expect(rf"^{tool}-user: second line$")
    # Nothing the tool sent came back to it.
    assert not any(line.startswith(f"{tool_name}: ") for line in peer.history)
    assert not any("\r" in line for line in sock.history), "a CR leaked through"


def test_one_shot_nc_with_unterminated_line(server, clients):
    # `printf 'text' | nc -N host port` from a script: the last line has no
    # newline and nc half-closes; the line is still delivered.
    if shutil.which("nc") is None:
        pytest.skip("nc is not installed (the CI installs it: .ci/run)")
    c = Client(server.port, "reader")
    clients.append(c)
    proc = subprocess.run(
        ["nc", "-N", "127.0.0.1", str(server.port)],
        input=b"first\nno newline at the end",
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"* Welcome to picchat!")
    c.expect(r"^guest\d+: first$")
    c.expect(r"^guest\d+: no newline at the end$")
