#!/usr/bin/env bash
# Runs the live lane (test/live, `npm run test:live`) against the project's own sandbox FHIR server, to check
# the lane itself without a real server:
#
#   test/live/run-against-sandbox.sh                 # the default sandbox, gateway profile generic
#   test/live/run-against-sandbox.sh medplum         # SANDBOX_PROFILE=medplum, LIVE_FHIR_PROFILE=medplum
#   test/live/run-against-sandbox.sh hapi            # SANDBOX_PROFILE=hapi,    LIVE_FHIR_PROFILE=hapi
#   LIVE_FHIR_PROFILE=generic test/live/run-against-sandbox.sh medplum   # a Medplum-like sandbox, generic gateway
#   test/live/run-against-sandbox.sh hapi -t 'e\.'   # extra arguments go to jest
#
# It starts `src/cli/sandbox.ts` on a free port (SANDBOX_PROFILE=<profile>), runs jest -c jest.live.config.js
# with LIVE_FHIR_BASE_URL pointing at it, stops the sandbox, and exits with jest's exit code.
set -euo pipefail

cd "$(dirname "$0")/../.."
export PATH="$PWD/node_modules/.bin:$PATH" # the project's own Node 24

profile="${1:-default}"
[ $# -gt 0 ] && shift

case "$profile" in
  default) gateway_profile="${LIVE_FHIR_PROFILE:-}" ;;
  medplum | hapi) gateway_profile="${LIVE_FHIR_PROFILE:-$profile}" ;;
  *) gateway_profile="${LIVE_FHIR_PROFILE:-}" ;;
esac

log="$(mktemp -t rg-live-sandbox.XXXXXX)"
PORT=0 HOST=127.0.0.1 SANDBOX_PROFILE="$([ "$profile" = default ] && echo '' || echo "$profile")" \
  tsx src/cli/sandbox.ts >"$log" 2>&1 &
sandbox_pid=$!
stop() {
  kill "$sandbox_pid" 2>/dev/null || true
  wait "$sandbox_pid" 2>/dev/null || true
  rm -f "$log"
}
trap stop EXIT

url=""
for _ in $(seq 1 300); do
  url="$(sed -n 's/.*"event":"sandbox-listening","url":"\([^"]*\)".*/\1/p' "$log" | head -n1)"
  [ -n "$url" ] && break
  if ! kill -0 "$sandbox_pid" 2>/dev/null; then
    echo "the sandbox did not start:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
if [ -z "$url" ]; then
  echo "the sandbox did not report its URL within 30 s" >&2
  cat "$log" >&2
  exit 1
fi
reported="$(sed -n 's/.*"event":"sandbox-listening".*"profile":"\([^"]*\)".*/\1/p' "$log" | head -n1)"
if [ "${reported:-default}" != "$profile" ]; then
  echo "asked for SANDBOX_PROFILE=$profile but the sandbox runs profile ${reported:-default (it does not report one)}" >&2
  exit 1
fi
echo "sandbox (profile ${reported:-default}) at $url; gateway profile ${gateway_profile:-generic}"

status=0
env LIVE_FHIR_BASE_URL="$url" LIVE_FHIR_AUTH="${LIVE_FHIR_AUTH:-none}" \
  ${gateway_profile:+LIVE_FHIR_PROFILE="$gateway_profile"} \
  jest -c jest.live.config.js --runInBand "$@" || status=$?
exit "$status"
