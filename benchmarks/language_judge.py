"""Benchmark of the language judge on parallel multilingual math problems (PolyMath, MGSM): who is counted as
following, per kind of completion and per target language, against langdetect and lingua on the whole text.

    .venv/bin/python benchmarks/language_judge.py --data ../shared/data                  # the report split
    .venv/bin/python benchmarks/language_judge.py --data ../shared/data --split tune     # what the judge was tuned on
    .venv/bin/python benchmarks/language_judge.py --data ../shared/data --targets ja fr es --methods judge \
        --score-cli 5000                                  # + `budget-align score` start to end on 5,000 completions
    .venv/bin/python benchmarks/language_judge.py --data ../shared/data --split tune --neighbours  # languages.py

Completions are built deterministically (seeded) from problem texts used as the reasoning: `<think>` (left out one
time in five, as when the chat template opens it), the reasoning, `</think>`, an answer sentence in the target
language with `\\boxed{}`. Five kinds, by what the reasoning is:

- `target`: the problem in the target language (must be counted as following);
- `english`: the same problem in English (one-line problems such as "Compute $...$" included);
- `neighbour`: the same problem in a neighbour language (Portuguese, Italian or French for Spanish, Chinese or Korean
  for Japanese, ...);
- `half_english`: the first sentences in the target language, the rest in English (about half and half; a one-sentence
  problem is followed by its English sentence);
- `switched`: one sentence of a neighbour's or the English text in the middle of the target text (a Chinese sentence
  in a Japanese reasoning, an English sentence in a French one).

A `half_english` or `switched` completion is built only when the foreign part holds at least a quarter of the
reasoning (letters, a Han/kana/Hangul character counted at the English letters per character measured on PolyMath's
parallel texts): below that, "not following" would be a matter of threshold, not of fact. Problems whose target text
is the English text (the sources hold a few untranslated ones) are left out.

Splits, so that what the judge's thresholds were tuned on is not what is reported: `tune` is PolyMath low and medium;
`report` is PolyMath high and top, and the MGSM problems that are not in PolyMath low (PolyMath low is MGSM's first
125 problems). Methods, each in one process and timed after its models are loaded: the judge (`LanguageJudge` with
the default params, or `--candidates script`; both spans), langdetect top-1 on the reasoning (the authors' check),
lingua top-1 over all its languages on the whole completion. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

import budget_alignment
from budget_alignment.params import LanguageCheckParams
from budget_alignment.records import Completion, Problem, write_records
from budget_alignment.scoring.language import LanguageJudge

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("language_judge")
KINDS = ["target", "english", "neighbour", "half_english", "switched"]
TARGETS = ["ja", "fr", "es", "de", "pt", "zh", "it"]
# The languages whose text is built into a target's `neighbour` and `switched` completions, where the source has them.
NEIGHBOURS: dict[str, list[str]] = {
    "ja": ["zh", "ko"],
    "zh": ["ja", "ko"],
    "fr": ["es", "pt", "it"],
    "es": ["pt", "it", "fr"],
    "pt": ["es", "it", "fr"],
    "it": ["es", "pt", "fr"],
    "de": ["fr", "it", "id"],
}
# English letters per character of the parallel PolyMath texts (low and medium, math removed): how much a character
# of these scripts says, for the size of a foreign part (Latin-script languages: 0.8-0.95, counted as 1).
LETTERS_PER_CHARACTER = {"zh": 3.0, "ja": 2.0, "ko": 2.2}
MIN_FOREIGN_SHARE = 0.25
# Answer sentences ({box} is `$\\boxed{answer}$`); the reasoning is what each kind varies.
ANSWERS: dict[str, tuple[str, ...]] = {
    "ja": ("したがって、答えは {box} です。", "答え：{box}", "よって、求める値は {box} である。"),
    "zh": ("因此，答案是 {box}。", "答案：{box}", "所以所求的值为 {box}。"),
    "fr": ("La réponse est donc {box}.", "Réponse : {box}", "Ainsi, la valeur cherchée est {box}."),
    "es": ("Por lo tanto, la respuesta es {box}.", "Respuesta: {box}", "Así, el valor buscado es {box}."),
    "pt": ("Portanto, a resposta é {box}.", "Resposta: {box}", "Assim, o valor procurado é {box}."),
    "it": ("Quindi la risposta è {box}.", "Risposta: {box}", "Perciò il valore cercato è {box}."),
    "de": ("Die Antwort ist also {box}.", "Antwort: {box}", "Somit ist der gesuchte Wert {box}."),
    # For measuring neighbours, every Latin-script language of the data is a target:
    "en": ("So the answer is {box}.", "Answer: {box}", "Therefore, the value we want is {box}."),
    "id": ("Jadi, jawabannya adalah {box}.", "Jawaban: {box}", "Dengan demikian, nilai yang dicari adalah {box}."),
    "ms": ("Jadi, jawapannya ialah {box}.", "Jawapan: {box}", "Oleh itu, nilai yang dicari ialah {box}."),
    "sw": ("Kwa hiyo, jibu ni {box}.", "Jibu: {box}", "Hivyo, thamani inayotafutwa ni {box}."),
    "vi": ("Vậy đáp án là {box}.", "Đáp án: {box}", "Do đó, giá trị cần tìm là {box}."),
}


# --- the data --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parallel:
    """One problem in every language a source has it in: `texts[lang]`, and its answer."""

    source: str
    id: str
    texts: dict[str, str]
    answer: str


def _polymath(data: Path, levels: Iterable[str]) -> list[Parallel]:
    folder = data / "polymath"
    langs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    problems: list[Parallel] = []
    for level in levels:
        rows = {
            lang: [
                json.loads(line) for line in (folder / lang / f"{level}.jsonl").open(encoding="utf-8") if line.strip()
            ]
            for lang in langs
        }
        for index, english in enumerate(rows["en"]):
            texts = {lang: rows[lang][index]["question"] for lang in langs}
            problems.append(Parallel(f"polymath-{level}", f"{level}-{index}", texts, str(english["answer"])))
    return problems


def _mgsm(data: Path, exclude: set[str]) -> list[Parallel]:
    folder = data / "mgsm"
    columns = {
        path.stem.removeprefix("mgsm_"): [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]
        for path in sorted(folder.glob("mgsm_*.tsv"))
    }
    problems = []
    for index, (question, answer) in enumerate(columns["en"]):
        if question.strip() in exclude:
            continue
        texts = {lang: rows[index][0] for lang, rows in columns.items()}
        problems.append(Parallel("mgsm", f"mgsm-{index}", texts, answer.strip()))
    return problems


def load_split(data: Path, split: str) -> list[Parallel]:
    if split == "tune":
        return _polymath(data, ["low", "medium"])
    low = {problem.texts["en"].strip() for problem in _polymath(data, ["low"])}
    return _polymath(data, ["high", "top"]) + _mgsm(data, low)


# --- building completions --------------------------------------------------------------------------------------------

# Sentence ends outside math: the math is masked first, so that `$x.y$` or `\[...\]` never splits a sentence.
_MATH = re.compile(r"\$\$.*?\$\$|\$(?:\\.|[^$\\])+\$|\\\[.*?\\\]|\\\(.*?\\\)", re.S)
_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_LANGUAGE_CHARACTERS = re.compile(r"[^\W\d_]")


def sentences(text: str) -> list[str]:
    masked = _MATH.sub(lambda m: "\0" * len(m.group()), text)
    cuts = [0, *(m.end() for m in _END.finditer(masked)), len(text)]
    return [text[a:b].strip() for a, b in itertools.pairwise(cuts) if text[a:b].strip()]


def size(text: str, lang: str) -> float:
    """Letters outside math, a character of a wide script weighted by LETTERS_PER_CHARACTER (judge-independent)."""
    return len(_LANGUAGE_CHARACTERS.findall(_MATH.sub(" ", text))) * LETTERS_PER_CHARACTER.get(lang, 1.0)


def joiner(lang: str) -> str:
    return "" if lang in LETTERS_PER_CHARACTER else " "


@dataclass(frozen=True)
class Item:
    kind: str
    target: str
    other: str  # the foreign language of the reasoning ("" for the target kind)
    problem: Parallel
    reasoning: str
    text: str

    @property
    def following(self) -> bool:
        return self.kind == "target"


def _half_english(target_text: str, english_text: str, lang: str) -> tuple[str, str]:
    """(reasoning, its English part): the first half of the target's sentences, then the rest in English."""
    ours, theirs = sentences(target_text), sentences(english_text)
    if len(ours) < 2 or len(theirs) < 2:
        # One sentence each: the target sentence, then the same sentence in English (a model restating itself).
        return f"{target_text.strip()}\n{english_text.strip()}", english_text.strip()
    half = len(ours) // 2
    english = " ".join(theirs[min(half, len(theirs) - 1) :])
    return f"{joiner(lang).join(ours[:half])}\n{english}", english


def _switched(target_text: str, foreign_text: str, rng: random.Random) -> tuple[str, str] | None:
    """(reasoning, its foreign sentence): one sentence of the foreign text between two parts of the target's."""
    ours, theirs = sentences(target_text), sentences(foreign_text)
    if not theirs:
        return None
    foreign = rng.choice(theirs)
    if len(ours) < 2:
        return f"{target_text.strip()}\n{foreign}\n{target_text.strip()}", foreign
    cut = rng.randint(1, len(ours) - 1)
    return "\n".join([*ours[:cut], foreign, *ours[cut:]]), foreign


def build(
    problems: list[Parallel],
    targets: list[str],
    seed: int,
    kinds: set[str] | None = None,
    neighbours: list[str] | None = None,
) -> list[Item]:
    """The completions of every kind (or of `kinds`), the foreign languages from NEIGHBOURS (or `neighbours`)."""
    rng = random.Random(seed)
    items: list[Item] = []
    for problem in problems:
        texts = problem.texts
        for target in targets:
            if target not in texts or texts[target].strip() == texts["en"].strip():
                continue  # an untranslated problem (the sources hold a few) is no target-language text
            near = [lang for lang in (neighbours or NEIGHBOURS[target]) if lang in texts]
            # PolyMath writes some answers as math ("${2, -2}$"): in the box, without their own dollars.
            box = f"$\\boxed{{{problem.answer.replace('$', '')}}}$"
            answer = rng.choice(ANSWERS[target]).format(box=box)
            reasonings = [("target", "", texts[target]), ("english", "en", texts["en"])]
            if near:
                neighbour = rng.choice(near)
                reasonings.append(("neighbour", neighbour, texts[neighbour]))
            mixed, english = _half_english(texts[target], texts["en"], target)
            if _foreign_share(mixed, english, target, "en") >= MIN_FOREIGN_SHARE:
                reasonings.append(("half_english", "en", mixed))
            other = rng.choice([*near, "en"])
            switched = _switched(texts[target], texts[other], rng)
            if switched and _foreign_share(switched[0], switched[1], target, other) >= MIN_FOREIGN_SHARE:
                reasonings.append(("switched", other, switched[0]))
            for kind, language, reasoning in reasonings:
                opening = "<think>\n" if rng.random() < 0.8 else ""  # a chat template may open the reasoning itself
                if kinds is None or kind in kinds:
                    text = f"{opening}{reasoning.strip()}\n</think>\n\n{answer}"
                    items.append(Item(kind, target, language, problem, reasoning, text))
    return items


def _foreign_share(reasoning: str, foreign: str, target: str, other: str) -> float:
    """The foreign part's share of the reasoning's size."""
    foreign_size = size(foreign, other)
    target_size = size(reasoning.replace(foreign, " ", 1), target)
    total = foreign_size + target_size
    return foreign_size / total if total else 0.0


# --- methods ---------------------------------------------------------------------------------------------------------


def judge_method(params: LanguageCheckParams) -> Callable[[Item], bool]:
    judge = LanguageJudge(params)
    return lambda item: judge.judge(item.text, item.target).following


def langdetect_method() -> Callable[[Item], bool]:
    """The authors' check: langdetect's top language of the reasoning is the requested one."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0

    def follows(item: Item) -> bool:
        try:
            return detect(item.reasoning).split("-")[0] == item.target
        except LangDetectException:  # no letters at all
            return False

    return follows


def lingua_whole_method() -> Callable[[Item], bool]:
    """lingua over all its languages, top-1 on the whole completion."""
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()

    def follows(item: Item) -> bool:
        detected = detector.detect_language_of(item.text)
        return detected is not None and detected.iso_code_639_1.name.lower() == item.target

    return follows


@dataclass
class Result:
    name: str
    verdicts: list[bool]
    seconds: float
    setup_seconds: float


def run_method(name: str, make: Callable[[], Callable[[Item], bool]], items: list[Item]) -> Result:
    started = time.perf_counter()
    follows = make()
    # Load what the method loads lazily (models per language) before the clock starts.
    for item in {(i.target, i.kind): i for i in items}.values():
        follows(item)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    verdicts = [follows(item) for item in items]
    return Result(name, verdicts, time.perf_counter() - started, setup)


# --- measuring neighbours --------------------------------------------------------------------------------------------

MAX_LEAK = 0.05
# Shorter texts cannot be told from a neighbour by anyone: a one-word problem is the short-text question, not this.
NEIGHBOUR_MIN_LETTERS = 20


def measure_neighbours(problems: list[Parallel], seed: int) -> dict[str, list[str]]:
    """languages.py's neighbour table: the languages confused with a target, either way. X is confused with T when
    the judge, with lingua choosing among T and English only, accepts more than MAX_LEAK of X's problem texts (used
    as the reasoning, of NEIGHBOUR_MIN_LETTERS or more) as T; then each is the other's neighbour."""
    from budget_alignment import languages

    latin = languages.same_script_languages("en")
    langs = sorted({lang for problem in problems for lang in problem.texts} & latin)
    confused: dict[str, set[str]] = {lang: set() for lang in langs}
    for target in langs:
        languages._NEIGHBOURS[target] = ()  # English only
        judge = LanguageJudge()
        for other in langs:
            if other in (target, "en"):
                continue
            items = [
                i
                for i in build(problems, [target], seed, kinds={"neighbour"}, neighbours=[other])
                if i.other and size(i.reasoning, other) >= NEIGHBOUR_MIN_LETTERS
            ]
            leak = sum(judge.judge(i.text, target).following for i in items) / max(1, len(items))
            log.info("%s read as %s: %.3f", other, target, leak)
            if leak > MAX_LEAK:
                confused[target].add(other)
                confused[other].add(target)
    return {lang: sorted(confused[lang]) for lang in langs}


# --- `budget-align score` end to end ---------------------------------------------------------------------------------


def score_command() -> str:
    """The command that scores a pair of record files: `score-files`, or `score` in checkouts from before it split."""
    from budget_alignment import cli

    names = {command.name for command in cli.app.registered_commands}
    return "score-files" if "score-files" in names else "score"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_score_command(
    items: list[Item], n: int, seed: int, folder: Path, params_file: Path, ks: list[int] | None
) -> tuple[float, float, dict]:
    """Write N completions (one per problem and language) and their problems; time `budget-align score` on them."""
    rng = random.Random(seed)
    chosen = rng.sample(items, n) if n <= len(items) else rng.choices(items, k=n)
    problems: dict[str, Problem] = {}
    completions = []
    for index, item in enumerate(chosen):
        problem_id = f"{item.problem.id}-{item.target}-{index}"
        problems[problem_id] = Problem(
            id=problem_id,
            dataset=item.problem.source,
            lang=item.target,
            question=item.problem.texts[item.target],
            answer=item.problem.answer,
            answer_type="math",
        )
        completions.append(
            Completion(
                problem_id=problem_id,
                model="benchmark",
                lang=item.target,
                sample=0,
                text=item.text,
                tokens=len(item.text) // 4,
                finish_reason="stop",
            )
        )
    write_records(folder / "problems.jsonl", list(problems.values()))
    write_records(folder / "completions.jsonl", completions)
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    params["tracking"]["enabled"] = False  # the scoring, not MLflow's start-up
    if ks:
        params["evaluation"]["k"] = ks
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    command = shutil.which("budget-align", path=str(Path(sys.executable).parent)) or "budget-align"
    # The command runs the code this benchmark imported (a checkout's src/ on PYTHONPATH), wherever it is installed.
    source = str(Path(budget_alignment.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])}
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    done = subprocess.run(
        [
            command,
            score_command(),
            "problems.jsonl",
            "completions.jsonl",
            "--out",
            "scores.jsonl",
            "--params",
            "params.yaml",
        ],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds, cpu = time.perf_counter() - started, children_cpu_seconds() - cpu_started
    if done.returncode:
        raise SystemExit(f"budget-align score failed:\n{done.stdout}{done.stderr}")
    return seconds, cpu, json.loads((folder / "scores.metrics.json").read_text(encoding="utf-8"))


# --- the report ------------------------------------------------------------------------------------------------------


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}% ({part}/{whole})" if whole else "-"


def report(items: list[Item], results: list[Result]) -> None:
    n = len(items)
    print("| method | right | target rejected | wrong language accepted | completions/s | set-up (s) |")
    print("|---|---|---|---|---|---|")
    for result in results:
        right = sum(v == item.following for v, item in zip(result.verdicts, items, strict=True))
        targets = [v for v, item in zip(result.verdicts, items, strict=True) if item.following]
        wrong = [v for v, item in zip(result.verdicts, items, strict=True) if not item.following]
        print(
            f"| {result.name} | {percent(right, n)} | {percent(targets.count(False), len(targets))} "
            f"| {percent(wrong.count(True), len(wrong))} | {n / result.seconds:,.0f} | {result.setup_seconds:.1f} |"
        )
    print("\nCounted as following, per kind (the target kind must be; every other kind must not):\n")
    names = [r.name for r in results]
    print(f"| kind | completions | {' | '.join(names)} |")
    print(f"|---|---|{'---|' * len(names)}")
    groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[(item.kind,)].append(index)
        groups[(item.kind, f"{item.other} for {item.target}" if item.other else item.target)].append(index)
        if item.kind == "english" and size(item.reasoning, "en") < 30:
            groups[(item.kind, "short (< 30 letters)")].append(index)
    order = {kind: position for position, kind in enumerate(KINDS)}
    for key in sorted(groups, key=lambda k: (order[k[0]], len(k), k)):
        indices = groups[key]
        label = key[0] if len(key) == 1 else f"{key[0]}: {key[1]}"
        cells = [percent(sum(r.verdicts[i] for i in indices), len(indices)) for r in results]
        print(f"| {label} | {len(indices)} | {' | '.join(cells)} |")
    print("\nRight, per target language:\n")
    print(f"| target | completions | {' | '.join(names)} |")
    print(f"|---|---|{'---|' * len(names)}")
    by_target: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_target[item.target].append(index)
    for target, indices in sorted(by_target.items()):
        cells = [percent(sum(r.verdicts[i] == items[i].following for i in indices), len(indices)) for r in results]
        print(f"| {target} | {len(indices)} | {' | '.join(cells)} |")


def show_errors(items: list[Item], result: Result, limit: int) -> None:
    wrong = [item for v, item in zip(result.verdicts, items, strict=True) if v != item.following]
    print(f"\n{result.name}: {len(wrong)} wrong; by kind {dict(Counter((i.kind, i.other, i.target) for i in wrong))}")
    for item in wrong[:limit]:
        print(f"--- {item.kind} {item.other}->{item.target} {item.problem.id}\n{item.text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="PolyMath and MGSM")
    parser.add_argument("--split", choices=["tune", "report"], default="report")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--candidates", choices=["neighbours", "script"], help="the judge's (default: params' default)"
    )
    parser.add_argument("--methods", nargs="+", default=["judge", "langdetect", "lingua-whole"])
    parser.add_argument("--score-cli", type=int, default=0, help="also time `budget-align score` on N completions")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="for `budget-align score`")
    parser.add_argument("--k", type=int, nargs="+", help="evaluation.k for `budget-align score` (default: params)")
    parser.add_argument("--errors", type=int, default=0, help="print the judge's first N errors")
    parser.add_argument("--neighbours", action="store_true", help="measure languages.py's neighbour table and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    problems = load_split(args.data, args.split)
    if args.neighbours:
        for lang, near in measure_neighbours(problems, args.seed).items():
            print(f'    "{lang}": {tuple(n for n in near if n != "en")!r},')  # languages.py's _NEIGHBOURS
        return 0
    items = build(problems, args.targets, args.seed)
    makers = {
        "judge": lambda: judge_method(
            LanguageCheckParams(**({"candidates": args.candidates} if args.candidates else {}))
        ),
        "langdetect": langdetect_method,
        "lingua-whole": lingua_whole_method,
    }
    labels = {
        "judge": "the judge (`LanguageJudge`, both spans)",
        "langdetect": "langdetect top-1 on the reasoning",
        "lingua-whole": "lingua top-1 (all languages) on the whole text",
    }
    print(
        f"{len(items):,} completions from {len(problems):,} problems ({args.split} split), targets "
        f"{', '.join(args.targets)}, seed {args.seed}; one process\n"
    )
    results = [run_method(labels[name], makers[name], items) for name in args.methods]
    report(items, results)
    if args.errors:
        show_errors(items, results[0], args.errors)
    if args.score_cli:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as folder:
            seconds, cpu, metrics = time_score_command(
                items, args.score_cli, args.seed, Path(folder), args.params, args.k
            )
        n = args.score_cli
        left_out = sorted({name for values in metrics.values() for name in values.get("left_out", [])})
        print(
            f"\n`budget-align {score_command()}` on {n:,} completions (one sample per problem, tracking off): "
            f"{seconds:.2f} s, {n / seconds:,.0f} completions/s, start to end ({cpu:.2f} CPU seconds, load average "
            f"before {load:.2f}); pass@k left out: {', '.join(left_out) or 'none'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
