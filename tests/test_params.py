"""params.yaml: both profiles validate; broken configurations are rejected naming the broken key."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from budget_alignment.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def compose(tmp_path: Path, *overrides: str) -> Path:
    out = tmp_path / "params.yaml"
    subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "compose-params", *overrides, "-o", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def tiny() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_params_is_the_composed_tiny_profile(tmp_path):
    composed = yaml.safe_load(compose(tmp_path).read_text())
    assert composed == yaml.safe_load((REPO / "params.yaml").read_text())
    assert load_params(REPO / "params.yaml").profile == "tiny"


def test_paper_profile_carries_the_blog_numbers(tmp_path):
    params = load_params(compose(tmp_path, "profile=paper"))
    assert params.base_model.hub.repo_id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert (params.grpo.clip_low, params.grpo.clip_high, params.grpo.beta) == (0.2, 0.28, 0.0)
    assert params.grpo.num_generations == 24
    assert params.grpo.lora.r == 8
    assert params.grpo.learning_rate == 1e-5
    assert params.grpo.reward_weights == {"accuracy": 1.0, "language": 0.2, "format": 0.2}
    assert (params.evaluation.n, params.evaluation.k) == (32, [1, 5, 10])
    assert params.languages == ["ja", "fr", "es"]
    assert params.evaluation.datasets == ["college_math", "aime25", "gpqa", "medicine"]
    assert params.merge.method == "linear" and params.merge.members == ["base", "sft-ja", "sft-fr", "sft-es"]


def test_a_single_knob_overrides_the_profile(tmp_path):
    assert load_params(compose(tmp_path, "grpo.clip_high=0.24")).grpo.clip_high == 0.24


def _set(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        data = data[part]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


DELETE = object()

# (change as dotted key -> new value, text the error must contain)
INVALID = [
    ({"grpo.clip_high": 0.1}, "grpo.clip_high"),
    ({"grpo.clip_low": 1.5}, "grpo.clip_low"),
    ({"grpo.num_generations": 1}, "grpo.num_generations"),
    ({"grpo.loss_type": "ppo"}, "grpo.loss_type"),
    ({"grpo.use_vllm": True, "grpo.vllm_mode": "server"}, "grpo.vllm_server_url"),
    ({"grpo.reward_weights": {"accuracy": 1.0}}, "grpo.reward_weights"),
    # Per-language weights: a language of the run, replacing rewards that every language weighs.
    ({"grpo.reward_weights.de": {"accuracy": 1.0}}, "grpo.reward_weights.de"),
    ({"grpo.reward_weights.es": {"speed": 1.0}}, "grpo.reward_weights.es.speed"),
    ({"grpo.reward_weights.es": {"medical": 0.5}}, "grpo.reward_weights.es.medical"),
    ({"grpo.reward_weights.length": 0.5}, "grpo.reward_weights.length"),
    ({"grpo.unknown_knob": 1}, "grpo.unknown_knob"),
    ({"evaluation.k": [1, 50]}, "evaluation.k"),
    ({"evaluation.n": 0}, "evaluation.n"),
    ({"languages": ["ja", "xx"]}, "languages"),
    ({"languages": ["ja", "en"]}, "languages"),
    ({"merge.members": ["base", "sft-de"]}, "merge.members"),
    ({"merge.weights": [0.5, 0.5]}, "merge.weights"),
    # A task-vector merge is relative to the base model: its first member must be `base` (else that member would
    # silently serve as the base).
    ({"merge.method": "dare_linear", "merge.members": ["sft-ja", "sft-fr"]}, "merge.members"),
    ({"merge.method": "ties", "merge.members": ["sft-ja", "base", "sft-fr"]}, "merge.members"),
    # SLERP interpolates exactly two models at a `t`.
    (
        {"merge.method": "slerp", "merge.members": ["base", "sft-ja", "sft-fr"], "merge.parameters": {"t": 0.5}},
        "merge.members",
    ),
    ({"merge.method": "slerp", "merge.members": ["sft-ja", "sft-fr"]}, "merge.parameters"),
    # SLERP's mix is t, not weights; TIES and DARE need the density they keep, a share; a key no method reads.
    (
        {
            "merge.method": "slerp",
            "merge.members": ["sft-ja", "sft-fr"],
            "merge.parameters": {"t": 0.5},
            "merge.weights": [1.0, 1.0],
        },
        "merge.weights",
    ),
    (
        {"merge.method": "slerp", "merge.members": ["sft-ja", "sft-fr"], "merge.parameters": {"t": 2}},
        "merge.parameters",
    ),
    ({"merge.method": "ties", "merge.members": ["base", "sft-ja"]}, "merge.parameters"),
    (
        {"merge.method": "dare_ties", "merge.members": ["base", "sft-ja"], "merge.parameters": {"density": 0}},
        "merge.parameters",
    ),
    ({"merge.parameters": {"density": 0.5}}, "merge.parameters"),  # linear trims nothing
    # GRPO members need their init in merge.grpo_inits (the merge's DVC deps), and nothing else there.
    ({"merge.members": ["base", "grpo_sft-ja"]}, "merge.grpo_inits"),
    ({"merge.grpo_inits": ["base"]}, "merge.grpo_inits"),
    ({"base_model.source": "hub"}, "base_model.hub"),
    ({"base_model.pypi_gguf.sha256": "abc"}, "base_model.pypi_gguf.sha256"),
    ({"sft.dataset": "math"}, "sft.dataset"),
    ({"sft.max_length": {"ja": 256}}, "sft.max_length"),
    ({"evaluation.datasets": ["college_math", "nope"]}, "evaluation.datasets"),
    ({"compute.num_processes": 0}, "compute.num_processes"),
    # A global batch the processes cannot share is an error naming it, before any work.
    ({"compute.num_processes": 3}, "sft.batch_size"),
    ({"compute.num_processes": 3, "sft.batch_size": 3}, "grpo.prompts_per_step"),
    ({"profile": DELETE}, "profile"),
    ({"normalize.de": {}}, "normalize"),
    ({"trust_remote_code": ["someone/else"]}, "trust_remote_code"),
    ({"base_model.trust_remote_code": True}, "base_model.trust_remote_code"),
    # Edited by hand instead of composed: the stages dvc.yaml generates would not be these params' (stage_instances).
    ({"grpo.init": ["sft"]}, "stage_instances"),
    ({"grpo.reference": "sft"}, "stage_instances"),
]


@pytest.mark.parametrize(("change", "key"), INVALID, ids=[k for _, k in INVALID])
def test_invalid_configuration_names_the_key(tiny, tmp_path, change, key):
    data = copy.deepcopy(tiny)
    for dotted, value in change.items():
        _set(data, dotted, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    lines = str(error.value).splitlines()
    assert any(line.startswith(f"{key}:") or line.startswith(f"{key}.") for line in lines[1:]), str(error.value)


VALID_MERGES = [
    {
        "merge.method": "dare_linear",
        "merge.members": ["base", "sft-ja", "sft-fr"],
        "merge.parameters": {"density": 0.5},
    },
    {"merge.method": "slerp", "merge.members": ["sft-ja", "sft-fr"], "merge.parameters": {"t": 0.5}},
    {"merge.method": "task_arithmetic", "merge.members": ["base", "grpo_sft-ja"], "merge.grpo_inits": ["sft"]},
    {
        "merge.method": "ties",
        "merge.members": ["base", "sft-ja", "grpo_base-fr", "grpo_sft-es"],
        "merge.weights": [1.0, 0.5, 0.3, 0.2],
        "merge.parameters": {"density": 0.2, "lambda": 1.5},
        "merge.grpo_inits": ["sft", "base"],
    },
    {"merge.method": "dare_ties", "merge.members": ["base", "sft-ja"], "merge.parameters": {"density": 1.0}},
]


@pytest.mark.parametrize("change", VALID_MERGES, ids=[c["merge.method"] for c in VALID_MERGES])
def test_each_merge_method_accepts_what_it_needs(tiny, tmp_path, change):
    data = copy.deepcopy(tiny)
    for dotted, value in change.items():
        _set(data, dotted, value)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_params(path).merge.method == change["merge.method"]


def test_check_params_command_prints_the_broken_key(tiny, tmp_path):
    data = copy.deepcopy(tiny)
    data["grpo"]["clip_high"] = 0.05
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "check-params", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "grpo.clip_high: must be >= clip_low (0.2), got 0.05" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_params_files_are_clear_errors(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.slow
def test_the_paper_profile_validates_and_a_dry_run_lists_every_stage_of_the_recipe(tmp_path):
    """`budget-align check-params` passes on the paper profile, and `dvc exp run -S profile=paper --dry --force` (in a
    copy of the repository before its first run) plans every stage of the recipe: 3 data stages per set, SFT and
    GRPO per language, the merge, and the evaluation of every regime in every language. (`--dry` alone stops at the
    first stage whose inputs do not exist yet, iterative/dvc#9818, and so does a dvc.lock whose outputs are not in
    the cache.)"""
    paper = compose(tmp_path, "profile=paper")
    check = subprocess.run(
        [sys.executable, "-m", "budget_alignment.cli", "check-params", str(paper)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "valid (paper profile" in check.stdout, check.stderr
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file() and name != "dvc.lock":
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for command in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=copy, check=True, capture_output=True)
    dvc = str(Path(sys.executable).parent / "dvc")
    result = subprocess.run(
        [dvc, "exp", "run", "-S", "profile=paper", "--dry", "--force"],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")}
    params = load_params(paper)
    langs, regimes = params.languages, params.evaluation.regimes
    expected = {"base_model", "merge", "score", "report"}
    expected |= {"ingest", "translate", "normalize", "problems", "grpo_data"}
    expected |= {f"sft@{lang}" for lang in langs} | {f"grpo@{i}-{lang}" for i in ("base", "sft") for lang in langs}
    expected |= {f"generate@{r}" for r in regimes}
    assert expected <= planned, sorted(expected - planned)
