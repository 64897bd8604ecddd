#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray job.
#
#   RAY_ADDRESS=http://head:8265 deploy/submit_job.sh configs/multinode/repic_7b_2x8gpu.yaml \
#       [--dotted.key VALUE ...]
#
# Runs, from the project root:
#   ray job submit --working-dir . --runtime-env deploy/job_runtime_env.yaml -- \
#       python -m recipes.cli train --config CONFIG [overrides] --address auto
#
# Environment:
#   RAY_ADDRESS       dashboard address of the cluster's head (required), e.g. http://head:8265
#   RAY_AUTH_MODE     `token` when the cluster uses token auth (the token itself comes from
#                     RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
#   REPIC_RUNTIME_ENV another runtime-env YAML (default deploy/job_runtime_env.yaml)
#   REPIC_JOB_ARGS    extra `ray job submit` flags, e.g. "--no-wait --submission-id run7"
#   REPIC_COMMAND     CLI command to run (default `train`; `sft` for the SFT stage alone)
#   RAY               the `ray` executable (default: `ray` on PATH)
set -euo pipefail

usage() {
    sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
case "$1" in -h|--help) usage ;; esac
config=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [[ -z "${RAY_ADDRESS:-}" ]]; then
    echo "submit_job.sh: set RAY_ADDRESS to the cluster's dashboard, e.g. http://head:8265" >&2
    exit 2
fi
if [[ ! -f "$config" ]]; then
    echo "submit_job.sh: config file not found: $config (paths are relative to $root)" >&2
    exit 2
fi
runtime_env=${REPIC_RUNTIME_ENV:-deploy/job_runtime_env.yaml}
if [[ ! -f "$runtime_env" ]]; then
    echo "submit_job.sh: runtime env file not found: $runtime_env" >&2
    exit 2
fi
ray_bin=${RAY:-ray}
command -v "$ray_bin" >/dev/null || { echo "submit_job.sh: '$ray_bin' not found on PATH" >&2; exit 2; }

# shellcheck disable=SC2086  # REPIC_JOB_ARGS is a list of flags
exec "$ray_bin" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env "$runtime_env" \
    ${REPIC_JOB_ARGS:-} -- \
    python -m recipes.cli "${REPIC_COMMAND:-train}" --config "$config" "$@" --address auto
