#!/usr/bin/env bash
# Virtual environments of the real inference servers the protocol tests talk to, one per
# server (their pins conflict with each other and never touch the project's .venv), made
# with uv (about a minute for all three, against 13 with pip on this 2-core machine).
# Usage: .ci/server-envs.sh DIR [UV]   -> DIR/mlserver, DIR/mlflow, DIR/kserve
set -euo pipefail
root="${1:?usage: server-envs.sh DIR [UV]}"
uv="${2:-uv}"
mkdir -p "$root"
make_env() {  # name, packages...
  local name="$1"; shift
  local start=$SECONDS
  if ! "$root/$name/bin/python" -c 'import sklearn' 2>/dev/null; then
    rm -rf "${root:?}/$name"
    "$uv" venv -q -p python3 "$root/$name"
    VIRTUAL_ENV="$root/$name" "$uv" pip install -q "$@"
  fi
  touch "$root/$name/.ready"  # tests started meanwhile wait for this (BATCHRUNNER_SERVER_ENVS_PENDING)
  echo "server env $name ready in $((SECONDS - start)) s"
}
pids=()
make_env mlserver mlserver==1.7.1 mlserver-sklearn==1.7.1 scikit-learn==1.9.1 & pids+=($!)
make_env mlflow mlflow==3.17.2 scikit-learn==1.9.1 & pids+=($!)
make_env kserve kserve==0.21.0 scikit-learn==1.9.1 & pids+=($!)
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
