#!/usr/bin/env bash
# What only a GPU machine can show, in one script: the `gpu` and `vllm` tests, then the paper-shaped profile run in
# bf16 on CUDA with vLLM (generation, GRPO rollouts colocated, a translator on vLLM), on every visible GPU; a short
# table last, with the throughput figures `budget-align plan` can take (conf/profile/paper.yaml, plan.throughput).
#
#     benchmarks/gpu_check.sh                 # needs CUDA, the package registries (vllm), and about 20 GB of disk
#     benchmarks/gpu_check.sh --tests-only    # only the gpu and vllm tests
#
# Everything it writes stays in a temporary folder (printed), and the log of each part beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d -t budget-alignment-gpu-XXXX)
echo "work folder: $WORK"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$WORK/gpus.txt"
make setup-dev >/dev/null
.venv/bin/python -m pip install --quiet -e '.[vllm]'
export PATH="$ROOT/.venv/bin:$PATH" MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1

tests_status=0
python -m pytest -m "gpu or vllm" -v -p no:cacheprovider 2>&1 | tee "$WORK/tests.log" || tests_status=$?
if [[ "${1:-}" == "--tests-only" ]]; then
  exit "$tests_status"
fi

# The paper's branches at toy size, on the GPUs: the paper-shaped CPU profile with the device, dtype and engines of
# the paper profile. Its hub datasets come from a local mirror written from the test fixtures.
project="$WORK/project"
mkdir -p "$project"
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$project/"
PYTHONPATH="$ROOT/tests" python -c "from hub_mirror import write_hub_mirror; write_hub_mirror('$WORK/mirror')"
cd "$project"
git init -q -b main && git add -A && git -c user.name=gpu -c user.email=gpu@localhost commit -qm "gpu check"
budget-align compose-params profile=paper_cpu compute.device=cuda compute.num_processes=auto \
  compute.generation_replicas=auto base_model.dtype=bfloat16 evaluation.backend=vllm grpo.use_vllm=true \
  translate.backend=vllm translate.dtype=bfloat16 "hub_mirror=$WORK/mirror"
started=$(date +%s)
run_status=0
dvc repro 2>&1 | tee "$WORK/repro.log" || run_status=$?
seconds=$(( $(date +%s) - started ))
budget-align budget >/dev/null || true

python - "$WORK" "$tests_status" "$run_status" "$seconds" <<'EOF'
import json, re, sys
from pathlib import Path

work, tests_status, run_status, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (work / "tests.log").read_text()
summary = re.findall(r"=+ (.*(?:passed|failed|skipped|error).*) =+", log)
budgets = [json.loads(p.read_text()) for p in (work / "project/reports/budget").glob("*.json")]
def total(prefix, key):
    return sum(b.get(key, 0) for b in budgets if b["stage"].startswith(prefix))

trained, train_s = total("sft", "tokens_trained"), total("sft", "wall_seconds")
generated, generate_s = total("generate", "tokens_generated"), total("generate", "generation_seconds")
# GRPO's wall time less its training at SFT's rate: what its rollouts took (plan.throughput.rollout_tokens_per_s).
rollout_s = total("grpo", "wall_seconds") - (total("grpo", "tokens_trained") / (trained / train_s) if trained else 0)
rolled_out = total("grpo", "tokens_generated")
rows = [
    ("GPUs", (work / "gpus.txt").read_text().strip().replace("\n", "; ")),
    ("gpu/vllm tests", f"{summary[-1] if summary else 'no summary'} (status {tests_status})"),
    ("paper-shaped run", f"{'passed' if run_status == 0 else 'FAILED'} in {seconds} s, {len(budgets)} stages"),
    ("train_tokens_per_s (sft)", f"{trained / train_s:.0f}" if train_s else "-"),
    ("generate_tokens_per_s (vLLM)", f"{generated / generate_s:.0f}" if generate_s else "-"),
    ("rollout_tokens_per_s (grpo)", f"{rolled_out / rollout_s:.0f}" if rolled_out and rollout_s > 0 else "-"),
    ("peak memory of a stage", f"{max((b['peak_rss_bytes'] for b in budgets), default=0) / 2**30:.1f} GiB"),
]
print("\n| check | result |\n|---|---|")
print("\n".join(f"| {name} | {value} |" for name, value in rows))
EOF
exit $(( tests_status || run_status ))
