#!/usr/bin/env bash
# A local MLflow tracking server: SQLite backend + proxied artifact store in one folder.
#
#   infra/mlflow_server.sh [--port N] [--dir DIR] [--host H] [--workers W] [--auth] [--background] [--timeout S]
#   infra/mlflow_server.sh --stop [--dir DIR]
#
#   --port N        port to listen on (default: $MLFLOW_PORT or 5000)
#   --dir DIR       state folder: DIR/mlflow.db (runs, registry), DIR/artifacts (models, plots, CSVs)
#                   (default: $MLFLOW_SERVER_DIR or <repo>/runs/mlflow-server)
#   --host H        interface to bind (default 127.0.0.1: local only)
#   --workers W     server worker processes (default 1; SQLite prefers few writers)
#   --background    start detached, write DIR/server.pid and DIR/server.log, wait for /health,
#                   then print the URI and return
#   --timeout S     seconds to wait for /health with --background (default 120)
#   --python PY     run `PY -m mlflow server` (default: <repo>/.venv/bin/mlflow, else mlflow on PATH)
#   --auth          HTTP basic authentication (MLflow's basic-auth app): users and permissions in
#                   DIR/basic_auth.db, no access without a grant, DIR readable by its owner only.
#                   Admin (made on the first start): $MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD, else
#                   $MLFLOW_TRACKING_USERNAME/_PASSWORD (the pair MLflow's client sends), else
#                   DIR/credentials (made once, random password, format of ~/.mlflow/credentials)
#   --stop          stop the background server whose pid is in DIR/server.pid
#
# Uses <repo>/.venv/bin/mlflow when present, else `mlflow` on PATH. Prints the tracking URI:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${MLFLOW_PORT:-5000}"
DIR="${MLFLOW_SERVER_DIR:-$REPO/runs/mlflow-server}"
HOST="127.0.0.1"
WORKERS=1
BACKGROUND=0
STOP=0
TIMEOUT=120
PYTHON_BIN="${MLFLOW_SERVER_PYTHON:-}"
AUTH=0

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --port=*) PORT="${1#*=}"; shift ;;
    --dir) DIR="$2"; shift 2 ;;
    --dir=*) DIR="${1#*=}"; shift ;;
    --host) HOST="$2"; shift 2 ;;
    --host=*) HOST="${1#*=}"; shift ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --workers=*) WORKERS="${1#*=}"; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --python) PYTHON_BIN="$2"; shift 2 ;;
    --python=*) PYTHON_BIN="${1#*=}"; shift ;;
    --background) BACKGROUND=1; shift ;;
    --auth) AUTH=1; shift ;;
    --stop) STOP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "mlflow_server.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if ! [[ "$PORT" =~ ^[0-9]+$ ]]; then
  echo "mlflow_server.sh: --port must be a number, got '$PORT'" >&2; exit 2
fi
# with --auth the files behind the API (database, artifacts, users) are private too
if [[ "$AUTH" == 1 ]]; then umask 077; fi
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PID_FILE="$DIR/server.pid"
LOG_FILE="$DIR/server.log"

if [[ "$STOP" == 1 ]]; then
  if [[ ! -f "$PID_FILE" ]]; then
    echo "mlflow_server.sh: no $PID_FILE; nothing to stop" >&2; exit 0
  fi
  pid="$(cat "$PID_FILE")"
  # the server was started as the leader of its own process group: stop the group (its workers too)
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
  echo "stopped MLflow server (pid $pid)"
  exit 0
fi

if [[ -n "$PYTHON_BIN" ]]; then
  MLFLOW_CMD=("$PYTHON_BIN" -m mlflow)
  PY="$PYTHON_BIN"
elif [[ -x "$REPO/.venv/bin/mlflow" ]]; then
  MLFLOW_CMD=("$REPO/.venv/bin/mlflow")
  PY="$REPO/.venv/bin/python"
elif command -v mlflow >/dev/null 2>&1; then
  MLFLOW_CMD=("$(command -v mlflow)")
  PY="$(command -v python3 || command -v python)"
else
  echo "mlflow_server.sh: mlflow not found (no $REPO/.venv/bin/mlflow and none on PATH)" >&2
  exit 1
fi

mkdir -p "$DIR/artifacts"
export MLFLOW_DISABLE_TELEMETRY=true
# the server's background job runner (GenAI evaluation jobs) is not used by this project; it would
# start a handful of extra processes. Export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
URI="http://$HOST:$PORT"
ARGS=(server
  --backend-store-uri "sqlite:///$DIR/mlflow.db"
  --artifacts-destination "$DIR/artifacts"
  --host "$HOST" --port "$PORT" --workers "$WORKERS")

if [[ "$AUTH" == 1 ]]; then
  chmod 700 "$DIR"
  # the Flask session/CSRF key must be the same in every worker and across restarts
  [[ -s "$DIR/flask_secret_key" ]] || "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$DIR/flask_secret_key"
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(cat "$DIR/flask_secret_key")}"
  export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-${MLFLOW_TRACKING_USERNAME:-}}"
  export MLFLOW_AUTH_ADMIN_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:-${MLFLOW_TRACKING_PASSWORD:-}}"
  if [[ -z "$MLFLOW_AUTH_ADMIN_USERNAME" || -z "$MLFLOW_AUTH_ADMIN_PASSWORD" ]]; then
    CREDS="$DIR/credentials"
    { read -r MLFLOW_AUTH_ADMIN_USERNAME; read -r MLFLOW_AUTH_ADMIN_PASSWORD; } < <("$PY" - "$CREDS" <<'PYEOF'
import configparser, os, secrets, sys
path = sys.argv[1]
if not os.path.exists(path):  # first start: an admin with a random password
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("[mlflow]\nmlflow_tracking_username = admin\n"
                f"mlflow_tracking_password = {secrets.token_urlsafe(24)}\n")
creds = configparser.ConfigParser()
creds.read(path)
print(creds["mlflow"]["mlflow_tracking_username"], creds["mlflow"]["mlflow_tracking_password"], sep="\n")
PYEOF
)
    echo "MLflow admin credentials: $CREDS (MLflow's client reads them from ~/.mlflow/credentials)"
  fi
  # users and grants in DIR; the admin password stays in the environment, out of this file
  export MLFLOW_AUTH_CONFIG_PATH="$DIR/basic_auth.ini"
  printf '[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///%s/basic_auth.db\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
    "$DIR" >"$MLFLOW_AUTH_CONFIG_PATH"
  ARGS+=(--app-name basic-auth)
fi

if [[ "$BACKGROUND" == 0 ]]; then
  echo "MLflow server on $URI (state in $DIR); in another shell:"
  echo "export MLFLOW_TRACKING_URI=$URI"
  exec "${MLFLOW_CMD[@]}" "${ARGS[@]}"
fi

if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  echo "mlflow_server.sh: a server from $DIR already runs (pid $(cat "$PID_FILE")); --stop it first" >&2
  exit 1
fi
# own session/process group, so that --stop can end the server and its workers together
if command -v setsid >/dev/null 2>&1; then
  setsid "${MLFLOW_CMD[@]}" "${ARGS[@]}" >"$LOG_FILE" 2>&1 < /dev/null &
else  # no setsid: job control gives the background job its own process group
  set -m
  "${MLFLOW_CMD[@]}" "${ARGS[@]}" >"$LOG_FILE" 2>&1 < /dev/null &
  set +m
fi
PID=$!
echo "$PID" >"$PID_FILE"

deadline=$((SECONDS + TIMEOUT))
until "$PY" - "$URI/health" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
do
  if ! kill -0 "$PID" 2>/dev/null; then
    echo "mlflow_server.sh: the server exited during start-up; last lines of $LOG_FILE:" >&2
    tail -n 20 "$LOG_FILE" >&2 || true
    rm -f "$PID_FILE"
    exit 1
  fi
  if (( SECONDS >= deadline )); then
    echo "mlflow_server.sh: no answer from $URI/health after ${TIMEOUT}s; log: $LOG_FILE" >&2
    kill -TERM -- "-$PID" 2>/dev/null || true
    rm -f "$PID_FILE"
    exit 1
  fi
  sleep 0.5
done
echo "MLflow server up on $URI (pid $PID, state in $DIR, log $LOG_FILE)"
echo "export MLFLOW_TRACKING_URI=$URI"
