"""Benchmark of the score stage against the authors' language check (langdetect top-1 on the whole completion).

    .venv/bin/python benchmarks/scoring.py            # 10,000 completions of ~8,000 characters, all cores
    .venv/bin/python benchmarks/scoring.py --n 1000   # quicker

1. Generates N synthetic completions (deterministic from --seed): Japanese, French and Spanish chains of about
   2,000 tokens with inline and display LaTeX, about a fifth drifting into English half-way, a boxed answer
   (sometimes wrong, sometimes with a decimal comma, sometimes a choice letter).
2. Times the score stage (evaluation/score.py: answers, language, format, metrics; files in and out) over a
   process pool on every core, and the authors' method on the same texts over a pool of the same size.
3. Measures both methods on the language case table (tests/cases/language.yaml): a case is right when the
   method's "following" verdict equals the expected one (reasoning and answer both in the language).

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from budget_alignment.evaluation.score import score_paths
from budget_alignment.params import ScoringParams
from budget_alignment.records import Completion, Problem, write_records
from budget_alignment.scoring.language import LanguageJudge

ROOT = Path(__file__).resolve().parents[1]
LANGUAGE_CASES = ROOT / "tests" / "cases" / "language.yaml"
TARGET_CHARS = 8000
SAMPLES_PER_PROBLEM = 10
KS = [1, 5, 10]

# Sentence templates; {a} {b} {c} are numbers, {m} an inline formula.
SENTENCES: dict[str, list[str]] = {
    "ja": [
        "まず、問題の条件を整理してみましょう。",
        "ここで $x$ を求める値とすると、{m} という式が成り立ちます。",
        "両辺から {a} を引くと、残りは {b} になります。",
        "この結果を元の式に代入して、計算が正しいかどうかを確認します。",
        "次に、{a} 個の箱にそれぞれ {b} 個ずつ入っているので、全部で {c} 個です。",
        "ただし、この方法では条件を一つ見落としている可能性があります。",
        "念のため、別の方法でも同じ答えになるかを確かめてみます。",
        "因数分解すると {m} となり、解は二つ得られます。",
        "長さは正の数でなければならないので、負の解は除外します。",
        "したがって、求める値は {c} であると考えられます。",
        "もう一度問題文を読み直すと、単位はセンチメートルで答える必要があります。",
        "三角形の面積は底辺と高さの積の半分なので、{m} です。",
        "確率を求めるには、起こりうるすべての場合の数を数える必要があります。",
        "この数列は公差 {a} の等差数列になっていることがわかります。",
    ],
    "fr": [
        "Commençons par reformuler l'énoncé avec nos propres mots.",
        "Notons $x$ la quantité cherchée ; on obtient alors l'équation {m}.",
        "En soustrayant {a} des deux côtés, il reste {b}.",
        "Vérifions ce résultat en le remplaçant dans l'équation de départ.",
        "Il y a {a} boîtes contenant chacune {b} billes, soit {c} billes au total.",
        "Attention cependant, nous avons peut-être oublié une condition de l'énoncé.",
        "Pour plus de sûreté, refaisons le calcul par une autre méthode.",
        "En factorisant, on obtient {m}, ce qui donne deux solutions.",
        "Une longueur est forcément positive, donc on écarte la solution négative.",
        "Par conséquent, la valeur recherchée semble bien être {c}.",
        "En relisant l'énoncé, on remarque que la réponse doit être donnée en centimètres.",
        "L'aire d'un triangle vaut la moitié du produit de la base par la hauteur, soit {m}.",
        "Pour calculer la probabilité, il faut dénombrer tous les cas possibles.",
        "Cette suite est arithmétique de raison {a}, comme on le voit sur les premiers termes.",
    ],
    "es": [
        "Empecemos por reformular el enunciado con nuestras propias palabras.",
        "Sea $x$ la cantidad buscada; entonces se cumple la ecuación {m}.",
        "Restando {a} en ambos lados, nos queda {b}.",
        "Comprobemos este resultado sustituyéndolo en la ecuación original.",
        "Hay {a} cajas con {b} canicas cada una, es decir, {c} canicas en total.",
        "Sin embargo, es posible que hayamos pasado por alto una condición del problema.",
        "Para estar seguros, repitamos el cálculo con otro método.",
        "Al factorizar obtenemos {m}, lo que da dos soluciones.",
        "Una longitud siempre es positiva, así que descartamos la solución negativa.",
        "Por lo tanto, el valor buscado parece ser {c}.",
        "Al releer el enunciado, vemos que la respuesta debe darse en centímetros.",
        "El área de un triángulo es la mitad del producto de la base por la altura, es decir, {m}.",
        "Para calcular la probabilidad hay que contar todos los casos posibles.",
        "Esta sucesión es aritmética con diferencia {a}, como se ve en los primeros términos.",
    ],
    "en": [
        "Let me restate the problem in my own words before going further.",
        "Let $x$ be the unknown quantity, so that {m} holds.",
        "Subtracting {a} from both sides leaves {b}.",
        "Now I should check this result by substituting it back into the original equation.",
        "There are {a} boxes with {b} marbles each, which makes {c} marbles in total.",
        "Wait, I may have missed one of the conditions in the statement.",
        "To be safe, let me redo the computation with a different method.",
        "Factoring gives {m}, which yields two solutions.",
        "A length must be positive, so the negative solution is discarded.",
        "So the value we are looking for seems to be {c}.",
    ],
}
ANSWERS: dict[str, str] = {
    "ja": "したがって、答えは $\\boxed{{{answer}}}$ です。",
    "fr": "La réponse est donc $\\boxed{{{answer}}}$.",
    "es": "Por lo tanto, la respuesta es $\\boxed{{{answer}}}$.",
}
FORMULAS = [
    "{a}x + {b} = {c}",
    "(x - {a})(x + {b}) = 0",
    "\\frac{{{a} \\times {b}}}{{2}} = {c}",
    "x^2 - {a}x + {b} = 0",
]
DISPLAY = "\n$$\\sum_{{k=1}}^{{{a}}} k = \\frac{{{a}({a}+1)}}{{2}} = {c}$$\n"


def _sentence(rng: random.Random, lang: str) -> str:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    numbers = {"a": a, "b": b, "c": a * b}
    formula = rng.choice(FORMULAS).format(**numbers)
    return rng.choice(SENTENCES[lang]).format(m=f"${formula}$", **numbers)


def _chain(rng: random.Random, lang: str, drift: bool) -> str:
    parts: list[str] = []
    length = 0
    while length < TARGET_CHARS:
        written = "en" if drift and length > TARGET_CHARS / 2 else lang
        piece = _sentence(rng, written)
        if rng.random() < 0.08:
            a = rng.randint(3, 40)
            piece += DISPLAY.format(a=a, c=a * (a + 1) // 2)
        parts.append(piece)
        length += len(piece) + 1
    return "\n".join(parts)


def synthetic_data(n: int, seed: int) -> tuple[list[Problem], list[Completion], list[bool]]:
    """Problems, completions and, per completion, whether it was written to drift into English."""
    rng = random.Random(seed)
    problems: list[Problem] = []
    completions: list[Completion] = []
    drifted: list[bool] = []
    for index in range(max(1, n // SAMPLES_PER_PROBLEM)):
        lang = ("ja", "fr", "es")[index % 3]
        choice = index % 5 == 4
        gold = rng.choice("ABCD") if choice else str(rng.randint(1, 500))
        problem = Problem(
            id=f"p{index}",
            dataset="synthetic_choice" if choice else "synthetic_math",
            lang=lang,
            question="...",
            answer=gold,
            answer_type="choice" if choice else "math",
            choices={letter: f"option {letter}" for letter in "ABCD"} if choice else None,
        )
        problems.append(problem)
        for sample in range(SAMPLES_PER_PROBLEM):
            drift = rng.random() < 0.2
            if choice:
                answer = gold if rng.random() < 0.6 else rng.choice("ABCD")
            elif rng.random() < 0.5:
                answer = gold
            elif lang != "ja" and rng.random() < 0.5:
                answer = f"{gold},0"  # the decimal comma: still right
            else:
                answer = str(rng.randint(1, 500))
            text = f"<think>\n{_chain(rng, lang, drift)}\n</think>\n\n{ANSWERS[lang].format(answer=answer)}"
            completions.append(
                Completion(
                    problem_id=problem.id,
                    model="synthetic",
                    lang=lang,
                    sample=sample,
                    text=text,
                    tokens=len(text) // 4,
                    finish_reason="stop",
                )
            )
            drifted.append(drift)
    return problems, completions, drifted


# --- the authors' method -------------------------------------------------------------------------------------------


def langdetect_follows(text: str, lang: str) -> bool:
    """The authors' check: langdetect's top language of the whole completion is the requested one."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        detected = detect(text)
    except LangDetectException:  # no letters at all
        return False
    return detected.split("-")[0] == lang


def _langdetect_chunk(jobs: list[tuple[str, str]]) -> list[bool]:
    return [langdetect_follows(text, lang) for text, lang in jobs]


def langdetect_all(jobs: list[tuple[str, str]], workers: int) -> list[bool]:
    size = max(1, len(jobs) // (workers * 8) + 1)
    chunks = [jobs[start : start + size] for start in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [verdict for chunk in pool.map(_langdetect_chunk, chunks) for verdict in chunk]


# --- running -------------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once it has shut down)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def case_accuracy(cases: list[dict]) -> tuple[float, float]:
    judge = LanguageJudge()
    ours = [judge.judge(case["text"], case["lang"]).following == (case["think"] and case["answer"]) for case in cases]
    theirs = [langdetect_follows(case["text"], case["lang"]) == (case["think"] and case["answer"]) for case in cases]
    return sum(ours) / len(cases), sum(theirs) / len(cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of completions (default 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    args = parser.parse_args(argv)
    workers = args.workers or os.cpu_count() or 1

    load_before = os.getloadavg()[0]
    problems, completions, drifted = synthetic_data(args.n, args.seed)
    chars = sum(len(c.text) for c in completions) / len(completions)
    scoring = ScoringParams(workers=workers)
    with tempfile.TemporaryDirectory() as folder:
        problems_path, completions_path = Path(folder, "problems.jsonl"), Path(folder, "completions.jsonl")
        write_records(problems_path, problems)
        write_records(completions_path, completions)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        metrics = score_paths(problems_path, completions_path, Path(folder, "scores.jsonl"), scoring, KS)
        ours_s, ours_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        scores = [line for line in Path(folder, "scores.jsonl").read_text(encoding="utf-8").splitlines() if line]

    started, cpu_started = time.perf_counter(), cpu_seconds()
    theirs = langdetect_all([(c.text, c.lang) for c in completions], workers)
    theirs_s, theirs_cpu = time.perf_counter() - started, cpu_seconds() - cpu_started

    following = [json.loads(line)["following"] for line in scores]
    ours_drift = sum(not f for f, d in zip(following, drifted, strict=True) if d) / max(1, sum(drifted))
    ours_clean = sum(f for f, d in zip(following, drifted, strict=True) if not d) / max(1, len(drifted) - sum(drifted))
    theirs_drift = sum(not f for f, d in zip(theirs, drifted, strict=True) if d) / max(1, sum(drifted))
    theirs_clean = sum(f for f, d in zip(theirs, drifted, strict=True) if not d) / max(1, len(drifted) - sum(drifted))

    cases = yaml.safe_load(LANGUAGE_CASES.read_text(encoding="utf-8"))
    ours_cases, theirs_cases = case_accuracy(cases)

    n = len(completions)
    print(
        f"{n} synthetic completions, {chars:,.0f} characters on average; {workers} worker processes; "
        f"load average before the run {load_before:.2f}\n"
    )
    # Cores used = CPU seconds / wall seconds: below the worker count when other processes share the machine.
    print(
        "| method | completions/s | CPU ms per completion | cores used | drifting chains caught | clean chains passed "
        "| language cases right |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = [
        ("budget-align score (answers + language + format + metrics)", ours_s, ours_cpu, ours_drift, ours_clean),
        ("langdetect top-1 on the whole completion (language only)", theirs_s, theirs_cpu, theirs_drift, theirs_clean),
    ]
    for (name, wall, cpu, drift, clean), right in zip(rows, (ours_cases, theirs_cases), strict=True):
        print(
            f"| {name} | {n / wall:,.0f} | {cpu / n * 1e3:.1f} | {cpu / wall:.2f} | {drift:.1%} | {clean:.1%} "
            f"| {right:.1%} ({len(cases)} cases) |"
        )
    print()
    for dataset, values in metrics.items():
        shown = ", ".join(f"{key} {value:.3f}" for key, value in values.items() if isinstance(value, float))
        print(f"- {dataset}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
