"""deploy/install.sh, as far as it can be tried without a booted systemd.

(The install itself runs on a booted systemd in the end-to-end harness.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "deploy" / "install.sh"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT), *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_scripts_are_shellcheck_clean():
    proc = subprocess.run(
        ["shellcheck", str(SCRIPT), str(ROOT / "deploy" / "deploy.sh"), str(ROOT / ".ci" / "run")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


def test_usage_errors_exit_64():
    proc = run("--bogus")
    assert proc.returncode == 64
    assert "usage:" in proc.stderr
    assert run("--purge").returncode == 64


@pytest.mark.skipif(os.path.isdir("/run/systemd/system"), reason="this machine runs systemd")
def test_without_systemd_it_says_so_and_changes_nothing():
    if os.geteuid() != 0:
        pytest.skip("the script checks for root first; run the tests as root to reach this check")
    proc = run("--dry-run")
    assert proc.returncode == 69
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not run systemd" in lines[0], proc.stderr
    assert not Path("/opt/picchat").exists()


@pytest.mark.skipif(shutil.which("ssh") is None, reason="ssh (openssh-client) is not installed")
def test_deploy_to_a_host_that_does_not_answer_is_explained_in_one_line():
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        proc = subprocess.run(
            ["sh", str(ROOT / "deploy" / "deploy.sh"), "--port", str(port), "root@127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
    assert proc.returncode == 69, proc.stderr
    # One message (ssh's own reason may end in a CR), with the next step.
    assert proc.stderr.count("error") == 1, proc.stderr
    assert "cannot reach root@127.0.0.1 over ssh" in proc.stderr
    assert "Connection refused" in proc.stderr and "sshd enabled?" in proc.stderr
