#!/usr/bin/env bash
# Submit a render job to a running Ray cluster: jobs/submit.sh CONFIG [key=value ...]
#   e.g. jobs/submit.sh configs/lite-sft-5s.yaml input.path=s3://b/prompts/ output.uri=s3://b/renders/sft-5s
# CONFIG is a path inside this repo (it travels in the job's working_dir, see jobs/runtime_env.yaml).
# Relative input.path / output.uri resolve inside that per-job copy on the cluster: give outputs an absolute
# path or URI that the driver's node can reach, or the videos vanish with the working dir.
# RAY_ADDRESS names the cluster's dashboard (default http://127.0.0.1:8265, a head on this machine).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: jobs/submit.sh CONFIG [key=value ...]   (CONFIG relative to the repo root)" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config="$1"
shift
if [[ ! -f "$config" ]]; then
  echo "error: config $config: no such file under $(pwd)" >&2
  exit 2
fi

# Ray 2.60 heads run with token auth whenever `ray start` found a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token), but the `ray job` client only sends one when RAY_AUTH_MODE=token: set it when a token is here.
if [[ -z "${RAY_AUTH_MODE:-}" && ( -n "${RAY_AUTH_TOKEN:-}" || -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ) ]]
then
  export RAY_AUTH_MODE=token
fi

# cluster.address=auto: the driver joins the cluster the job runs on (Ray sets RAY_ADDRESS for it).
exec ray job submit --address "${RAY_ADDRESS:-http://127.0.0.1:8265}" --runtime-env jobs/runtime_env.yaml \
  -- python -m kandinsky_batch run "$config" cluster.address=auto "$@"
