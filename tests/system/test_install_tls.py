"""install.sh --tls on a booted systemd (a stand-in Pi in nspawn): a
self-signed certificate made once, never replaced, and its fingerprint printed.

Run with `make system` (or `-k tls`). The tests run in order on one Pi: the
checks that need a fresh machine come first.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from .pi import Pi, require

ROOT = Path(__file__).parents[2]
NAME = "picchat-tls-test"  # the container's host name, so the certificate's CN
TLS = "/etc/picchat/tls"

require()

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def pi() -> Iterator[Pi]:
    with Pi(NAME, {str(ROOT): "/src"}) as booted:
        yield booted


def install(pi: Pi, *args: str, check: bool = True):
    return pi.run("sh", "/src/deploy/install.sh", *args, check=check, timeout=180)


def printed_fingerprint(out: str) -> str:
    found = re.findall(rf"TLS certificate {TLS}/cert.pem, fingerprint (SHA256:\S+)", out)
    assert len(found) == 1, out
    pin = re.findall(r"pin it with: picchat-client --host \S+ --tls --fingerprint (\S+)", out)
    assert pin == found, out
    return found[0]


def openssl_fingerprint(pi: Pi, cert: str = f"{TLS}/cert.pem") -> str:
    """`openssl x509 -fingerprint -sha256` (hex), in picchat's SHA256:<base64> notation."""
    out = pi.run("openssl", "x509", "-in", cert, "-noout", "-fingerprint", "-sha256").stdout
    digest = bytes.fromhex(out.strip().split("=", 1)[1].replace(":", ""))
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def served_fingerprint(pi: Pi) -> str:
    """The fingerprint of the certificate the running service presents on 127.0.0.1:1235."""
    script = (
        "import base64, hashlib, ssl\n"
        "pem = ssl.get_server_certificate(('127.0.0.1', 1235), timeout=10)\n"
        "digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()\n"
        "print('SHA256:' + base64.b64encode(digest).decode().rstrip('='))\n"
    )
    return pi.run("python3", "-c", script).stdout.strip()


def stat(pi: Pi, path: str, fmt: str = "%U:%G %a") -> str:
    return pi.run("stat", "-c", fmt, path).stdout.strip()


def exists(pi: Pi, path: str) -> bool:
    return pi.run("test", "-e", path, check=False).returncode == 0


def main_pid(pi: Pi) -> str:
    return pi.run("systemctl", "show", "-p", "MainPID", "--value", "picchat-server").stdout


# ---- on the fresh machine ------------------------------------------------------------


def test_dry_run_shows_the_certificate_it_would_make_and_changes_nothing(pi):
    proc = install(pi, "--dry-run", "--tls")
    assert f"would run: install -d -o root -g picchat -m 0750 {TLS}" in proc.stdout, proc.stdout
    assert "would run: openssl req -x509 -newkey ec" in proc.stdout, proc.stdout
    assert f"making a self-signed TLS certificate for {NAME}" in proc.stdout, proc.stdout
    assert "TLS on port 1235" in proc.stdout, proc.stdout
    for path in ("/etc/picchat", "/opt/picchat"):
        assert not exists(pi, path), path


def test_without_openssl_it_says_so_in_one_line_and_installs_nothing(pi):
    pi.run("mv", "/usr/bin/openssl", "/usr/bin/openssl.hidden")
    try:
        proc = install(pi, "--tls", check=False)
    finally:
        pi.run("mv", "/usr/bin/openssl.hidden", "/usr/bin/openssl")
    assert proc.returncode == 69, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sudo apt install openssl" in lines[0], proc.stderr
    for path in ("/etc/picchat", "/opt/picchat", "/etc/systemd/system/picchat-server.service"):
        assert not exists(pi, path), path
    assert pi.run("id", "picchat", check=False).returncode != 0


def test_tls_does_not_go_with_uninstall(pi):
    proc = install(pi, "--uninstall", "--tls", check=False)
    assert proc.returncode == 64 and "--tls does not go with --uninstall" in proc.stderr


# ---- installed with --tls ------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(pi: Pi) -> str:
    return install(pi, "--tls").stdout


def test_install_makes_the_pair_with_the_right_owners_and_modes(pi, installed):
    assert "installed and running" in installed, installed
    assert stat(pi, TLS) == "root:picchat 750"
    assert stat(pi, f"{TLS}/key.pem") == "picchat:picchat 600"
    assert stat(pi, f"{TLS}/cert.pem") == "root:root 644"
    assert sorted(pi.run("ls", "-A", TLS).stdout.split()) == ["cert.pem", "key.pem"]
    text = pi.run("openssl", "x509", "-in", f"{TLS}/cert.pem", "-noout", "-text").stdout
    assert f"Subject: CN = {NAME}" in text, text
    assert f"DNS:{NAME}, DNS:{NAME}.local" in text, text
    assert "NIST CURVE: P-256" in text, text
    assert f"Issuer: CN = {NAME}" in text, text  # self-signed
    # Valid for 10 years: still in 9.9 years, no longer in 10 years and a week.
    year = 365 * 24 * 3600
    end = ["openssl", "x509", "-in", f"{TLS}/cert.pem", "-noout", "-checkend"]
    assert pi.run(*end, str(int(9.9 * year)), check=False).returncode == 0
    assert pi.run(*end, str(10 * year + 7 * 24 * 3600), check=False).returncode != 0
    # The key is the certificate's.
    key_pub = pi.run("openssl", "pkey", "-in", f"{TLS}/key.pem", "-pubout").stdout
    cert_pub = pi.run("openssl", "x509", "-in", f"{TLS}/cert.pem", "-noout", "-pubkey").stdout
    assert key_pub == cert_pub


def test_the_untouched_example_settings_get_tls_switched_on(pi, installed):
    conf = pi.run("cat", "/etc/picchat/picchat.toml").stdout
    assert re.search(r"^tls-port = 1235$", conf, re.M), conf
    assert re.search(rf'^tls-cert = "{TLS}/cert.pem"$', conf, re.M), conf
    assert re.search(rf'^tls-key = "{TLS}/key.pem"$', conf, re.M), conf
    example = (ROOT / "deploy" / "picchat.toml").read_text().splitlines()
    # Otherwise the example, line for line.
    assert len(conf.splitlines()) == len(example)
    assert "this machine only" in installed, installed  # tls-host: as host, 127.0.0.1


def test_the_printed_fingerprint_is_openssls_and_the_one_served(pi, installed):
    fp = printed_fingerprint(installed)
    assert fp == openssl_fingerprint(pi)
    assert served_fingerprint(pi) == fp
    # The same as picchat-server --print-fingerprint says with the installed settings.
    out = pi.run(
        "picchat-server", "--config", "/etc/picchat/picchat.toml", "--print-fingerprint"
    ).stdout
    assert out.strip() == fp


def test_a_second_run_keeps_the_certificate_and_changes_nothing(pi, installed):
    files = [f"{TLS}/cert.pem", f"{TLS}/key.pem", "/etc/picchat/picchat.toml"]
    before = [stat(pi, f, "%Y %i") for f in files]
    pid = main_pid(pi)
    out = install(pi, "--tls").stdout
    assert "nothing changed" in out, out
    assert "keeping the TLS certificate" in out, out
    assert printed_fingerprint(out) == printed_fingerprint(installed)
    assert [stat(pi, f, "%Y %i") for f in files] == before
    assert main_pid(pi) == pid
    # And without --tls the TLS settings and files stay as they are.
    out = install(pi).stdout
    assert "nothing changed" in out and "fingerprint" not in out, out
    assert [stat(pi, f, "%Y %i") for f in files] == before


def test_an_existing_certificate_is_never_overwritten(pi, installed):
    # The owner's own pair (RSA, another name) in place of the generated one.
    pi.run(
        "sh",
        "-c",
        f"cd {TLS} && rm -f cert.pem key.pem && umask 077 && "
        "openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=mine "
        "-keyout key.pem -out cert.pem 2>/dev/null && "
        "chown picchat:picchat key.pem && chmod 644 cert.pem",
    )
    sums = pi.run("sh", "-c", f"sha256sum {TLS}/*").stdout
    out = install(pi, "--tls").stdout
    assert "keeping the TLS certificate" in out, out
    assert pi.run("sh", "-c", f"sha256sum {TLS}/*").stdout == sums
    mine = openssl_fingerprint(pi)
    assert printed_fingerprint(out) == mine
    # A changed certificate needs a restart to be served (install.sh changed nothing).
    pi.run("systemctl", "restart", "picchat-server")
    assert served_fingerprint(pi) == mine


def test_half_a_pair_is_refused_and_left_alone(pi, installed):
    pi.run("mv", f"{TLS}/key.pem", "/root/key.pem")
    try:
        sums = pi.run("sha256sum", f"{TLS}/cert.pem").stdout
        proc = install(pi, "--tls", check=False)
        assert proc.returncode == 78, proc.stdout + proc.stderr
        assert "key.pem" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert pi.run("sha256sum", f"{TLS}/cert.pem").stdout == sums
        assert not exists(pi, f"{TLS}/key.pem")
    finally:
        pi.run("mv", "/root/key.pem", f"{TLS}/key.pem")


def test_a_key_the_service_cannot_use_is_pointed_out(pi, installed):
    pi.run("chmod", "640", f"{TLS}/key.pem")
    try:
        out = install(pi, "--tls").stdout
        assert f"warning: {TLS}/key.pem is picchat mode 640" in out, out
        assert f"chmod 600 {TLS}/key.pem" in out, out
        assert stat(pi, f"{TLS}/key.pem") == "picchat:picchat 640"  # told, not changed
    finally:
        pi.run("chmod", "600", f"{TLS}/key.pem")


def test_edited_settings_are_left_alone_and_the_lines_to_add_are_printed(pi, installed):
    conf = "/etc/picchat/picchat.toml"
    pi.run("cp", conf, "/root/picchat.toml.tls")
    edited = 'log-level = "debug"\ntls-port = 1235\n'
    pi.run("sh", "-c", f"cat > {conf}", input=edited)
    try:
        out = install(pi, "--tls").stdout
        assert pi.run("cat", conf).stdout == edited
        assert "has your own edits, so it is left as it is" in out, out
        assert f'    tls-cert = "{TLS}/cert.pem"\n    tls-key = "{TLS}/key.pem"\n' in out, out
        assert "    tls-port" not in out, out  # it has that one already
        assert printed_fingerprint(out) == openssl_fingerprint(pi)
        dry = install(pi, "--dry-run", "--tls").stdout
        assert f'    tls-key = "{TLS}/key.pem"\n' in dry, dry
    finally:
        pi.run("cp", "/root/picchat.toml.tls", conf)


def test_the_documented_way_to_serve_tls_to_other_machines_works(pi, installed):
    """docs/operations.md: a token, tls-host = "0.0.0.0", a restart."""
    conf = "/etc/picchat/picchat.toml"
    pi.run("cp", conf, "/root/picchat.toml.tls")
    try:
        pi.run(
            "sh",
            "-c",
            "umask 077; openssl rand -hex 24 > /etc/picchat/token; "
            "chown picchat:picchat /etc/picchat/token",
        )
        added = 'tls-host = "0.0.0.0"\ntoken-file = "/etc/picchat/token"\n'
        pi.run("sh", "-c", f"cat >> {conf}", input=added)
        pi.run("systemctl", "restart", "picchat-server")
        assert pi.run("systemctl", "is-active", "picchat-server").stdout.strip() == "active"
        log = pi.run("journalctl", "-u", "picchat-server", "-o", "cat", "--no-pager").stdout
        assert "0.0.0.0:1235 (TLS)" in log, log[-2000:]
        assert served_fingerprint(pi) == openssl_fingerprint(pi)
    finally:
        pi.run("cp", "/root/picchat.toml.tls", conf)
        pi.run("rm", "-f", "/etc/picchat/token")
        pi.run("systemctl", "restart", "picchat-server")


def test_uninstall_keeps_the_certificate_and_purge_removes_it(pi, installed):
    fp = openssl_fingerprint(pi)
    out = install(pi, "--uninstall").stdout
    assert "TLS certificate" in out, out
    assert not exists(pi, "/opt/picchat")
    assert stat(pi, f"{TLS}/key.pem") == "picchat:picchat 600"
    assert openssl_fingerprint(pi) == fp
    # Installed again, it is the same certificate.
    assert printed_fingerprint(install(pi, "--tls").stdout) == fp
    install(pi, "--uninstall", "--purge")
    assert not exists(pi, "/etc/picchat")
