"""A stand-in Raspberry Pi: Debian bookworm booted with systemd as PID 1 in
systemd-nspawn, for tests of the units, install.sh and journald.

- The root file system is built once with debootstrap and cached under
  /var/cache/picchat-e2e/, keyed by its package list; each boot uses it
  read-only with a throw-away overlay (--volatile=overlay).
- The container gets its own network namespace (--private-network): only its
  loopback, which proves nothing needs the internet.
- nspawn runs in a cgroup of its own (the host's PID 1 is not systemd), with
  --register=no --keep-unit, headless (--console=read-only).
- Commands run inside through nsenter into the container's PID 1 namespaces.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

CACHE = Path("/var/cache/picchat-e2e")
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "python3-serial",
    "iproute2",
    "sudo",
    "passwd",
    "procps",  # /bin/kill for ExecReload=, as on Raspberry Pi OS
    "openssh-server",
    "openssl",  # install.sh --tls makes a self-signed certificate with it
    "tar",
]
SUITE = "bookworm"


class PiError(Exception):
    pass


def missing_tools() -> list[str]:
    return [t for t in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(t) is None]


def why_not() -> str | None:
    """Why the stand-in Pi cannot run here, in a line; None if it can."""
    if os.geteuid() != 0:
        return "booting a stand-in Pi needs root"
    if missing_tools():
        return (
            f"booting a stand-in Pi needs {', '.join(missing_tools())}: "
            "apt install debootstrap systemd-container"
        )
    if not (CACHE.exists() and any(CACHE.glob("rootfs-*/.complete"))):
        try:
            debian_mirror()
        except PiError as exc:
            return f"cannot build the stand-in Pi: {exc}"
    return None


def require() -> None:
    """For system test modules: skip (with the reason) where the Pi cannot
    run, unless this is CI, where a skipped system test would hide a gap."""
    import pytest

    if os.environ.get("PICCHAT_SYSTEM_TESTS") != "1":
        pytest.skip(
            "system tests boot Debian in systemd-nspawn: run them with `make system`",
            allow_module_level=True,
        )
    reason = why_not()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (under CI a system test may not be skipped)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def debian_mirror() -> str:
    """The Debian mirror this machine's own apt sources name (for bookworm)."""
    files = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for path in files:
        if path.suffix not in (".list", ".sources"):
            continue  # .disabled and the like
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):  # deb822 .sources
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                if uris.group(1).rstrip("/").endswith("/debian"):
                    return uris.group(1)
        m = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)/?\s+" + SUITE + r"\s", text, re.M)
        if m:
            return m.group(1)
    raise PiError("no Debian bookworm mirror found in /etc/apt/sources.list(.d)")


def rootfs() -> Path:
    """The cached bookworm root file system (built on first use, ~75 s)."""
    key = hashlib.sha256(" ".join([SUITE, *PACKAGES]).encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{key}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    CACHE.mkdir(parents=True, exist_ok=True)
    building = CACHE / f"building-{key}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(building),
            debian_mirror(),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=900,
    )
    (building / "etc/hostname").unlink(missing_ok=True)
    (building / "etc/machine-id").write_text("")
    subprocess.run(["chroot", str(building), "apt-get", "clean"], check=True, timeout=120)
    building.rename(root)
    (root / ".complete").write_text("ok\n")
    for old in CACHE.glob("rootfs-*"):  # built for an older package list
        if old != root:
            shutil.rmtree(old, ignore_errors=True)
    return root


class Pi:
    """One boot of the stand-in Pi. Use as a context manager."""

    def __init__(
        self,
        name: str,
        binds: dict[str, str] | None = None,
        devices: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.binds = binds or {}  # read-only: host path -> path inside
        self.devices = devices or {}  # read-write (a host pty as a serial port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.cgroups = [Path(f"/sys/fs/cgroup/{h}/{name}") for h in ("systemd", "unified")]
        self.console_log = Path(f"/tmp/{name}-console.log")

    def __enter__(self) -> Pi:
        root = rootfs()
        for cg in self.cgroups:
            if cg.parent.is_dir():
                cg.mkdir(exist_ok=True)
        args = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--quiet",
            f"--machine={self.name}",
            f"--directory={root}",
            "--volatile=overlay",
            "--private-network",
            "--console=read-only",
            "--boot",
        ]
        for host, inside in self.binds.items():
            args.append(f"--bind-ro={host}:{inside}")
        for host, inside in self.devices.items():
            args.append(f"--bind={host}:{inside}")
        # Put nspawn in a cgroup of its own, then exec it.
        procs = " ".join(str(cg / "cgroup.procs") for cg in self.cgroups if cg.is_dir())
        script = f'for f in {procs}; do echo $$ > "$f"; done; exec "$@"'
        env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        self.proc = subprocess.Popen(
            ["sh", "-c", script, "sh", *args],
            stdin=subprocess.DEVNULL,
            stdout=self.console_log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_booted()
        except BaseException:
            self._teardown()
            raise
        return self

    def _wait_booted(self, timeout: float = 60) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None:
                raise PiError(f"nspawn exited: {self.console_log.read_text()[-2000:]}")
            out = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
            ).stdout.split()
            if out:
                self.leader = int(out[0])
            elif time.monotonic() > deadline:
                raise PiError("the container's PID 1 did not appear")
            else:
                time.sleep(0.05)
        while True:
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=60)
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise PiError(f"the container did not boot: {state.stdout} {state.stderr}")
            time.sleep(0.2)

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (as root)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise PiError(
                f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def __exit__(self, *exc: object) -> None:
        self._teardown()
        self.check_nothing_left()

    def _teardown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # powers the container off
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._remove_cgroups()

    def check_nothing_left(self) -> None:
        """The harness leaves no mounts, cgroups or processes behind."""
        left = []
        mounts = Path("/proc/mounts").read_text()
        if str(CACHE) in mounts or self.name in mounts:
            left.append("mounts")
        left += [str(cg) for cg in self.cgroups if cg.exists()]
        if self.proc is not None and self.proc.poll() is None:
            left.append(f"nspawn pid {self.proc.pid}")
        if self.leader and Path(f"/proc/{self.leader}").exists():
            left.append(f"container init pid {self.leader}")
        if left:
            raise PiError(f"the stand-in Pi left behind: {', '.join(left)}")

    def _remove_cgroups(self) -> None:
        for cg in self.cgroups:  # nspawn made payload/ and supervisor/ inside: deepest first
            if cg.is_dir():
                for sub in sorted(cg.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
