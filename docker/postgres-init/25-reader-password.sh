#!/bin/sh
# Runs once, on the first start of the postgres container (docker-entrypoint-initdb.d), after
# sql/roles.sql: sets the reader role's password from CDC_READER_PASSWORD.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  --set pw="$CDC_READER_PASSWORD" <<'EOSQL'
ALTER ROLE cdc_reader PASSWORD :'pw';
EOSQL
