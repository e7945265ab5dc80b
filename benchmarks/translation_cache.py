"""Benchmark: a fully cached machine translation of 1,000 records reruns in under 5 s.

The real stage function (`translate_dataset`: cache lookups, reassembly, the data contracts, the atomic write) runs
twice with the OpenAI-compatible backend against a local chat server; the second run's wall time is the figure.

    .venv/bin/python benchmarks/translation_cache.py [--records 1000] [--limit-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# fmt: off
FRENCH = [
    "le", "la", "les", "un", "une", "de", "du", "et", "est", "dans", "avec", "pour", "sur", "pomme", "chat", "maison",
    "nous", "avons", "trouvé", "très", "bien", "alors", "donc",
]
# fmt: on


def pseudo_french(text: str) -> str:
    """A deterministic stand-in translator that keeps every marker (the network and the cache are what count)."""
    return re.sub(r"[A-Za-z]+", lambda m: FRENCH[sum(map(ord, m.group())) % len(FRENCH)], text)


def start_server() -> tuple[ThreadingHTTPServer, list[int]]:
    requests = [0]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests[0] += 1
            text = pseudo_french(body["messages"][-1]["content"])
            reply = {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": text}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, requests


# fmt: off
NAMES = [
    "Mia", "Liam", "Noah", "Emma", "Olivia", "Lucas", "Sofia", "Hugo", "Chloe", "Leo", "Ines", "Adam", "Lina",
    "Jules", "Sara", "Tom", "Nora", "Yuki", "Ken", "Aiko",
]
# fmt: on
# fmt: off
ITEMS = [
    "apples", "pears", "cows", "books", "pencils", "stamps", "marbles", "coins", "shells", "cards", "cookies",
    "boxes", "seeds", "bricks", "roses",
]
# fmt: on
PLACES = ["market", "fair", "shop", "school", "garden", "station", "library", "harbor", "farm", "village"]


def english_records(count: int):
    """Distinct texts (names, items and places vary), as the cache sees chunks after numbers are protected."""
    from budget_alignment.records import Problem

    records = []
    for i in range(count):
        name, item = NAMES[i % len(NAMES)], ITEMS[(i // len(NAMES)) % len(ITEMS)]
        place = PLACES[(i // (len(NAMES) * len(ITEMS))) % len(PLACES)]
        a, b = 10 + i % 90, 3 + i % 7
        records.append(
            Problem(
                id=f"chains-{i:05d}",
                dataset="chains",
                lang="en",
                question=f"{name} has {a} {item} and buys {b} more at the {place}. How many {item} are there now?",
                answer=str(a + b),
                answer_type="math",
                solution=(
                    f"{name} starts with {a} {item} before going to the {place}.\n\n"
                    f"Buying {b} more {item} gives $ {a} + {b} = {a + b} $ {item} in all.\n\n"
                    f"So the answer is \\boxed{{{a + b}}}."
                ),
            )
        )
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--limit-s", type=float, default=5.0)
    args = parser.parse_args()

    from budget_alignment import paths
    from budget_alignment.data.translate import translate_dataset
    from budget_alignment.params import Params, load_params
    from budget_alignment.records import write_records

    server, requests = start_server()
    work = Path(tempfile.mkdtemp(prefix="bench-translation-"))
    os.chdir(work)
    os.environ.pop("DVC_ROOT", None)
    os.environ["BUDGET_ALIGNMENT_CACHE"] = str(work / "cache")
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["tracking"]["enabled"] = False
    raw["translate"].update(
        backend="openai",
        model="bench-translator",
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        api_key_env=None,
        concurrency=8,
        max_chars_per_chunk=200,
    )
    raw["datasets"]["chains"]["translation"]["fr"] = {"machine": raw["translate"]}
    params = Params.model_validate(raw)
    write_records(paths.ingested("chains"), english_records(args.records))

    started = time.perf_counter()
    translate_dataset(params, "chains", langs=["fr"])
    first = time.perf_counter() - started
    asked = requests[0]
    started = time.perf_counter()
    translate_dataset(params, "chains", langs=["fr"])
    second = time.perf_counter() - started
    server.shutdown()

    cached = json.loads(paths.data_quality_report("translate@chains", "fr").read_text())
    print(f"records:                         {args.records}")
    print(f"first run:  {first:7.2f} s, {asked} chat requests (unique chunks)")
    print(f"second run: {second:7.2f} s, {requests[0] - asked} chat requests (all from the cache)")
    print(f"contract checks passed: {cached['success']} ({len(cached['checks'])} checks)")
    print(f"limit {args.limit_s:.1f} s: {'PASS' if second < args.limit_s and requests[0] == asked else 'FAIL'}")
    return 0 if second < args.limit_s and requests[0] == asked else 1


if __name__ == "__main__":
    sys.exit(main())
