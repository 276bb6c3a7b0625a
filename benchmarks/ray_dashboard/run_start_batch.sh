#!/bin/bash
# Interleaved start/idle probes. Waits (up to 300 s) for the host to have no other Ray cluster before each run.
cd "${RAYDASH_DIR:-/tmp/raydash}"
wait_quiet() {
  for k in $(seq 1 60); do
    if ! ps -eo cmd | grep -v grep | grep -q "gcs_server"; then return 0; fi
    sleep 5
  done
  echo "WARNING: another Ray cluster still present" >&2
}
for i in 1 2 3; do
  for cfg in "venv_noextra 0 noextra_dash0" "venv 1 extra_dash1" "venv 0 extra_dash0"; do
    set -- $cfg
    wait_quiet
    echo "=== $3 run$i $(date -Is) loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    ./$1/bin/python scripts/start_probe.py $2 ${3}_run$i > start_${3}_run$i.log 2>&1
    echo "rc=$?"; grep -E "INIT_S|DASHBOARD_URL|RSS_MB|IDLE_CPU|FOREIGN" start_${3}_run$i.log
    sleep 5
  done
done
