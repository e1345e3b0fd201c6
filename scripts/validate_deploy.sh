#!/usr/bin/env bash
# Validate every deployment artefact: Dockerfile, docker-compose.yml, Prometheus config, alert
# rules and their unit tests, Grafana dashboards, RabbitMQ definitions and the Helm chart.
#
# Installs what it needs when missing: Debian's `prometheus` (promtool) and `docker-compose`
# with apt-get (as root, or through sudo), and a throwaway virtual environment with the pinned
# Python validators of tests/deploy/requirements.txt under .tools/deploy-venv.
# Prints one line per check and exits non-zero if any check fails.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit

PYTHON=${PYTHON:-python3.11}
TOOLS_VENV=.tools/deploy-venv
REQUIREMENTS=tests/deploy/requirements.txt
started=$SECONDS
failures=0

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi
}

install_system_tools() {
    local missing=()
    command -v promtool >/dev/null || missing+=(prometheus)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    ((${#missing[@]} == 0)) && return 0
    echo "installing with apt-get: ${missing[*]}"
    as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python_tools() {
    # Rebuilt whenever the pinned requirements change.
    if cmp -s "$REQUIREMENTS" "$TOOLS_VENV/requirements.txt"; then
        return 0
    fi
    echo "creating $TOOLS_VENV"
    rm -rf "$TOOLS_VENV" &&
        "$PYTHON" -m venv "$TOOLS_VENV" &&
        "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" &&
        cp "$REQUIREMENTS" "$TOOLS_VENV/requirements.txt"
}

# check NAME COMMAND...: runs the command, prints PASS or FAIL with its output.
check() {
    local name=$1
    shift
    local output begun=$SECONDS
    if output=$("$@" 2>&1); then
        printf 'PASS  %-56s %3ds\n' "$name" $((SECONDS - begun))
    else
        printf 'FAIL  %-56s %3ds\n' "$name" $((SECONDS - begun))
        printf '%s\n' "$output" | sed 's/^/      /'
        failures=$((failures + 1))
    fi
}

# Every test must run here, where the whole toolchain is installed: a skip is a failure.
pytest_file() {
    local output
    output=$("$TOOLS_VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$1" 2>&1)
    local status=$?
    printf '%s\n' "$output"
    ((status == 0)) && ! grep -q ' skipped' <<<"$output"
}

check "install: promtool, docker-compose (apt)" install_system_tools
check "install: Python validators ($TOOLS_VENV)" install_python_tools

check "docker-compose config" docker-compose --file docker-compose.yml config --quiet
check "promtool check config deploy/prometheus/prometheus.yml" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules (helm/tally/files/prometheus)" promtool check rules helm/tally/files/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" promtool test rules deploy/prometheus/alerts_test.yml
# The other tests/deploy files need only the project's environment and run under `make test`.
for test_file in tests/deploy/test_{alerts,chart,compose}.py; do
    check "pytest ${test_file#tests/deploy/}" pytest_file "$test_file"
done

echo "$failures failed check(s) in $((SECONDS - started))s"
((failures == 0))
