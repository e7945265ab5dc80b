"""Whether training gives the same bits on another kind of CPU, with torch's kernels free or pinned to AVX2.

    .venv/bin/python benchmarks/cpu_determinism.py

A cold tiny run of one commit gives one dvc.lock on one machine, but another from `base_model` on when the CPU differs
(an AMD EPYC and an Intel Xeon, both with AVX-512: benchmarks/RESULTS.md): torch's CPU kernels pick their code path,
hence their order of summation, by instruction set. This runs a fixed training workload (a small Llama-shaped model
from a seeded initialization, AdamW steps on seeded token batches, two threads as the tiny profile) in fresh processes,
with the kernels free, pinned to AVX2 (`ATEN_CPU_CAPABILITY`, `MKL_CBWR`, `ONEDNN_MAX_CPU_ISA`), and pinned with MKL's
branch that is the same on every processor (`MKL_CBWR=COMPATIBLE`), and prints the CPU, the seconds and a digest of the
trained weights for each. Run on two kinds of CPU and compare the digests: equal pinned digests where the free ones
differ say that pinning would make the tiny run's dvc.lock the same across those machines (at the cost in seconds
shown).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# MKL promises the same results across processors, Intel's and others', only in its COMPATIBLE branch.
VARIANTS = {
    "free (the CPU's best)": {},
    "pinned to AVX2": PINNED,
    "pinned, MKL compatible": PINNED | {"MKL_CBWR": "COMPATIBLE"},
}
PIN_KEYS = tuple(PINNED)


def workload() -> dict:
    """Train the fixed model; the digest of its weights and the seconds it took."""
    import hashlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1234)
    started = time.perf_counter()
    for _ in range(6):
        batch = torch.randint(0, config.vocab_size, (4, 256), generator=generator)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return {"digest": digest.hexdigest()[:16], "seconds": round(seconds, 2), "loss": float(loss.detach())}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(pins: dict[str, str]) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in PIN_KEYS} | pins
    result = subprocess.run(
        [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True, check=True, timeout=900
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        print(json.dumps(workload()))
        return
    import torch

    flags = Path("/proc/cpuinfo").read_text()
    avx512 = f"avx512f: {'avx512f' in flags}, avx512_bf16: {'avx512_bf16' in flags}"
    print(f"CPU: {cpu_model()} ({avx512}); torch {torch.__version__}")
    print("| kernels | weights digest | final loss | seconds |\n|---|---|---|---|")
    for label, pins in VARIANTS.items():
        outcome = run(pins)
        print(f"| {label} | {outcome['digest']} | {outcome['loss']:.6f} | {outcome['seconds']} |")


if __name__ == "__main__":
    main()
