"""The servers the benchmark compares: picchat and its peers, each on a loopback port.

Peers are installed here, by the benchmark itself: ``ncat`` and ``mosquitto``
from Debian packages (apt-get), ``miniircd`` from PyPI into a bench-only venv
(``/var/tmp/picchat-bench-venv``). A peer that cannot be installed is skipped
with a printed reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = Path(os.environ.get("PICCHAT_BENCH_VENV", "/var/tmp/picchat-bench-venv"))
STATE_PARENT = Path(os.environ.get("PICCHAT_BENCH_DIR", "/var/tmp"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _out(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return (p.stdout + p.stderr).strip()


def apt_install(package: str) -> str | None:
    """Install a Debian package; None on success, else the reason."""
    if not shutil.which("apt-get"):
        return "apt-get not found (not Debian?)"
    if os.geteuid() != 0:
        return f"not root: install it with `sudo apt-get install {package}`"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode and cmd[1] == "install":
            return f"apt-get install {package} failed: {p.stderr.strip()[-300:]}"
    return None


@dataclass
class Server:
    """A server configuration: how to install, start and describe it."""

    name: str  # label in the tables
    proto: str  # loadgen wire format
    kind: str  # picchat, ncat, miniircd, mosquitto
    extra: list[str] = field(default_factory=list)  # picchat: settings changed
    state_dir: bool = True  # picchat: --state-dir (durable history, sync=commit)

    # --- installation ---
    def install(self) -> str | None:
        """None when ready, else why this server is skipped."""
        if self.kind == "picchat":
            return None
        if self.kind in ("ncat", "mosquitto"):
            exe = "ncat" if self.kind == "ncat" else "mosquitto"
            if shutil.which(exe) or Path(f"/usr/sbin/{exe}").exists():
                return None
            return apt_install(self.kind)
        if self.kind == "miniircd":
            if (BENCH_VENV / "bin" / "miniircd").exists():
                return None
            try:
                subprocess.run(
                    [sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, timeout=120
                )
                p = subprocess.run(
                    [str(BENCH_VENV / "bin" / "pip"), "install", "-q", "miniircd"],
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
            except (OSError, subprocess.SubprocessError) as e:
                return f"cannot create {BENCH_VENV}: {e}"
            if p.returncode:
                return f"pip install miniircd failed: {p.stderr.strip()[-300:]}"
            return None
        return f"unknown server kind {self.kind}"

    def exe(self) -> str:
        if self.kind == "picchat":
            script = ROOT / ".venv" / "bin" / "picchat-server"
            return str(script) if script.exists() else (shutil.which("picchat-server") or "")
        if self.kind == "mosquitto":
            return shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if self.kind == "miniircd":
            return str(BENCH_VENV / "bin" / "miniircd")
        return shutil.which(self.kind) or self.kind

    def version(self) -> str:
        if self.kind == "picchat":
            return _out([*self.base_cmd(), "--version"]).splitlines()[-1]
        if self.kind == "ncat":
            return _out([self.exe(), "--version"]).splitlines()[0]
        if self.kind == "mosquitto":
            return _out([self.exe(), "-h"]).splitlines()[0]
        return "miniircd " + _out([self.exe(), "--version"]).splitlines()[-1]

    def base_cmd(self) -> list[str]:
        if self.kind == "picchat" and not self.exe():
            return [sys.executable, "-m", "picchat"]
        return [self.exe()]

    # --- the exact configuration ---
    def command(self, port: int | str, workdir: Path) -> list[str]:
        if self.kind == "picchat":
            cmd = [*self.base_cmd(), "--port", str(port), "--socket", "off"]
            if self.state_dir:
                cmd += ["--state-dir", str(workdir / "state")]
            return cmd + self.extra
        if self.kind == "ncat":
            return [self.exe(), "--listen", "--chat", "--max-conns", "1000", "127.0.0.1", str(port)]
        if self.kind == "miniircd":
            cmd = [self.exe(), "--listen", "127.0.0.1", "--ports", str(port)]
            if os.geteuid() == 0:
                cmd += ["--setuid", "nobody:nogroup"]
            return cmd
        conf = workdir / "mosquitto.conf"
        return [self.exe(), "-c", str(conf)]

    def config_text(self, port: int | str) -> str:
        return (
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n"
        )

    def describe(self) -> str:
        cmd = self.command("PORT", Path("DIR"))
        cmd[0] = Path(cmd[0]).name if self.exe() else cmd[0]
        text = " ".join(cmd)
        if self.kind == "mosquitto":
            text += "` with DIR/mosquitto.conf: `" + "; ".join(
                self.config_text("PORT").splitlines()
            )
        return text


class Running:
    """A started server; stop() ends it (by its pid only)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.workdir = Path(tempfile.mkdtemp(prefix="picchat-bench-", dir=STATE_PARENT))
        os.chmod(self.workdir, 0o755)
        self.port = free_port()
        if server.kind == "mosquitto":
            (self.workdir / "mosquitto.conf").write_text(server.config_text(self.port))
        self.log = open(self.workdir / "server.log", "wb")  # noqa: SIM115 -- closed in stop()
        env = dict(os.environ)
        if server.kind == "picchat" and not server.exe():
            env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            server.command(self.port, self.workdir),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            env=env,
            cwd=self.workdir,
        )
        self.pid = self.proc.pid
        self._wait()

    def _wait(self) -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.server.name} exited: {self.text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                time.sleep(0.2)
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.server.name} did not listen on {self.port}")

    def text(self) -> str:
        self.log.flush()
        return (self.workdir / "server.log").read_text("utf-8", "replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


SERVERS = [
    Server("picchat", "plain", "picchat"),
    Server("picchat-rl0", "plain", "picchat", extra=["--rate-limit", "0"]),
    Server(
        "picchat-rl0-interval",
        "plain",
        "picchat",
        extra=["--rate-limit", "0", "--sync", "interval"],
    ),
    Server("picchat-rl0-mem", "plain", "picchat", extra=["--rate-limit", "0"], state_dir=False),
    Server("ncat", "plain", "ncat"),
    Server("miniircd", "irc", "miniircd"),
    Server("mosquitto", "mqtt", "mosquitto"),
]
