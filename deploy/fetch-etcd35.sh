#!/usr/bin/env bash
# etcd 3.5 for the contract tests, beside Debian 12's 3.4: Debian 13's etcd-server package,
# downloaded with a private apt list (the machine's own apt sources are left alone) and only
# unpacked into /opt/fleet/etcd-3.5; nothing is installed. Its binary needs only libc.
set -euo pipefail
DEST="${FLEET_ETCD35_DIR:-/opt/fleet/etcd-3.5}"
if [[ -x "$DEST/etcd" ]]; then
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$work/lists"
    -o "APT::Get::List-Cleanup=0"
    -o "APT::Sandbox::User=root"
)
apt-get -qq "${apt_opts[@]}" update
(cd "$work" && apt-get -qq "${apt_opts[@]}" download 'etcd-server/trixie')
deb="$(ls "$work"/etcd-server_3.5*_*.deb)"
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$DEST"
install -m 0755 "$work/root/usr/bin/etcd" "$DEST/etcd"
"$DEST/etcd" --version | head -1
