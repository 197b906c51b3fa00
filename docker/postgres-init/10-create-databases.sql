-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d):
-- the sweep service's database and MLflow's, both owned by POSTGRES_USER.
-- Idempotent (\gexec runs the CREATE only for a database that does not exist yet).
SELECT 'CREATE DATABASE sweeper' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'sweeper')\gexec
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
