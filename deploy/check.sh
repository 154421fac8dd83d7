#!/usr/bin/env bash
# Static checks of the deployment files: no Docker engine or cluster is needed (and none
# runs in CI). Expects on PATH hadolint, kubernetes-validate, check-jsonschema
# (deploy/requirements.txt), haproxy, promtool and a python with PyYAML; .ci/run installs
# them all into .venv-deploy/ and runs
#   PATH="$PWD/.venv-deploy/bin:$PATH" deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The newest Kubernetes release whose schemas kubernetes-validate (as pinned) carries.
KUBERNETES_VERSION=1.37.0

step() { printf -- '-- %s\n' "$*"; }

step "hadolint Dockerfile"
hadolint Dockerfile

step "kubernetes-validate --strict, Kubernetes $KUBERNETES_VERSION"
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' | sort)
kubernetes-validate --strict --quiet -k "$KUBERNETES_VERSION" "${manifests[@]}"
echo "${#manifests[@]} manifests valid"

step "docker-compose.yml against the Compose specification"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

step "haproxy -c (the compose load balancer)"
haproxy -c -f deploy/compose/haproxy.cfg

step "promtool: the alerts, their tests, the compose Prometheus"
(
  cd deploy/prometheus
  promtool check rules alerts.yml
  promtool test rules alerts.test.yml
  promtool check config prometheus.yml
)

step "deploy/check.py: the rules the schemas cannot see"
python deploy/check.py
