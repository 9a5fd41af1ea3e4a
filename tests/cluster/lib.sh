# Shell helpers shared by tests/up.sh and tests/test.sh (sourced, not run). Expects the repo root as cwd.

# Make a Go toolchain installed in a usual place visible even when PATH lacks it (CI's environment is minimal).
ensure_go_on_path() {
  if ! command -v go >/dev/null 2>&1; then
    for dir in /usr/local/go/bin "$HOME/go/bin" "$HOME/.local/go/bin" /usr/lib/go/bin; do
      if [ -x "$dir/go" ]; then
        export PATH="$dir:$PATH"
        return 0
      fi
    done
  fi
}

# Create .venv (Python 3.11) and install the project with every extra; skip pip when pyproject.toml is unchanged
# since the last successful install (the stamp holds its hash).
ensure_venv() {
  local python="${TELECHAT_PYTHON:-python3.11}"
  local stamp=.venv/.telechat-install-stamp
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found on PATH (needed to create .venv)" >&2
    return 1
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "venv: creating .venv with $python" >&2
    "$python" -m venv .venv
  fi
  local wanted
  wanted="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    echo "venv: .venv is up to date with pyproject.toml" >&2
    return 0
  fi
  echo "venv: installing the project into .venv (pip install -e '.[model,serve,dev]')" >&2
  local started=$SECONDS
  .venv/bin/python -m pip install --disable-pip-version-check --quiet -e '.[model,serve,dev]'
  echo "$wanted" >"$stamp"
  echo "venv: installed in $((SECONDS - started))s" >&2
}

# Install the Debian packages the real-node mode needs (containerd, runc, CNI plugins, iptables, busybox for its
# test image), only those missing; `apt-get update` once, first. Needs root (the real nodes need it anyway).
REAL_NODE_DEBIAN_PACKAGES="containerd runc containernetworking-plugins iptables iproute2 busybox-static"
ensure_debian_packages() {
  local missing=() package
  for package in $REAL_NODE_DEBIAN_PACKAGES "$@"; do
    dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed ||
      missing+=("$package")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: Debian packages missing for the real nodes: ${missing[*]} (install them as root)" >&2
    return 1
  fi
  echo "apt: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
