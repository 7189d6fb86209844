#!/bin/sh
# One-shot Temporal schema setup for infra/docker-compose.yml, run in temporalio/admin-tools.
# Idempotent: `setup-schema -v 0.0` leaves an already-versioned database alone and
# `update-schema` applies only the migrations newer than the stored version, so this runs on
# every `docker compose up` and also upgrades the schema after a server version bump.
# The two databases are created by postgres-init.sql on first start.
set -eu

: "${POSTGRES_SEEDS:?POSTGRES_SEEDS is required}"
: "${POSTGRES_USER:?POSTGRES_USER is required}"
: "${SQL_PASSWORD:?SQL_PASSWORD is required}"   # temporal-sql-tool reads the password from here
DB_PORT="${DB_PORT:-5432}"
SCHEMA_DIR=/etc/temporal/schema/postgresql/v12

echo "waiting for postgres at ${POSTGRES_SEEDS}:${DB_PORT}"
i=0
until nc -z "${POSTGRES_SEEDS}" "${DB_PORT}"; do
  i=$((i + 1))
  [ "$i" -lt 60 ] || { echo "postgres did not come up" >&2; exit 1; }
  sleep 1
done

sql_tool() {
  temporal-sql-tool --plugin postgres12 --ep "${POSTGRES_SEEDS}" -p "${DB_PORT}" \
    -u "${POSTGRES_USER}" "$@"
}

for db in temporal temporal_visibility; do
  case "$db" in
    temporal) dir="${SCHEMA_DIR}/temporal/versioned" ;;
    *) dir="${SCHEMA_DIR}/visibility/versioned" ;;
  esac
  echo "schema: ${db}"
  sql_tool --db "$db" setup-schema -v 0.0
  sql_tool --db "$db" update-schema -d "$dir"
done
echo "temporal schema is up to date"
