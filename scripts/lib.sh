# Shared by scripts/dev and scripts/test: installing what ccm needs on a Debian machine.
# Source it; every function is idempotent and quiet when there is nothing to do.

# Runs a command as root (directly, or through sudo when not root).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt COMMAND PACKAGE...: installs PACKAGEs from Debian unless COMMAND is on the PATH.
ensure_apt() {
  local cmd=$1; shift
  if ! command -v "$cmd" >/dev/null 2>&1; then
    echo "installing $* (for $cmd) from Debian"
    if [ -z "${CCM_APT_UPDATED:-}" ]; then
      as_root apt-get update -qq
      export CCM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
  fi
}

# Rust components used by the test command.
ensure_rust_components() {
  local component
  for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
      rustup component add "$component"
    fi
  done
}

# protoc, needed by etcd-client's build script (ccm-proto uses a vendored one).
ensure_protoc() {
  ensure_apt protoc protobuf-compiler
  export PROTOC=${PROTOC:-$(command -v protoc)}
}

# npm tools pinned in tools/package.json (buf, the OIDC issuer).
ensure_npm_tools() {
  if [ ! -d tools/node_modules ] || [ tools/package-lock.json -nt tools/node_modules/.package-lock.json ]; then
    (cd tools && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

# The moto server (EC2/S3 emulator) in a virtualenv at .tools/venv, pinned by tools/requirements.txt.
ensure_moto() {
  if [ ! -x .tools/venv/bin/moto_server ] || [ tools/requirements.txt -nt .tools/venv/.installed ]; then
    echo "installing the moto server into .tools/venv"
    ensure_apt python3 python3
    python3 -m venv .tools/venv 2>/dev/null || { ensure_apt false python3-venv; python3 -m venv .tools/venv; }
    .tools/venv/bin/pip install --quiet --disable-pip-version-check -r tools/requirements.txt
    touch .tools/venv/.installed
  fi
}

# etcd (v3 API) for the coordination tests.
ensure_etcd() {
  ensure_apt etcd etcd-server etcd-client
}

# redis-server, for the gateway's shared-session tests (each test starts its own on a free port).
ensure_redis() {
  ensure_apt redis-server redis-server
}

# Chromium for the web UI's Playwright tests (web/e2e): the Debian package at /usr/bin/chromium.
# Playwright never downloads a browser here (no `npx playwright install`).
ensure_chromium() {
  ensure_apt chromium chromium
}

# The web UI: npm ci (when package-lock.json changed) and a production build into web/dist, which
# `ccm serve gateway` / `ccm dev` serve. The build regenerates web/src/gen from proto/ (buf +
# protoc-gen-es, offline).
ensure_web() {
  if [ ! -d web/node_modules ] || [ web/package-lock.json -nt web/node_modules/.package-lock.json ]; then
    (cd web && npm ci --no-audit --no-fund --loglevel=error)
  fi
  (cd web && npm run --silent build)
}
