"""install.sh and the service on a booted systemd (a stand-in Pi in nspawn).

Run with `make system` (also run by .ci/run); `make test` skips these, since
they need root, debootstrap and systemd-nspawn and take a minute or two.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pi import Pi, require

ROOT = Path(__file__).parents[2]

require()

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def pi() -> Iterator[Pi]:
    with Pi("picchat-system-test", {str(ROOT): "/src"}) as booted:
        yield booted


@pytest.fixture(scope="module")
def installed(pi: Pi) -> str:
    proc = pi.run("sh", "/src/deploy/install.sh", timeout=180)
    return proc.stdout


def main_pid(pi: Pi) -> int:
    return int(pi.run("systemctl", "show", "-p", "MainPID", "--value", "picchat-server").stdout)


def test_install_starts_a_healthy_service(pi, installed):
    assert "installed and running" in installed, installed
    assert pi.run("systemctl", "is-active", "picchat-server").stdout.strip() == "active"
    assert pi.run("systemctl", "is-enabled", "picchat-server").stdout.strip() == "enabled"
    status = pi.run("systemctl", "status", "--no-pager", "picchat-server", check=False).stdout
    assert re.search(r"Status: \"\d+ clients?, \d+ messages?\"", status), status


def test_a_second_run_changes_nothing(pi, installed):
    pid = main_pid(pi)
    files = ["/opt/picchat/bin/picchat-server", "/etc/systemd/system/picchat-server.service"]
    before = [pi.run("stat", "-c", "%Y", f).stdout for f in files]
    out = pi.run("sh", "/src/deploy/install.sh", timeout=120).stdout
    assert "nothing changed" in out, out
    assert main_pid(pi) == pid
    assert [pi.run("stat", "-c", "%Y", f).stdout for f in files] == before


def test_users_in_group_picchat_can_send_others_are_told_why_not(pi, installed):
    pi.run("useradd", "--create-home", "--groups", "picchat", "alice")
    pi.run("useradd", "--create-home", "bob")
    ok = pi.run("runuser", "-u", "alice", "--", "picchat-send", "hello from alice", check=False)
    assert ok.returncode == 0, ok.stderr
    no = pi.run("runuser", "-u", "bob", "--", "picchat-send", "hello from bob", check=False)
    assert no.returncode == 77, no.stderr
    assert "permission denied" in no.stderr and "group" in no.stderr


def test_the_journal_has_structured_chat_fields_and_priorities(pi, installed):
    pi.run("picchat-send", "--name", "journaltest", "structured")
    deadline = time.monotonic() + 10
    while True:
        out = pi.run(
            "journalctl",
            "-u",
            "picchat-server",
            "PICCHAT_SENDER=journaltest",
            "-o",
            "json",
            "--no-pager",
            check=False,
        ).stdout
        if out.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    entry = json.loads(out.strip().splitlines()[-1])
    assert entry["MESSAGE"] == "journaltest: structured"
    assert entry["PICCHAT_SEQ"].isdigit() and entry["PICCHAT_ORIGIN"] == "unix"
    assert entry["PRIORITY"] == "6"
    # Nothing an operator must act on:
    warnings = pi.run(
        "journalctl", "-u", "picchat-server", "-p", "warning", "-o", "cat", "--no-pager"
    ).stdout
    assert warnings.strip() == "", warnings


def test_reload_keeps_the_process_and_restart_replaces_it(pi, installed):
    pid = main_pid(pi)
    pi.run("systemctl", "reload", "picchat-server")
    assert main_pid(pi) == pid
    log = pi.run("journalctl", "-u", "picchat-server", "-o", "cat", "--no-pager").stdout
    assert "Reloaded" in log
    pi.run("systemctl", "restart", "picchat-server")
    assert main_pid(pi) != pid
    assert pi.run("systemctl", "is-active", "picchat-server").stdout.strip() == "active"


def test_uninstall_keeps_config_and_history(pi, installed):
    pi.run("sh", "/src/deploy/install.sh", "--uninstall", timeout=120)
    assert (
        pi.run("systemctl", "is-active", "picchat-server", check=False).stdout.strip() != "active"
    )
    assert pi.run("test", "-e", "/opt/picchat", check=False).returncode != 0
    assert pi.run("test", "-f", "/etc/picchat/picchat.toml", check=False).returncode == 0
