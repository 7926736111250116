#!/usr/bin/env bash
# System packages the test suite uses for real: Fashion-MNIST (Debian's dataset-fashion-mnist, the data set
# that makes pruning cost accuracy), and on loopback a PostgreSQL server (results DB on
# PostgreSQL, and the Celery deployment's databases), a Redis server (its broker) and a headless Chromium (the Airflow UI browser test, driven by Playwright through
# executable_path; Playwright's own browser download is never used). Installs only what is missing,
# and only as root (apt-get); otherwise says what to install.
set -euo pipefail
missing=()
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  missing+=(postgresql)
fi
if ! [ -x /usr/bin/redis-server ] && ! command -v redis-server >/dev/null 2>&1; then
  missing+=(redis-server)
fi
if ! [ -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then
  missing+=(chromium)
fi
if ! [ -d /usr/share/datasets/fashion-mnist ]; then
  missing+=(dataset-fashion-mnist)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: please install: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
