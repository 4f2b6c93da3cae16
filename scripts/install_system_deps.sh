#!/usr/bin/env bash
# Install the Debian packages the project needs, where apt-get exists; skip what is present.
# Fashion-MNIST comes from Debian's dataset-fashion-mnist (IDX files under
# /usr/share/datasets/fashion-mnist); prometheus runs the dashboard test; chromium and chromium-driver open the HTML report in its test.
set -euo pipefail
PACKAGES=(dataset-fashion-mnist prometheus chromium chromium-driver)
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
    echo "install_system_deps: no apt-get here; install these yourself if you need them: ${PACKAGES[*]}" >&2
    exit 0
fi
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_system_deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
    fi
fi
echo "install_system_deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
