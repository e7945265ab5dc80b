"""dvc.yaml against the code: every stage tracks exactly the params keys it reads (stages.py), lists every project
module its command imports (walked statically, imports inside functions included) and the bundled data it reads,
and runs the command that has its name.

If a test here fails after a change of imports, print what a stage needs with
`.venv/bin/python tests/test_stages.py STAGE` and update its `deps` in dvc.yaml.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "budget_alignment"
CLI = SRC / PACKAGE / "cli.py"


def module_file(module: str) -> Path | None:
    """The source file of a project module (a package's __init__.py), or None for another package's module."""
    if module != PACKAGE and not module.startswith(f"{PACKAGE}."):
        return None
    base = SRC / module.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(nodes: list[ast.AST], current: str) -> set[str]:
    """Project modules imported anywhere under `nodes` (`from x import y` counts y when y is a module)."""
    found: set[str] = set()
    package = (
        current if module_file(current) and module_file(current).name == "__init__.py" else current.rpartition(".")[0]
    )
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    parts = package.split(".")[: len(package.split(".")) - sub.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in sub.names)
    return {name for name in found if module_file(name)}


def with_parents(modules: set[str]) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py too."""
    result = set(modules)
    for module in modules:
        parts = module.split(".")
        result.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return result


@cache
def module_closure(module: str) -> frozenset[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        tree = ast.parse(module_file(current).read_text(encoding="utf-8"))
        todo.extend(with_parents(imported_modules([tree], current)) - seen)
    return frozenset(seen)


def command_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    commands = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "command":
                    commands[decorator.args[0].value] = node
    return commands


def command_modules(command: str) -> set[str]:
    """What running `budget-align COMMAND` imports: cli.py's module level, the command and the cli functions it calls
    (their own imports included), and everything those modules import in turn."""
    tree = ast.parse(CLI.read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    # The error handling every command runs through.
    reached, todo = {"OneLineErrors"}, [command_functions()[command].name, "OneLineErrors"]
    while todo:
        name = todo.pop()
        reached.add(name)
        for sub in ast.walk(functions[name]):
            if isinstance(sub, ast.Name) and sub.id in functions and sub.id not in reached:
                todo.append(sub.id)
    modules = imported_modules([*top_level, *(functions[name] for name in reached)], f"{PACKAGE}.cli")
    closure = set(module_closure(f"{PACKAGE}.cli")) & {f"{PACKAGE}", f"{PACKAGE}.cli"}
    for module in with_parents(modules) | {f"{PACKAGE}.cli"}:
        closure |= module_closure(module) if module != f"{PACKAGE}.cli" else {module, PACKAGE}
    return closure


def needed_files(command: str) -> set[str]:
    return {str(module_file(m).relative_to(REPO)) for m in command_modules(command)}


# --- dvc.yaml as DVC reads it ----------------------------------------------------------------------------------------


@cache
def dvc_stages() -> dict[str, dict]:
    """Every expanded stage of dvc.yaml: its command, dep paths and params keys."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {}
        for stage in repo.index.stages:
            params = [key for dep in stage.deps if hasattr(dep, "params") for key in (dep.params or [])]
            deps = [dep.def_path for dep in stage.deps if not hasattr(dep, "params")]
            outs = [out.def_path for out in stage.outs]
            stages[stage.addressing] = {"cmd": stage.cmd, "deps": deps, "params": params, "outs": outs}
    return stages


def instance_of(name: str, cmd: str) -> tuple[str, dict[str, str]]:
    """(stage, instance fields) from a DVC stage's command (`budget-align grpo sft ja`)."""
    from budget_alignment.stages import STAGES

    words = cmd.split()[1:]
    stage = words[0].replace("-", "_")
    assert stage in STAGES, f"{name}: `{cmd}` is no stage command"
    return stage, dict(zip(STAGES[stage].arguments, words[1:], strict=True))


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_every_stage_runs_the_command_of_its_name():
    for name, stage in dvc_stages().items():
        kind, _ = instance_of(name, stage["cmd"])
        assert name.partition("@")[0] == kind, (name, stage["cmd"])


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_every_stage_tracks_exactly_the_params_it_reads(name):
    from budget_alignment.cli import stage_keys
    from budget_alignment.params import load_params

    stage = dvc_stages()[name]
    kind, instance = instance_of(name, stage["cmd"])
    expected = stage_keys(kind, load_params(REPO / "params.yaml"), **instance)
    assert sorted(stage["params"]) == sorted(expected)


@pytest.mark.parametrize("name", sorted(dvc_stages()))
def test_every_stage_lists_every_module_its_command_imports(name):
    stage = dvc_stages()[name]
    needed = needed_files(stage["cmd"].split()[1])
    listed = {dep for dep in stage["deps"] if dep.startswith("src/") and dep.endswith(".py")}
    missing = sorted(path for path in needed if not covered(path, stage["deps"]))
    assert not missing, f"{name}: dvc.yaml misses {missing}"
    assert not sorted(listed - needed), f"{name}: dvc.yaml lists modules the command does not import"


def test_the_lock_holds_only_the_stages_of_dvc_yaml():
    """DVC keeps a removed stage's entry in dvc.lock, and every command reads the whole lock: drop it by hand."""
    import yaml

    locked = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    assert not sorted(set(locked) - set(dvc_stages())), "dvc.lock holds stages that dvc.yaml no longer defines"


def test_training_and_generation_depend_only_on_their_languages_data():
    """The data stages run over every language in one process, but their outputs are one file per language: a stage
    that trains or generates for a language depends on that language's files only, so a change to another language's
    data (e.g. `-S normalize.ja.<rule>=...`, which changes only the Japanese files) reruns none of it."""
    per_language = ("data/normalized/", "data/problems/", "data/grpo/", "data/translated/")
    checked = 0
    for name, stage in dvc_stages().items():
        kind, instance = instance_of(name, stage["cmd"])
        if kind not in ("sft", "topup", "grpo"):
            continue
        lang = instance["lang"]
        data = [dep for dep in stage["deps"] if dep.startswith(tuple(p.rstrip("/") for p in per_language))]
        assert data, f"{name} reads no language data"
        for dep in data:
            assert dep.startswith(per_language) and (
                f"/{lang}/" in dep or dep.endswith((f"/{lang}", f"/{lang}.jsonl"))
            ), f"{name} depends on {dep}, not on {lang}'s files alone"
        checked += 1
    assert checked >= 4


def test_training_reads_shared_models_or_its_languages():
    """A stage of one language depends on the base, the merge or that language's models, never on a regime's folder of
    every language (params.yaml's stage_instances name the folders: DVC's matrix cannot)."""
    checked = 0
    for name, stage in dvc_stages().items():
        kind, instance = instance_of(name, stage["cmd"])
        if kind not in ("sft", "topup", "grpo"):
            continue
        for dep in stage["deps"]:
            if dep.startswith("data/models/"):
                assert dep in ("data/models/base", "data/models/merge") or dep.endswith(f"/{instance['lang']}"), (
                    f"{name} depends on {dep}"
                )
        checked += 1
    assert checked >= 4


def test_each_regimes_generation_reads_its_models_and_the_problems():
    """generate@{regime} samples every language of the regime in one process: it depends on the problems and on the
    folders of the regime's models (and, for GRPO from SFT, of the SFT models and top-ups its adapters apply to)."""
    from budget_alignment.params import load_params

    expected = {
        "base": set(),
        "sft": {"data/models/sft"},
        "grpo_base": {"data/models/grpo_base"},
        "grpo_sft": {"data/models/sft", "data/models/topup", "data/models/grpo_sft"},
        "merge": {"data/models/merge"},
    }
    regimes = load_params(REPO / "params.yaml").evaluation.regimes
    for regime in regimes:
        stage = dvc_stages()[f"generate@{regime}"]
        models = {dep for dep in stage["deps"] if dep.startswith("data/models/")}
        assert models == expected[regime] | {"data/models/base"}, regime
        assert "data/problems" in stage["deps"] and stage["outs"] == [f"data/generations/{regime}"]
    assert len(regimes) == len(expected)


def overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def test_a_change_to_one_languages_data_reruns_that_languages_work_alone():
    """`-S normalize.ja.<rule>=...` changes the Japanese files of data/normalized/ alone (tests/test_data_stages.py).
    Walking dvc.yaml from there, as DVC does, reaches Japanese training, the merge (the Japanese SFT model is a member)
    and the stages that run over every language, and no other language's training. A stage that runs over every
    language changes only that language's files of its outputs (its outputs are one file or folder per language; the
    generate stages sample the changed language alone: tests/test_generate.py)."""
    stages = dvc_stages()
    changed = ["data/normalized/chains/ja.jsonl", "data/normalized/math/ja.jsonl"]
    reached: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, stage in stages.items():
            if name in reached or not any(overlap(dep, path) for dep in stage["deps"] for path in changed):
                continue
            reached.add(name)
            grew = True
            per_language = "lang" not in instance_of(name, stage["cmd"])[1]
            for out in stage["outs"]:
                changed += [f"{out}/ja", f"{out}/ja.jsonl"] if per_language else [out]
    of_one_language = [name for name in reached if "lang" in instance_of(name, stages[name]["cmd"])[1]]
    assert of_one_language and all(name.endswith(("-ja", "@ja")) for name in of_one_language), sorted(reached)
    assert {"sft@ja", "grpo@sft-ja", "merge", "generate@sft", "generate@merge", "report"} <= reached


def test_stages_that_read_bundled_sets_depend_on_them():
    for name, stage in dvc_stages().items():
        kind, _ = instance_of(name, stage["cmd"])
        if kind in ("base_model", "ingest", "translate"):
            assert "src/budget_alignment/data/bundled" in stage["deps"], name


if __name__ == "__main__":
    for command in sys.argv[1:]:
        print(f"# {command}")
        print("\n".join(f"      - {path}" for path in sorted(needed_files(command))))
