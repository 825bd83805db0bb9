"""The history on disk, deployed with deploy/deploy.sh to a stand-in Pi: an
upgrade keeps it (same history id, seq going on, a resuming client replayed
what it missed with no gap), uninstalling keeps it, --purge removes it; and a
target without systemd is refused clearly by deploy.sh.

Its own Pi (not test_deploy.py's), so it starts from a fresh machine. Run with
`make system` (or `-k history_on_disk`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pi import Pi, require
from .test_deploy import Laptop, main_pid

ROOT = Path(__file__).parents[2]
STATE = "/var/lib/picchat"

require()

pytestmark = pytest.mark.timeout(600)

# A structured member on the Pi's local socket (root may take any name): says
# its hello (argv[1], JSON), reads the welcome, then the frames that follow
# until argv[2] msg frames came and 1 s passed with nothing more (at most 15 s),
# and prints {"welcome": ..., "frames": [...]}.
CLIENT = r"""
import json, re, socket, sys, time
hello, want = json.loads(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect("/run/picchat/picchat.sock")
s.sendall(b"PICCHAT/1 " + json.dumps(hello).encode() + b"\n")
buf, welcome, frames = b"", None, []
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    while b"\n" in buf:
        raw, buf = buf.split(b"\n", 1)
        line = raw.decode()
        if welcome is None:
            m = re.match(r"PICCHAT/\d+[ \t](\{.*\})$", line)
            if m:
                welcome = json.loads(m.group(1))
        else:
            frames.append(json.loads(line))
    msgs = sum(f.get("type") == "msg" for f in frames)
    s.settimeout(1.0 if welcome is not None and msgs >= want else 10)
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        if welcome is not None and msgs >= want:
            break
        continue
    if not chunk:
        break
    buf += chunk
s.sendall(b'{"type":"quit"}\n')
s.close()
print(json.dumps({"welcome": welcome, "frames": frames}))
"""


@pytest.fixture(scope="module")
def laptop(tmp_path_factory) -> Iterator[Laptop]:
    with Pi("picchat-history-test") as pi:
        pi.run("systemctl", "start", "ssh")
        yield Laptop(pi, tmp_path_factory.mktemp("laptop"))


def structured(pi: Pi, hello: dict, want: int = 0) -> tuple[dict, list[dict]]:
    out = pi.run("python3", "-c", CLIENT, json.dumps(hello), str(want), timeout=30).stdout
    got = json.loads(out)
    assert got["welcome"] and got["welcome"]["type"] == "welcome", got
    return got["welcome"], got["frames"]


def deployed(laptop: Laptop, *args: str, source: Path = ROOT) -> str:
    env = dict(os.environ, PICCHAT_SSH_OPTS=f"-F {laptop.config}")
    proc = subprocess.run(
        ["sh", str(source / "deploy" / "deploy.sh"), "--identity", str(laptop.key), *args, "pi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def newer_checkout(tmp_path: Path) -> Path:
    """This checkout with a bumped version: an upgrade that changes the code."""
    newer = tmp_path / "newer"
    shutil.copytree(ROOT, newer, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    init = newer / "picchat" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.'))
    return newer


def state_files(pi: Pi) -> list[str]:
    """`owner group mode name` of the state directory and each file in it."""
    out = pi.run("sh", "-c", f"stat -c '%U %G %a %n' {STATE} {STATE}/*").stdout
    return out.splitlines()


def test_an_upgrade_keeps_the_history_and_a_resuming_client_misses_nothing(laptop, tmp_path):
    pi = laptop.pi
    deployed(laptop)
    for i in (1, 2, 3):
        pi.run("picchat-send", "--name", "root@pi", f"before the upgrade {i}")
    before, _ = structured(pi, {"name": "x"})
    n = before["seq"]
    assert n >= 3
    # The last three messages are ours (nothing else posts between them).
    pid = main_pid(pi).strip()

    out = deployed(laptop, source=newer_checkout(tmp_path))
    assert out.count("restarting picchat-server") == 1, out
    # (a) the new version runs, in a new process.
    assert main_pid(pi).strip() != pid
    after, _ = structured(pi, {"name": "y"})
    assert after["server"].startswith("picchat/9."), after
    # (b) the same history, its numbers going on: the only message since is
    # install.sh's health check.
    assert after["history_id"] == before["history_id"], (before, after)
    assert after["seq"] == n + 1, (before, after)
    # (c) a client that saw up to n - 2 before the upgrade is replayed the rest.
    resume = {"history_id": before["history_id"], "seq": n - 2}
    welcome, frames = structured(pi, {"name": "z", "resume": resume}, want=3)
    assert welcome["history_id"] == before["history_id"]
    assert not [f for f in frames if f.get("type") == "gap"], frames
    replayed = [(f["seq"], f["from"], f["text"]) for f in frames if f.get("type") == "msg"]
    assert replayed == [
        (n - 1, "root@pi", "before the upgrade 2"),
        (n, "root@pi", "before the upgrade 3"),
        (n + 1, "install", "health check"),
    ], frames
    assert all(f.get("replay") is True for f in frames if f.get("type") == "msg"), frames
    # (d) on disk, private to the service's user.
    lines = state_files(pi)
    assert lines[0] == f"picchat picchat 700 {STATE}", lines
    logs = [line for line in lines[1:] if line.split("/")[-1].startswith("history-")]
    assert logs, lines
    assert all(line.startswith("picchat picchat 600 ") for line in logs), lines
    assert all(line.endswith(".log") for line in logs), lines
    # Back to this version, for the test that follows.
    deployed(laptop)


def test_uninstall_keeps_the_history_for_a_reinstall_and_purge_removes_it(laptop):
    pi = laptop.pi
    deployed(laptop)
    pi.run("picchat-send", "--name", "root@pi", "before the uninstall")
    before, _ = structured(pi, {"name": "x"})

    out = deployed(laptop, "--uninstall")
    assert f"kept /etc/picchat (settings, TLS certificate) and {STATE}" in out, out
    state = pi.run("systemctl", "is-active", "picchat-server", check=False).stdout.strip()
    assert state != "active"
    assert pi.run("test", "-e", "/opt/picchat", check=False).returncode != 0
    kept = state_files(pi)
    assert any("/history-" in line for line in kept), kept

    deployed(laptop)
    again, _ = structured(pi, {"name": "y"})
    assert again["history_id"] == before["history_id"], (before, again)
    assert again["seq"] == before["seq"] + 1, (before, again)  # + the health check
    resume = {"history_id": before["history_id"], "seq": before["seq"] - 1}
    _, frames = structured(pi, {"name": "z", "resume": resume}, want=2)
    assert not [f for f in frames if f.get("type") == "gap"], frames
    texts = [f["text"] for f in frames if f.get("type") == "msg"]
    assert texts == ["before the uninstall", "health check"], frames

    out = deployed(laptop, "--uninstall", "--purge")
    assert f"removing {STATE}" in out, out
    assert pi.run("test", "-e", STATE, check=False).returncode != 0
    assert pi.run("id", "picchat", check=False).returncode != 0
    assert pi.run("getent", "group", "picchat", check=False).returncode != 0

    # A fresh history after a purge: another id, and a client resuming the
    # old one is told there may be a gap.
    deployed(laptop)
    fresh, _ = structured(pi, {"name": "x"})
    assert fresh["history_id"] != before["history_id"]
    assert fresh["seq"] == 1  # the health check
    resume = {"history_id": before["history_id"], "seq": before["seq"]}
    _, frames = structured(pi, {"name": "z", "resume": resume}, want=1)
    gaps = [f for f in frames if f.get("type") == "gap"]
    assert [g["reason"] for g in gaps] == ["new_history"], frames


def test_a_target_without_systemd_is_refused_clearly_and_nothing_is_installed(laptop, tmp_path):
    """The ssh sessions of a second key run in a mount namespace of their own
    with a tmpfs over /run/systemd: to install.sh there (and to anything else
    run through that ssh) this machine does not run systemd, while the Pi's
    own systemd goes on."""
    pi = laptop.pi
    deployed(laptop, "--uninstall", "--purge")
    pi.run(
        "sh",
        "-c",
        "cat > /usr/local/sbin/no-systemd && chmod 755 /usr/local/sbin/no-systemd",
        input="#!/bin/sh\n"
        "mount -t tmpfs -o size=1m,mode=0755 no-systemd /run/systemd || exit 1\n"
        'exec sh -c "$SSH_ORIGINAL_COMMAND"\n',
    )
    key = tmp_path / "no_systemd_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    pub = key.with_suffix(".pub").read_text()
    pi.run(
        "sh",
        "-c",
        "cat >> /root/.ssh/authorized_keys",
        input=f'command="unshare --mount /usr/local/sbin/no-systemd" {pub}',
    )
    env = dict(os.environ, PICCHAT_SSH_OPTS=f"-F {laptop.config}")
    proc = subprocess.run(
        ["sh", str(ROOT / "deploy" / "deploy.sh"), "--identity", str(key), "pi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 69, proc.stdout + proc.stderr
    assert "running install.sh on pi\n" in proc.stdout, proc.stdout
    errors = proc.stderr.splitlines()
    assert errors == [
        "picchat: error: this machine does not run systemd (no /run/systemd/system); "
        "picchat-server can still run by hand: picchat-server",
        "deploy: error: install.sh failed on pi (exit 69); see its messages above",
    ], proc.stderr
    for path in ("/opt/picchat", "/etc/picchat", "/usr/local/bin/picchat-server"):
        assert pi.run("test", "-e", path, check=False).returncode != 0, path
    assert pi.run("id", "picchat", check=False).returncode != 0
    # The copy on the Pi was removed (through the same ssh), and the Pi's own
    # systemd was never hidden.
    left = pi.run("sh", "-c", "ls -d /tmp/picchat-deploy.* 2>/dev/null", check=False).stdout
    assert left == "", left
    assert pi.run("test", "-d", "/run/systemd/system", check=False).returncode == 0
