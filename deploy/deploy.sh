#!/bin/sh
# Put picchat on a Pi and start it, from a laptop: plain ssh and scp, nothing
# to install on either side, no internet needed on the Pi.
#
#   deploy/deploy.sh pi@raspberrypi.local
#   deploy/deploy.sh --user pi --port 22 --identity ~/.ssh/id_ed25519 raspberrypi.local
#   deploy/deploy.sh --dry-run pi@raspberrypi.local
#   deploy/deploy.sh --tls pi@raspberrypi.local     also a self-signed TLS certificate
#                                                   on the Pi (kept if there is one);
#                                                   prints what to pin here
#   deploy/deploy.sh --uninstall [--purge] pi@raspberrypi.local
#
# It packs this checkout, copies it with install.sh to the Pi, and runs
# install.sh there as root (directly, or through sudo for a user such as pi).
# Extra ssh options: PICCHAT_SSH_OPTS (for example a ProxyCommand).
set -eu

usage() {
    echo "usage: $0 [--user USER] [--port SSH_PORT] [--identity KEY] [--dry-run] [--tls] [--uninstall [--purge]] HOST" >&2
    exit 64
}

user=""
port=""
identity=""
host=""
install_args=""
tls=0
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --user) [ $# -ge 2 ] || usage; user=$2; shift ;;
        --port) [ $# -ge 2 ] || usage; port=$2; shift ;;
        --identity) [ $# -ge 2 ] || usage; identity=$2; shift ;;
        --dry-run) install_args="$install_args --dry-run"; dry_run=1 ;;
        --tls) install_args="$install_args --tls"; tls=1 ;;
        --uninstall) install_args="$install_args --uninstall" ;;
        --purge) install_args="$install_args --purge" ;;
        -h|--help) usage ;;
        -*) echo "deploy.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$host" ] || usage; host=$1 ;;
    esac
    shift
done
[ -n "$host" ] || usage
case "$host" in
    *@*) [ -n "$user" ] || user=${host%%@*}; host=${host#*@} ;;
esac
target=$host
[ -z "$user" ] || target="$user@$host"

step() { echo "deploy: $*"; }
fail() { echo "deploy: error: $1" >&2; exit "${2:-1}"; }

# ssh and scp with the same options. PICCHAT_SSH_OPTS is split on spaces on
# purpose (each word one option); quote-free values only.
set -- -o BatchMode=yes -o ConnectTimeout=10
[ -z "$port" ] || set -- "$@" -o "Port=$port"
[ -z "$identity" ] || set -- "$@" -o "IdentityFile=$identity" -o IdentitiesOnly=yes
# shellcheck disable=SC2086
[ -z "${PICCHAT_SSH_OPTS:-}" ] || set -- "$@" ${PICCHAT_SSH_OPTS}

src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- 1. reach the Pi ------------------------------------------------------------

step "checking ssh to $target"
if ! out=$(ssh "$@" "$target" 'echo ok' 2>&1); then
    case "$out" in
        *"Permission denied"*)
            fail "$target refused our ssh key; copy it there first: ssh-copy-id $target" 77 ;;
        *"Could not resolve"*|*"Name or service not known"*)
            fail "cannot find $host; check the name (is the Pi on this network? try its IP address)" 68 ;;
        *)
            fail "cannot reach $target over ssh ($(echo "$out" | tail -n 1)); is the Pi on and sshd enabled?" 69 ;;
    esac
fi

step "checking root or sudo on $target"
how=$(ssh "$@" "$target" 'if [ "$(id -u)" -eq 0 ]; then echo root; elif sudo -n true 2>/dev/null; then echo sudo; else echo none; fi')
case "$how" in
    root) sudo="" ;;
    sudo) sudo="sudo -n" ;;
    *) fail "$target can only run sudo with a password; allow it without one (on the Pi: echo '$user ALL=(ALL) NOPASSWD:ALL' | sudo tee /etc/sudoers.d/010_$user-nopasswd) or deploy as root" 77 ;;
esac

# ---- 2. pack the checkout -----------------------------------------------------------

step "packing $src"
(cd "$src" && tar -cf "$work/picchat.tar" --exclude='__pycache__' \
    picchat deploy systemd pyproject.toml README.md)

# ---- 3. copy it and run install.sh ----------------------------------------------------

step "copying to $target"
rdir=$(ssh "$@" "$target" 'mktemp -d /tmp/picchat-deploy.XXXXXX')
scp -q "$@" "$work/picchat.tar" "$target:$rdir/picchat.tar"

step "running install.sh$install_args on $target"
# Its output is shown as it comes, and kept (for the TLS fingerprint).
# Expanded here on purpose: the remote command is built from our own values.
# shellcheck disable=SC2029
{ ssh "$@" "$target" "cd $rdir && tar -xf picchat.tar && $sudo sh deploy/install.sh$install_args" ||
    echo $? >"$work/status"; } | tee "$work/install.out"
status=$(cat "$work/status" 2>/dev/null || echo 0)
# shellcheck disable=SC2029
ssh "$@" "$target" "rm -rf $rdir" || true
[ "$status" -eq 0 ] || fail "install.sh failed on $target (exit $status); see its messages above" "$status"
if [ "$tls" -eq 1 ] && [ "$dry_run" -eq 0 ]; then
    # install.sh names the Pi as it knows itself; here it is $host.
    pin=$(sed -n 's/^picchat: clients pin it with: picchat-client --host [^ ]* //p' "$work/install.out" | tail -n 1)
    if [ -n "$pin" ]; then
        step "from this machine: picchat-client --host $host $pin"
    else
        echo "deploy: warning: install.sh printed no TLS fingerprint; on the Pi: picchat-server --config /etc/picchat/picchat.toml --print-fingerprint" >&2
    fi
fi
step "done"
