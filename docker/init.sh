#!/usr/bin/env bash
# The compose deployment's one-off init (service `init`), what `pruneflow airflow init --executor celery` does
# for one machine: migrate Airflow's metadata DB and pruneflow's results DB, create a pool of one slot per
# benchmark device (bench_<device>, [pruneflow] devices), write the admin password file of SimpleAuthManager,
# and create the artifact bucket. Safe to run again: every step keeps what exists.
set -euo pipefail

airflow db migrate

python - <<'PY'
import os
from pruneflow.store import ResultsStore

ResultsStore(os.environ["PRUNEFLOW_DB"]).close()  # creates or upgrades the results schema
print("results DB migrated")
PY

IFS=',' read -r -a devices <<< "${AIRFLOW__PRUNEFLOW__DEVICES:?}"
for device in "${devices[@]}"; do
  device="${device// /}"
  [ -n "$device" ] || continue
  airflow pools set "bench_${device}" 1 "pruneflow: one benchmark at a time on this device"
done

passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?}"
umask 077
python - "$passwords" <<'PY'
import json, os, sys
with open(sys.argv[1], "w") as fh:
    json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, fh)
PY
echo "admin password file: $passwords"

python - <<'PY'
import os
import s3fs

url = os.environ["PRUNEFLOW_ARTIFACTS"]
bucket = url.removeprefix("s3://").split("/", 1)[0]
fs = s3fs.S3FileSystem()  # endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
if not fs.exists(bucket):
    fs.mkdir(bucket)
print(f"artifact bucket: {bucket}")
PY
