#!/usr/bin/env bash
# The Top Clients demo in one command (see README.md, "Run the demo"):
#
#   ./scripts/demo.sh              # the full story, about a minute once built
#   ./scripts/demo.sh --quick      # a shorter writer phase
#   ./scripts/demo.sh --keep       # keep the stack running afterwards, until Ctrl-C
#   ./scripts/demo.sh --release    # build optimised binaries first (slower to build)
#
# 1. Finds Postgres (initdb/postgres) and nats-server; installs the Debian packages when they
#    are missing and this runs as root (else says what to install).
# 2. Builds `cdc`, `view-agent` and the demo (`cargo build --locked`).
# 3. Runs `topclients-demo`, which starts a private Postgres cluster and NATS server in a temp
#    dir on free ports (never the machine's own 5432/4222; as root, Postgres runs as the
#    `postgres` OS user), the reader and two view agents, and plays the story.
# 4. Cleans up on exit, on error and on Ctrl-C: the demo stops what it started, and this
#    script's trap stops anything left over and removes the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_profile=()
demo_args=()
for arg in "$@"; do
  case "$arg" in
    --release) profile=release; cargo_profile=(--release) ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) demo_args+=("$arg") ;;
  esac
done

say() { printf '\033[1m%s\033[0m\n' "$*"; }

# --- 1. prerequisites -------------------------------------------------------------------------
have_postgres() { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
have_nats() { command -v nats-server >/dev/null 2>&1; }
missing=()
have_postgres || missing+=(postgresql)
have_nats || missing+=(nats-server)
if ! command -v cargo >/dev/null 2>&1; then
  echo "demo: cargo not found: install the Rust toolchain (https://rustup.rs) and run again" >&2
  exit 1
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "demo: missing ${missing[*]}: install with 'sudo apt-get install ${missing[*]}' and run again" >&2
    exit 1
  fi
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
  # The Debian package starts the machine's own cluster; the demo never uses it.
fi
if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
  echo "demo: running as root, but there is no 'postgres' OS user to run the server as: install the Debian package postgresql" >&2
  exit 1
fi

# --- 2. build ---------------------------------------------------------------------------------
say "building cdc, view-agent and the demo ($profile)"
cargo build --locked "${cargo_profile[@]}" -p cdc -p consumers -p topclients --bins

# --- 3. run, 4. clean up -----------------------------------------------------------------------
demo_dir="$(mktemp -d "${TMPDIR:-/tmp}/topclients-demo.XXXXXX")"
# Traversable by the `postgres` OS user, whose cluster lives inside.
chmod 755 "$demo_dir"
pid_file="$demo_dir/pids"
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # The demo stops everything it started; this is the last resort if it could not (killed).
  if [ -f "$pid_file" ]; then
    while read -r pid; do
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      fi
    done <"$pid_file"
  fi
  rm -rf "$demo_dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "running the demo (temp dir $demo_dir)"
# The demo's own temp dirs (the servers' data, process logs) go inside $demo_dir too.
TMPDIR="$demo_dir" "target/$profile/topclients-demo" \
  --bin-dir "target/$profile" --work-dir "$demo_dir/stack" --pid-file "$pid_file" \
  "${demo_args[@]+"${demo_args[@]}"}"
