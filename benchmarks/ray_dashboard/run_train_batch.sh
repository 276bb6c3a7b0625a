#!/bin/bash
# Train-job warning counts. Pinned = RAY_GCS_SERVER_PORT/RAY_ADDRESS exported (robust to another Ray cluster
# on the host); unpinned = plain ray.init (Ray auto-detects the cluster), run only when no other cluster is present.
cd "${RAYDASH_DIR:-/tmp/raydash}"
W="Failed to query Ray Train Controller actor state"
wait_quiet() {
  for k in $(seq 1 60); do
    if ! ps -eo cmd | grep -v grep | grep -q "gcs_server"; then return 0; fi
    sleep 5
  done
  echo "WARNING: another Ray cluster still present" >&2
}
for cfg in "venv 1 extra_dash1" "venv 0 extra_dash0" "venv_noextra 0 noextra_dash0"; do
  set -- $cfg
  for mode in pinned unpinned; do
    wait_quiet
    others=$(ps -eo cmd | grep -v grep | grep -c gcs_server)
    log=train_${3}_${mode}.log
    if [ $mode = pinned ]; then
      env RAY_GCS_SERVER_PORT=46379 RAY_ADDRESS=127.0.0.1:46379 ./$1/bin/python scripts/train_probe.py $2 > $log 2>&1
    else
      env -u RAY_ADDRESS -u RAY_GCS_SERVER_PORT ./$1/bin/python scripts/train_probe.py $2 > $log 2>&1
    fi
    rc=$?
    echo "rc=$rc" >> $log
    echo "=== $3 $mode other_clusters_at_start=$others rc=$rc warnings=$(grep -c "$W" $log) multi_instance_errors=$(grep -c 'Found multiple active Ray instances' $log) $(grep 'PROBE fit_s' $log)"
    sleep 5
  done
done
