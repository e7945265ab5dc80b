"""What torch training costs when processes share the cores: the case of `make test` (pytest-xdist's workers side by
side, each starting stages) against one process alone (`dvc repro` runs one stage at a time).

    .venv/bin/python benchmarks/thread_sharing.py

A fixed training workload (a small Llama-shaped model, AdamW steps on token batches) runs alone with every core's
thread, alone with one thread, then as many processes as there are cores side by side, first with every core's thread
each (the cores oversubscribed), then with one thread each. Torch's threads spin while they wait for each other, so
an oversubscribed process loses far more than its share. Prints a markdown table of the seconds per process and the
wall time of each case (median of --runs).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time

WORKLOAD = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
config = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
batch = torch.randint(0, config.vocab_size, (2, 256))
started = time.perf_counter()
for _ in range(15):
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(time.perf_counter() - started)
"""


def run_side_by_side(processes: int, threads: int) -> tuple[list[float], float]:
    """Seconds of the workload in each process (imports excluded) and the wall time until the last one ends."""
    started = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, "-c", WORKLOAD, str(threads)], stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    seconds = [float(child.communicate()[0]) for child in children]
    return seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cases = [
        (f"1 process, {cores} threads", 1, cores),
        ("1 process, 1 thread", 1, 1),
        (f"{cores} processes, {cores} threads each", cores, cores),
        (f"{cores} processes, 1 thread each", cores, 1),
    ]
    print(f"{cores} cores, torch {importlib.metadata.version('torch')}\n")
    print("| case | training seconds per process | wall seconds (imports included) |")
    print("|---|---|---|")
    for name, processes, threads in cases:
        runs = [run_side_by_side(processes, threads) for _ in range(args.runs)]
        per_process = statistics.median(statistics.mean(seconds) for seconds, _ in runs)
        wall = statistics.median(wall for _, wall in runs)
        print(f"| {name} | {per_process:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
