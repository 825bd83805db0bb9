"""deploy/deploy.sh over real ssh to a stand-in Pi with no network but loopback.

The Pi boots with --private-network; ssh reaches its sshd through a
ProxyCommand that enters its network namespace (nsenter ... socat), so the
deploy proves the Pi needs no internet. Run with `make system`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pi import Pi, require

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy" / "deploy.sh"

require()

pytestmark = pytest.mark.timeout(600)


class Laptop:
    """The laptop side: a key, an ssh config reaching the Pi, deploy.sh."""

    def __init__(self, pi: Pi, home: Path) -> None:
        self.pi = pi
        self.key = home / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        self.config = home / "ssh_config"
        self.config.write_text(
            "Host pi\n"
            "  HostName pi\n"
            "  User root\n"
            f"  ProxyCommand nsenter -t {pi.leader} -n socat STDIO TCP:127.0.0.1:22\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
        )
        self.authorize("root", "/root")

    def authorize(self, user: str, home: str) -> None:
        pub = self.key.with_suffix(".pub").read_text()
        self.pi.run(
            "sh",
            "-c",
            f"mkdir -p {home}/.ssh && cat > {home}/.ssh/authorized_keys && "
            f"chown -R {user}: {home}/.ssh && chmod 700 {home}/.ssh",
            input=pub,
        )

    def deploy(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PICCHAT_SSH_OPTS=f"-F {self.config}")
        return subprocess.run(
            ["sh", str(DEPLOY), "--identity", str(self.key), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def laptop(tmp_path_factory) -> Iterator[Laptop]:
    with Pi("picchat-deploy-test") as pi:
        pi.run("systemctl", "start", "ssh")
        yield Laptop(pi, tmp_path_factory.mktemp("laptop"))


def main_pid(pi: Pi) -> str:
    return pi.run("systemctl", "show", "-p", "MainPID", "--value", "picchat-server").stdout


def test_deploy_as_root_then_again_changes_nothing(laptop):
    first = laptop.deploy("pi")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installed and running" in first.stdout, first.stdout
    state = laptop.pi.run("systemctl", "is-active", "picchat-server").stdout.strip()
    assert state == "active"
    pid = main_pid(laptop.pi)
    files = ["/opt/picchat/bin/picchat-server", "/etc/systemd/system/picchat-server.service"]
    hub_py = "ls /opt/picchat/lib/*/site-packages/picchat/hub.py"
    files.append(laptop.pi.run("sh", "-c", hub_py).stdout.strip())
    before = [laptop.pi.run("stat", "-c", "%Y", f).stdout for f in files]
    second = laptop.deploy("pi")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing changed" in second.stdout, second.stdout
    assert main_pid(laptop.pi) == pid
    assert [laptop.pi.run("stat", "-c", "%Y", f).stdout for f in files] == before


def test_start_stop_restart_and_the_journal(laptop):
    import json
    import time

    pi = laptop.pi
    pi.run("systemctl", "stop", "picchat-server")
    state = pi.run("systemctl", "is-active", "picchat-server", check=False).stdout.strip()
    assert state == "inactive"
    pi.run("systemctl", "start", "picchat-server")
    pi.run("systemctl", "restart", "picchat-server")
    assert pi.run("systemctl", "is-active", "picchat-server").stdout.strip() == "active"
    client = HostClient(pi, "journaled")
    try:
        client.wait_for("Connected to the server!")
        pi.run("picchat-send", "--name", "root@pi", "for the journal")
        client.wait_for("root@pi: for the journal")
    finally:
        client.close()
    deadline = time.monotonic() + 15
    while True:
        out = pi.run(
            "journalctl", "-u", "picchat-server", "-o", "json", "--no-pager", check=False
        ).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        messages = [e.get("MESSAGE", "") for e in entries]
        joined = any("journaled connected from" in m for m in messages)
        chat = [e for e in entries if e.get("PICCHAT_SENDER") == "root@pi"]
        if joined and chat:
            break
        assert time.monotonic() < deadline, messages[-20:]
        time.sleep(0.2)
    assert any("Server is running and waiting for connections" in m for m in messages)
    assert chat[-1]["MESSAGE"] == "root@pi: for the journal"
    assert chat[-1]["PICCHAT_ORIGIN"] == "unix" and chat[-1]["PICCHAT_SEQ"].isdigit()


class HostClient:
    """picchat-client running on the host, inside the Pi's network namespace
    (so it reaches the Pi's 127.0.0.1:1234, or what ``options`` say), stdin a
    pipe: lines in, lines out."""

    def __init__(self, pi: Pi, name: str, *options: str) -> None:
        import sys
        import threading

        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                "nsenter",
                "-t",
                str(pi.leader),
                "-n",
                sys.executable,
                "-m",
                "picchat.client",
                *(options or ("--port", "1234")),
                "--name",
                name,
                "--retry",
                "0.5",
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 20) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in {self.lines}"
            time.sleep(0.05)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_a_host_client_chats_with_picchat_send_inside(laptop):
    client = HostClient(laptop.pi, "laptop")
    try:
        client.wait_for("Connected to the server!")
        laptop.pi.run("picchat-send", "--name", "root@pi", "hello laptop")
        client.wait_for("root@pi: hello laptop")
    finally:
        client.close()


def test_a_killed_daemon_is_restarted_and_the_client_comes_back(laptop):
    pi = laptop.pi
    client = HostClient(pi, "watcher")
    try:
        client.wait_for("Connected to the server!")
        pid = main_pid(pi).strip()
        pi.run("kill", "-9", pid)
        client.wait_for("Connection lost")
        client.wait_for("Reconnected", timeout=20)  # RestartSec=5, then the client's retry
        assert main_pid(pi).strip() != pid
        pi.run("picchat-send", "--name", "root@pi", "after the crash")
        client.wait_for("root@pi: after the crash")
    finally:
        client.close()


def test_an_upgrade_restarts_once_and_a_connected_client_misses_nothing(laptop, tmp_path):
    import shutil

    newer = tmp_path / "newer"
    shutil.copytree(ROOT, newer, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
    init = newer / "picchat" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.'))
    pi = laptop.pi
    client = HostClient(pi, "upgrader")
    try:
        client.wait_for("Connected to the server!")
        pid = main_pid(pi).strip()
        env = dict(os.environ, PICCHAT_SSH_OPTS=f"-F {laptop.config}")
        proc = subprocess.run(
            ["sh", str(newer / "deploy" / "deploy.sh"), "--identity", str(laptop.key), "pi"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("restarting picchat-server") == 1, proc.stdout
        assert main_pid(pi).strip() != pid
        client.wait_for("Reconnected")
        pi.run("picchat-send", "--name", "root@pi", "after the upgrade")
        client.wait_for("root@pi: after the upgrade")
        assert client.count("root@pi: after the upgrade") == 1
    finally:
        client.close()
    # Back to this version for the tests that follow.
    again = laptop.deploy("pi")
    assert again.returncode == 0, again.stdout + again.stderr


def test_dry_run_changes_nothing(laptop):
    pid = main_pid(laptop.pi)
    proc = laptop.deploy("--dry-run", "pi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert main_pid(laptop.pi) == pid


def test_deploy_tls_shows_the_fingerprint_here_and_a_client_pinned_to_it_chats(laptop):
    import base64
    import re

    pi = laptop.pi
    proc = laptop.deploy("--tls", "pi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pin = re.findall(
        r"^deploy: from this machine: picchat-client --host pi --tls --fingerprint (SHA256:\S+)$",
        proc.stdout,
        re.M,
    )
    assert len(pin) == 1, proc.stdout
    out = pi.run(
        "openssl", "x509", "-in", "/etc/picchat/tls/cert.pem", "-noout", "-fingerprint", "-sha256"
    ).stdout
    digest = bytes.fromhex(out.strip().split("=", 1)[1].replace(":", ""))
    assert pin[0] == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    # The TLS listener is on the Pi's 127.0.0.1 (as host is): reached from its namespace.
    client = HostClient(pi, "pinned", "--tls", "--fingerprint", pin[0])
    try:
        client.wait_for("Connected to the server!")
        pi.run("picchat-send", "--name", "root@pi", "over TLS")
        client.wait_for("root@pi: over TLS")
    finally:
        client.close()
    # Again: the same certificate, untouched. (Not "nothing changed": this
    # deploys the working tree, which may have changed meanwhile.)
    pair = ["/etc/picchat/tls/cert.pem", "/etc/picchat/tls/key.pem"]
    before = [pi.run("stat", "-c", "%Y %i", f).stdout for f in pair]
    again = laptop.deploy("--tls", "pi")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keeping the TLS certificate" in again.stdout, again.stdout
    assert [pi.run("stat", "-c", "%Y %i", f).stdout for f in pair] == before
    assert f"from this machine: picchat-client --host pi --tls --fingerprint {pin[0]}\n" in (
        again.stdout
    )
    # A dry run says what it would do and shows no fingerprint to pin.
    dry = laptop.deploy("--dry-run", "--tls", "pi")
    assert dry.returncode == 0 and "from this machine" not in dry.stdout, dry.stdout


def test_deploy_as_a_sudo_user(laptop):
    pi = laptop.pi
    pi.run("useradd", "--create-home", "--shell", "/bin/bash", "pi")
    pi.run("sh", "-c", "echo 'pi ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/010_pi-nopasswd")
    laptop.authorize("pi", "/home/pi")
    proc = laptop.deploy("--user", "pi", "pi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checking root or sudo" in proc.stdout


def test_a_sudo_that_wants_a_password_is_explained(laptop):
    pi = laptop.pi
    pi.run("useradd", "--create-home", "--shell", "/bin/bash", "ann")
    laptop.authorize("ann", "/home/ann")
    proc = laptop.deploy("ann@pi")
    assert proc.returncode == 77
    assert "NOPASSWD" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_refused_key_is_explained(laptop, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    env = dict(os.environ, PICCHAT_SSH_OPTS=f"-F {laptop.config}")
    proc = subprocess.run(
        ["sh", str(DEPLOY), "--identity", str(other), "nobody@pi"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 77, proc.stderr
    assert "ssh-copy-id" in proc.stderr


def test_a_full_disk_is_explained_and_nothing_is_left_running(laptop):
    pi = laptop.pi
    laptop.deploy("--uninstall", "pi")
    pi.run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/opt")
    try:
        proc = laptop.deploy("pi")
    finally:
        pi.run("umount", "/opt")
    assert proc.returncode == 73, proc.stdout + proc.stderr
    assert "not enough disk space" in proc.stderr
    assert proc.stderr.count("picchat: error") == 1, proc.stderr
    state = pi.run("systemctl", "is-active", "picchat-server", check=False).stdout.strip()
    assert state != "active"


def test_an_old_python_is_explained(laptop):
    pi = laptop.pi
    pi.run(
        "sh",
        "-c",
        "printf '#!/bin/sh\\ncase \"$*\" in -V) echo Python 3.9.2;; *) exit 1;; esac\\n'"
        " > /usr/local/bin/python3 && chmod +x /usr/local/bin/python3",
    )
    try:
        proc = laptop.deploy("pi")
    finally:
        pi.run("rm", "-f", "/usr/local/bin/python3")
    assert proc.returncode == 69, proc.stdout + proc.stderr
    assert "Python 3.11 or newer is needed, this is Python 3.9.2" in proc.stderr, proc.stderr


def test_uninstall_then_purge(laptop):
    proc = laptop.deploy("--uninstall", "pi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pi = laptop.pi
    assert pi.run("test", "-f", "/etc/picchat/picchat.toml", check=False).returncode == 0
    proc = laptop.deploy("--uninstall", "--purge", "pi")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for path in ("/etc/picchat", "/opt/picchat", "/etc/systemd/system/picchat-server.service"):
        assert pi.run("test", "-e", path, check=False).returncode != 0, path
    assert pi.run("id", "picchat", check=False).returncode != 0
