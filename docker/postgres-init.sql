-- Run once by the postgres image on an empty data volume: the results and studies database beside the
-- `airflow` one (POSTGRES_DB), both owned by POSTGRES_USER (pruneflow), as pruneflow.services does.
CREATE DATABASE pruneflow OWNER pruneflow;
