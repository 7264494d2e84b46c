#!/usr/bin/env bash
# make bench: run every benchmark, write bench/results/*.json, render docs/BENCHMARKS.md + plots.
#   BENCH_SIZES_MIB   database sizes for backup/restore/memory   (default "64 256 1024 2048")
#   BENCH_RUNS        rounds per measurement (medians are over these)            (default 3)
#   BENCH_QUICK=1     smoke run: 16 and 64 MiB, 1 round, 5 s app phases, 1-host fleet
#   BENCH_RATE        steady writer commits/s during "under load" backups         (default 500)
#   BENCH_GZIP_MAX_MIB  run compression=gzip up to this size                      (default 256)
#   BENCH_VACUUM_SIZES_MIB  sizes for the sqlite_vacuum bench                     (default 1024)
#   BENCH_APP_MIB     database size for the app-under-load and contention benches (default: largest size <= 1024)
#   BENCH_APP_SECONDS seconds per app phase                                        (default 20)
#   BENCH_FLEET       0 skips the container fleet bench (default: run it when docker and the lab image are there)
#   BENCH_FLEET_COUNTS  host counts                                                (default "1 3 6 10")
#   BENCH_WORK        scratch directory for databases and sets       (default /var/tmp/runbook-bench)
#   BENCH_RESULTS     where the JSON goes (default bench/results; a previous run's files move to
#                     previous/<UTC time>/ there); BENCH_DOC, BENCH_IMG: the rendered
#                     document and plots (default docs/BENCHMARKS.md, docs/img)
# Figures go to docs/BENCHMARKS.md, never into tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

MATPLOTLIB_VERSION=3.10.8
quick=${BENCH_QUICK:-0}
if [ "$quick" = 1 ]; then
    sizes=${BENCH_SIZES_MIB:-"16 64"}; runs=${BENCH_RUNS:-1}; app_seconds=${BENCH_APP_SECONDS:-5}
    fleet_counts=${BENCH_FLEET_COUNTS:-"1"}; vacuum_sizes=${BENCH_VACUUM_SIZES_MIB:-"16"}
else
    sizes=${BENCH_SIZES_MIB:-"64 256 1024 2048"}; runs=${BENCH_RUNS:-3}; app_seconds=${BENCH_APP_SECONDS:-20}
    fleet_counts=${BENCH_FLEET_COUNTS:-"1 3 6 10"}; vacuum_sizes=${BENCH_VACUUM_SIZES_MIB:-"1024"}
fi
rate=${BENCH_RATE:-500}
gzip_max=${BENCH_GZIP_MAX_MIB:-256}
work=${BENCH_WORK:-/var/tmp/runbook-bench}
results=${BENCH_RESULTS:-"$root/bench/results"}
# (if, not &&: a size above 1024 last would make the loop, and with pipefail the script, fail)
app_mib=${BENCH_APP_MIB:-$(for s in $sizes; do if [ "$s" -le 1024 ]; then echo "$s"; fi; done | sort -n | tail -n 1)}
app_mib=${app_mib:-$(echo "$sizes" | tr ' ' '\n' | sort -n | head -n 1)}

for tool in sqlite3 zstd cp; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is required (apt-get install sqlite3 zstd)" >&2; exit 2; }
done

# A venv of its own for matplotlib (the project's .venv stays the pinned test tools).
venv="$root/build/bench-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import matplotlib, sys; sys.exit(matplotlib.__version__ != '$MATPLOTLIB_VERSION')" 2>/dev/null; then
    echo "bench: creating $venv with matplotlib==$MATPLOTLIB_VERSION"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "matplotlib==$MATPLOTLIB_VERSION" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
fi
py="$venv/bin/python"

tree=$(bash tools/collection-tree.sh "$root/build/bench-tree")
export BENCH_COLLECTION_ROOT="$root/build/bench-tree"
mkdir -p "$results" "$work"
# the previous run's figures move aside, never away: a committed document may still rest on them
shopt -s nullglob
previous=("$results"/*.json "$results"/*.log)
shopt -u nullglob
if [ ${#previous[@]} -gt 0 ]; then
    kept="$results/previous/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$kept"
    mv "${previous[@]}" "$kept/"
    echo "bench: the previous results are in $kept"
fi
echo "bench: sizes [$sizes] MiB, $runs run(s), writer $rate commits/s, work $work, collection $tree"
echo "bench: load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)

"$py" bench/bench_retention.py --runs "$runs" --dir "$work" --out "$results/retention.json"

for size in $vacuum_sizes; do
    echo "bench: vacuum $size MiB"
    PYTHONPATH="$BENCH_COLLECTION_ROOT" "$py" bench/bench_vacuum.py --size-mib "$size" --runs "$runs" --ansible "$root/.venv/bin/ansible" \
        --dir "$work" --out "$results/vacuum-$size.json"
done

app_db=""
for size in $sizes; do
    keep=()
    if [ "$size" = "$app_mib" ]; then
        app_db="$work/app-source-$size.db"
        keep=(--keep-db "$app_db")
    fi
    "$py" bench/bench_backup.py --size-mib "$size" --runs "$runs" --rate "$rate" --gzip-max-mib "$gzip_max" \
        --dir "$work" --out "$results/backup-$(printf %05d "$size").json" "${keep[@]}"
done

# a reference for the stall target: what the disk alone does to the writer
"$py" bench/bench_contention.py --size-mib "$app_mib" --runs "$runs" --rate "$rate" --dir "$work" \
    --out "$results/contention-$(printf %05d "$app_mib").json"

if [ -n "$app_db" ] && [ -f "$app_db" ]; then
    "$py" bench/bench_app.py --db "$app_db" --seconds "$app_seconds" --runs "$runs" --dir "$work" \
        --out "$results/app.json"
    rm -f "$app_db"
else
    "$py" bench/bench_app.py --size-mib "$app_mib" --seconds "$app_seconds" --runs "$runs" --dir "$work" \
        --out "$results/app.json"
fi

if [ "${BENCH_FLEET:-1}" != 0 ]; then
    image=${RUNBOOK_LAB_IMAGE:-runbook-sqlite-app-lab:bookworm-2}
    if ! docker info >/dev/null 2>&1; then
        echo "bench: no docker engine: skipping the fleet bench (make lab starts one)"
    elif ! docker image inspect "$image" >/dev/null 2>&1; then
        echo "bench: lab image $image missing: skipping the fleet bench (make lab builds it)"
    elif [ ! -x "$root/.venv/bin/ansible-playbook" ]; then
        echo "bench: no .venv: skipping the fleet bench (make venv)"
    else
        "$py" bench/bench_fleet.py --counts "$fleet_counts" --image "$image" --collections "$root/build/bench-tree" \
            --max-seconds "${BENCH_FLEET_MAX_SECONDS:-900}" --off-max-hosts "${BENCH_FLEET_OFF_MAX_HOSTS:-3}" \
            --out "$results/fleet.json" --log "$results/fleet.log"
    fi
fi

"$py" bench/render.py --results "$results" --doc "${BENCH_DOC:-$root/docs/BENCHMARKS.md}" \
    --img "${BENCH_IMG:-$root/docs/img}" --command "$([ "$quick" = 1 ] && echo "BENCH_QUICK=1 ")BENCH_SIZES_MIB=\"$sizes\" BENCH_RUNS=$runs make bench"
echo "bench: done in $(( $(date +%s) - started )) s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
