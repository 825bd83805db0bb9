"""The systemd units pass systemd's own checks: verify, and the security score.

systemd-analyze reads the unit files the way systemd will; `security` rates
the service's sandboxing (0 = locked down, 10 = exposed). The target is
<= 2.5 with Debian bookworm's systemd (v252).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units, with ExecStart pointing at a program that exists here
    (verify checks that the executable is there)."""
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/picchat/bin/picchat-server", shutil.which("true"))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_units_exist():
    names = sorted(p.name for p in UNITS.iterdir())
    assert "picchat-server.service" in names
    assert {"picchat-server-tcp.socket", "picchat-server-local.socket"} <= set(names)


@pytest.mark.parametrize("unit", sorted(p.name for p in UNITS.iterdir()))
def test_systemd_analyze_verify(unit_dir, unit):
    proc = subprocess.run(
        [ANALYZE, "verify", str(unit_dir / unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_security_exposure_is_at_most_2_5(unit_dir):
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(unit_dir / "picchat-server.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.5, proc.stdout


def test_service_essentials():
    text = (UNITS / "picchat-server.service").read_text()
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "RestartSec=5",
        "RestartPreventExitStatus=78",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=picchat",
        "SupplementaryGroups=dialout",
        "RuntimeDirectory=picchat",
        "StateDirectory=picchat",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
    ]:
        assert line in text.splitlines(), line
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if line.startswith(("PrivateDevices=", "ProtectProc="))]
    nofile = int(re.search(r"^LimitNOFILE=(\d+)$", text, re.M).group(1))
    assert nofile >= 10_000 + 100
