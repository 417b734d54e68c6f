-- Runs once, on an empty data volume (postgres image: /docker-entrypoint-initdb.d), as POSTGRES_USER.
-- One instance, one database per service, so either can be dropped or restored without touching the other.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

-- Prefect's migrations need pg_trgm; creating it here, as the superuser, spares the server that privilege.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
