#!/bin/sh
# Install picchat as a systemd service on this machine (a Raspberry Pi or any
# Debian-like box), from a checkout: no internet needed.
#
#   sudo deploy/install.sh              install or upgrade, enable and start
#   sudo deploy/install.sh --dry-run    say what would change, change nothing
#   sudo deploy/install.sh --uninstall [--purge]
#
# Idempotent: a second run changes nothing (file times and the service's
# MainPID stay) and says so. Uninstalling keeps /etc/picchat and the state
# directory /var/lib/picchat unless --purge.
set -eu

PREFIX=/opt/picchat
CONF_DIR=/etc/picchat
UNIT_DIR=/etc/systemd/system
BIN_DIR=/usr/local/bin
SERVICE=picchat-server.service
USER_NAME=picchat
COMMANDS="picchat-server picchat-send picchat-client"
SRC=$(cd "$(dirname "$0")/.." && pwd)

dry_run=0
uninstall=0
purge=0
changed=0

usage() {
    echo "usage: $0 [--dry-run] [--uninstall [--purge]]" >&2
    exit 64
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown option $1" >&2; usage ;;
    esac
    shift
done
[ "$purge" -eq 0 ] || [ "$uninstall" -eq 1 ] || { echo "install.sh: --purge goes with --uninstall" >&2; exit 64; }

say() { echo "picchat: $*"; }
fail() { echo "picchat: error: $1" >&2; exit "${2:-1}"; }

# Run a command that changes the machine (or only show it with --dry-run).
run() {
    changed=1
    if [ "$dry_run" -eq 1 ]; then
        echo "  would run: $*"
    else
        "$@"
    fi
}

# Put SRC at DEST with MODE unless DEST already has the same bytes.
install_file() {
    src=$1 dest=$2 mode=$3
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        return 1
    fi
    say "installing $dest"
    run install -D -m "$mode" "$src" "$dest"
    return 0
}

# ---- checks ------------------------------------------------------------------

[ "$(id -u)" -eq 0 ] || fail "run me as root: sudo $0" 77
[ -d /run/systemd/system ] || fail "this machine does not run systemd (no /run/systemd/system); picchat-server can still run by hand: picchat-server" 69
command -v python3 >/dev/null 2>&1 || fail "python3 is missing: sudo apt install python3 python3-venv" 69
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "Python 3.11 or newer is needed, this is $(python3 -V 2>&1); Raspberry Pi OS bookworm has it" 69
if [ "$uninstall" -eq 0 ]; then
    # About 1 MiB of code and a venv of a few MiB: ask for 20 MiB to be safe.
    parent=$PREFIX
    while [ ! -d "$parent" ]; do parent=$(dirname "$parent"); done
    free_kib=$(df -Pk "$parent" | awk 'NR == 2 { print $4 }')
    [ "$free_kib" -ge 20480 ] ||
        fail "not enough disk space: $((free_kib / 1024)) MiB free for $PREFIX, picchat needs about 20 MiB; free some (sudo apt clean, old logs) and run me again" 73
fi

# ---- uninstall -------------------------------------------------------------------

if [ "$uninstall" -eq 1 ]; then
    for unit in "$UNIT_DIR"/picchat-server*.service "$UNIT_DIR"/picchat-server*.socket; do
        [ -e "$unit" ] || continue
        name=$(basename "$unit")
        say "stopping and removing $name"
        run systemctl disable --now "$name"
        run rm -f "$unit"
    done
    [ "$changed" -eq 0 ] || run systemctl daemon-reload
    for cmd in $COMMANDS; do
        if [ -L "$BIN_DIR/$cmd" ]; then run rm -f "$BIN_DIR/$cmd"; fi
    done
    if [ -d "$PREFIX" ]; then say "removing $PREFIX"; run rm -rf "$PREFIX"; fi
    if [ "$purge" -eq 1 ]; then
        for dir in "$CONF_DIR" /var/lib/picchat; do
            if [ -e "$dir" ]; then say "removing $dir"; run rm -rf "$dir"; fi
        done
        if id "$USER_NAME" >/dev/null 2>&1; then say "removing user $USER_NAME"; run userdel "$USER_NAME"; fi
    else
        say "kept $CONF_DIR and /var/lib/picchat; --purge removes them"
    fi
    [ "$changed" -eq 1 ] || say "nothing to remove"
    exit 0
fi

# ---- install -------------------------------------------------------------------------

if ! getent group "$USER_NAME" >/dev/null; then
    say "creating group $USER_NAME"
    run groupadd --system "$USER_NAME"
fi
if ! id "$USER_NAME" >/dev/null 2>&1; then
    say "creating user $USER_NAME"
    run useradd --system --gid "$USER_NAME" --groups dialout --home-dir /var/lib/picchat \
        --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
fi

# A venv that also sees Debian's packages (python3-serial for the serial bridge).
if [ ! -x "$PREFIX/bin/python3" ]; then
    say "creating the Python environment in $PREFIX"
    run python3 -m venv --system-site-packages --without-pip "$PREFIX"
fi

# The package itself: plain Python files, copied (no pip, no network).
site=$(python3 -c 'import sys; print(f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages")')
code_changed=0
for file in $(cd "$SRC" && find picchat -name '*.py' | sort); do
    if install_file "$SRC/$file" "$PREFIX/$site/$file" 0644; then code_changed=1; fi
done
# Files of an older version that this one no longer has.
if [ -d "$PREFIX/$site/picchat" ]; then
    for file in $(cd "$PREFIX/$site" && find picchat -name '*.py' | sort); do
        if [ ! -f "$SRC/$file" ]; then
            say "removing $PREFIX/$site/$file"
            run rm -f "$PREFIX/$site/$file"
            code_changed=1
        fi
    done
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for cmd in $COMMANDS; do
    case "$cmd" in
        picchat-server) main=server_main ;;
        picchat-send) main=send_main ;;
        picchat-client) main=client_main ;;
    esac
    printf '#!%s/bin/python3\nfrom picchat.cli import %s\nraise SystemExit(%s())\n' \
        "$PREFIX" "$main" "$main" >"$tmp/$cmd"
    if install_file "$tmp/$cmd" "$PREFIX/bin/$cmd" 0755; then code_changed=1; fi
    if [ "$(readlink "$BIN_DIR/$cmd" 2>/dev/null || true)" != "$PREFIX/bin/$cmd" ]; then
        say "linking $BIN_DIR/$cmd"
        run ln -sf "$PREFIX/bin/$cmd" "$BIN_DIR/$cmd"
    fi
done

# The settings: the example only where there is none yet (never over an edited one).
if [ ! -e "$CONF_DIR/picchat.toml" ]; then
    install_file "$SRC/deploy/picchat.toml" "$CONF_DIR/picchat.toml" 0644 || true
fi

units_changed=0
for unit in "$SRC"/systemd/*; do
    if install_file "$unit" "$UNIT_DIR/$(basename "$unit")" 0644; then units_changed=1; fi
done
[ "$units_changed" -eq 0 ] || run systemctl daemon-reload

if ! systemctl is-enabled --quiet "$SERVICE" 2>/dev/null; then
    say "enabling $SERVICE"
    run systemctl enable "$SERVICE"
fi
if ! systemctl is-active --quiet "$SERVICE" 2>/dev/null; then
    say "starting $SERVICE"
    run systemctl start "$SERVICE"
elif [ "$code_changed" -eq 1 ] || [ "$units_changed" -eq 1 ]; then
    say "restarting $SERVICE for the new version (clients reconnect by themselves)"
    run systemctl restart "$SERVICE"
fi

if [ "$dry_run" -eq 1 ]; then
    [ "$changed" -eq 1 ] || say "nothing would change"
    exit 0
fi

# ---- health check: the service is up and a message goes through ------------------------

i=0
until [ -S /run/picchat/picchat.sock ] && systemctl is-active --quiet "$SERVICE"; do
    i=$((i + 1))
    [ "$i" -le 50 ] || fail "$SERVICE did not come up; see: journalctl -u $SERVICE -n 50" 69
    sleep 0.2
done
"$PREFIX/bin/python3" - <<'EOF' || fail "health check failed: a message did not go through; see: journalctl -u picchat-server -n 50" 69
import socket, subprocess, sys
listener = socket.socket(socket.AF_UNIX)
listener.settimeout(5)
listener.connect("/run/picchat/picchat.sock")
listener.recv(4096)  # the welcome
subprocess.run(["/opt/picchat/bin/picchat-send", "--socket", "/run/picchat/picchat.sock",
                "--name", "install", "health check"], check=True, timeout=10)
data = b""
while b"install: health check" not in data:
    chunk = listener.recv(4096)
    if not chunk:
        sys.exit(1)
    data += chunk
EOF
if [ "$changed" -eq 1 ]; then
    say "installed and running: picchat-send \"hello\" (users in group $USER_NAME), picchat-client"
else
    say "nothing changed; $SERVICE is running and healthy"
fi
