"""The generate stage with the transformers backend on the tiny model: n samples, seeds, resume after a crash, reuse
of a language whose inputs did not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from budget_alignment import loading, paths
from budget_alignment.evaluation import generate
from budget_alignment.evaluation.problems import problems_file
from budget_alignment.params import load_params
from budget_alignment.records import Completion, Problem, read_records, write_records
from test_train_helpers import save_tiny_model, worker_threads

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BUDGET_ALIGNMENT_CACHE", str(tmp_path / ".cache"))
    save_tiny_model(paths.base_model_dir())
    problems = [
        Problem(
            id=f"q{i}",
            dataset="college_math",
            lang="fr",
            question=f"question {i}",
            answer="B",
            answer_type="choice",
            choices={"A": "1", "B": "2", "C": "3", "D": "4"},
        )
        for i in range(5)
    ]
    write_records(problems_file("fr", "college_math"), problems)
    return tmp_path


def tiny_params(**evaluation):
    params = load_params(REPO / "params.yaml")
    settings = {
        "datasets": ["college_math"],
        "n": 3,
        "k": [1, 3],
        "max_new_tokens": 6,
        "batch_size": 6,
        "limit": None,
        "temperature": 1.0,
    } | evaluation
    compute = params.compute.model_copy(update={"torch_threads": worker_threads()})
    return params.model_copy(update={"evaluation": params.evaluation.model_copy(update=settings), "compute": compute})


def completions(folder: Path) -> list[Completion]:
    return read_records(folder / "college_math.jsonl", Completion)


def test_n_samples_per_problem_deterministic_under_a_seed(project):
    params = tiny_params()
    out = paths.generations_dir("base", "fr")
    summary = generate.generate_language(params, "base", "fr", out)
    first = completions(out)
    assert len(first) == 5 * 3
    assert {(c.problem_id, c.sample) for c in first} == {(f"q{i}", s) for i in range(5) for s in range(3)}
    assert all(c.model == "base" and c.lang == "fr" and 1 <= c.tokens <= 6 for c in first)
    assert {c.finish_reason for c in first} <= {"stop", "length"}
    assert summary["tokens_generated"] == sum(c.tokens for c in first)
    assert json.loads((out / generate.META_FILE).read_text())["sampling"]["n"] == 3
    assert len({c.text for c in first}) > 1  # sampling, not one repeated string

    again = generate.generate_language(params, "base", "fr", out)
    assert completions(out) == first
    assert again["reused_completions"] == 15 and again["tokens_generated"] == 0  # nothing sampled again
    shutil.rmtree(project / ".cache/generations")  # sampled afresh: the same completions under the seed
    generate.generate_language(params, "base", "fr", out)
    assert completions(out) == first


def test_sampling_in_either_precision_is_deterministic_and_not_reused_by_the_other(project):
    params = tiny_params()
    out = paths.generations_dir("base", "fr")
    for precision in ["no", "bf16"]:  # bf16 runs on any CPU (emulated where the CPU lacks it)
        compute = params.compute.model_copy(update={"mixed_precision": precision})
        changed = params.model_copy(update={"compute": compute})
        model = generate.TransformersBackend(changed, paths.base_model_dir()).model
        assert model.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        assert generate.generate_language(changed, "base", "fr", out)["reused_completions"] == 0
        sampled = completions(out)
        shutil.rmtree(project / ".cache/generations")
        generate.generate_language(changed, "base", "fr", out)
        assert completions(out) == sampled


def test_a_crashed_run_resumes_without_regenerating_finished_problems(project, monkeypatch):
    params = tiny_params()
    reference = paths.generations_dir("base", "fr")
    generate.generate_language(params, "base", "fr", reference)
    expected = completions(reference)
    shutil.rmtree(project / ".cache/generations")

    calls = []
    original = generate.TransformersBackend.generate

    def crash_on_second_batch(self, prompts, n, seed):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return original(self, prompts, n, seed)

    monkeypatch.setattr(generate.TransformersBackend, "generate", crash_on_second_batch)
    out = Path("data/generations/resumed")
    with pytest.raises(KeyboardInterrupt):
        generate.generate_language(params, "base", "fr", out)
    assert not out.exists()
    work_file = project / ".cache/generations/base-fr/college_math.jsonl"
    assert len(work_file.read_text().splitlines()) == 2 * 3  # the first batch's two problems
    with work_file.open("a") as handle:
        handle.write('{"problem_id": "q2", "sam')  # a torn line, as a kill mid-write leaves it

    monkeypatch.setattr(generate.TransformersBackend, "generate", original)
    resumed_calls = []
    monkeypatch.setattr(
        generate.TransformersBackend,
        "generate",
        lambda self, prompts, n, seed: resumed_calls.append(len(prompts)) or original(self, prompts, n, seed),
    )
    summary = generate.generate_language(params, "base", "fr", out)
    assert resumed_calls == [2, 1]  # batches 2 and 3 only
    assert summary["reused_completions"] == 6
    assert completions(out) == expected


def test_replica_processes_write_the_same_output_as_one_process(project):
    """Generation spread over engine replicas (processes; on GPUs one per GPU group) draws the same samples."""
    one = paths.generations_dir("base", "fr")
    generate.generate_language(tiny_params(), "base", "fr", one)
    shutil.rmtree(project / ".cache/generations")
    two = Path("data/generations/two-replicas")
    params = tiny_params().model_copy(
        update={"compute": tiny_params().compute.model_copy(update={"generation_replicas": 2})}
    )
    assert generate.replica_count(params) == 2
    summary = generate.generate_language(params, "base", "fr", two)
    assert summary["reused_completions"] == 0
    for name in ("college_math.jsonl", generate.META_FILE):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def test_a_language_whose_inputs_did_not_change_reuses_its_completions(project):
    """generate@{regime} samples every language; after a change to one language's model or problems, a rerun samples
    that language alone and gives the others' completions back as they were."""
    problems = [Problem(id=f"j{i}", dataset="college_math", lang="ja", question=f"問題 {i}", answer="1",
                        answer_type="math") for i in range(4)]  # fmt: skip
    write_records(problems_file("ja", "college_math"), problems)
    params = tiny_params()
    first = generate.generate_regime(params, "base", ["ja", "fr"])
    assert [first[lang]["reused_completions"] for lang in ("ja", "fr")] == [0, 0]
    french = (paths.generations_dir("base", "fr") / "college_math.jsonl").read_bytes()

    write_records(problems_file("ja", "college_math"), problems[:3])  # the Japanese data changed
    second = generate.generate_regime(params, "base", ["ja", "fr"])
    assert second["ja"]["reused_completions"] == 0 and second["ja"]["tokens_generated"] > 0
    assert second["fr"]["reused_completions"] == 15 and second["fr"]["tokens_generated"] == 0
    assert (paths.generations_dir("base", "fr") / "college_math.jsonl").read_bytes() == french
    assert len(completions(paths.generations_dir("base", "ja"))) == 3 * 3

    save_tiny_model(paths.base_model_dir())  # the model rewritten (same weights): its files' state changed
    third = generate.generate_regime(params, "base", ["fr"])
    assert third["fr"]["reused_completions"] == 0
    assert (paths.generations_dir("base", "fr") / "college_math.jsonl").read_bytes() == french


def test_replica_devices_are_shares_of_the_visible_gpus():
    assert generate.replica_devices(1, 2, None) == "2,3"
    assert generate.replica_devices(1, 2, "4,5,6,7") == "6,7"
    assert generate.replica_devices(0, 1, "3") == "3"


def test_changed_sampling_settings_discard_an_interrupted_run(project):
    work = project / ".cache/generations/base-fr"
    work.mkdir(parents=True)
    (work / generate.META_FILE).write_text(json.dumps({"stale": True}))
    (work / "college_math.jsonl").write_text(
        Completion(
            problem_id="q0", model="base", lang="fr", sample=0, text="old", tokens=1, finish_reason="stop"
        ).model_dump_json()
        + "\n"
    )
    generate.generate_language(tiny_params(n=1, k=[1]), "base", "fr", paths.generations_dir("base", "fr"))
    assert "old" not in [c.text for c in completions(paths.generations_dir("base", "fr"))]


def test_a_missing_model_is_a_clear_error(project):
    with pytest.raises(
        generate.GenerationError, match=r"model sft-fr: no model at data/models/sft/fr \(run its stage first\)"
    ):
        generate.generate_language(tiny_params(), "sft", "fr", paths.generations_dir("sft", "fr"))


def test_greedy_decoding_equals_transformers_generate_on_each_prompt_alone(project):
    # Grouped KV heads (2 query heads share 1) and prompts of different lengths (left padding): the backend's own
    # decoding loop (shared prompt cache, static cache, grouped attention) must pick the tokens `generate` picks.
    save_tiny_model(paths.base_model_dir(), kv_heads=1)
    params = tiny_params(temperature=0.0, max_new_tokens=8)
    params = params.model_copy(update={"compute": params.compute.model_copy(update={"mixed_precision": "no"})})
    backend = generate.TransformersBackend(params, paths.base_model_dir())
    assert backend.model.config._attn_implementation == "sdpa_grouped_kv"
    texts = ["<|im_start|>user\nA B<think>\n", "<|im_start|>user\nCombien font 1 + 2 ? D D A<think>\n", "B"]
    results = backend.generate(texts, n=2, seed=0)

    reference = loading.load_causal_lm(paths.base_model_dir(), torch.float32)
    assert reference.config._attn_implementation == "sdpa"
    tokenizer = backend.tokenizer()
    for text, samples in zip(texts, results, strict=True):
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        generated = reference.generate(
            ids,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        expected = generated[0, ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        stop = expected.index(eos) + 1 if eos in expected else len(expected)
        assert [s.tokens for s in samples] == [stop, stop]
        assert samples[0].text == samples[1].text == tokenizer.decode(expected[:stop], skip_special_tokens=True)


def test_grouped_attention_equals_sdpa_in_logits_and_gradients(tmp_path):
    save_tiny_model(tmp_path, kv_heads=1)
    batch = {
        "input_ids": torch.tensor([[0, 0, 6, 7, 8], [3, 4, 9, 10, 11]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
    }
    results = []
    for on_cpu in (False, True):
        model = loading.load_causal_lm(tmp_path, torch.float32, on_cpu=on_cpu)
        logits = model(**batch).logits
        (logits * batch["attention_mask"][..., None]).sum().backward()
        results.append((logits.detach(), [p.grad for p in model.parameters()]))
    (sdpa_logits, sdpa_grads), (grouped_logits, grouped_grads) = results
    torch.testing.assert_close(grouped_logits, sdpa_logits, rtol=1e-5, atol=1e-6)
    for grouped, sdpa in zip(grouped_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(grouped, sdpa, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_a_decoding_steps_attention_equals_sdpa_under_either_mask(dtype, tolerance):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(3, 4, 1, 8, generator=generator).to(dtype)  # 4 query heads on 2 KV heads, one new token
    key, value = (torch.randn(3, 2, 6, 8, generator=generator).to(dtype) for _ in range(2))
    allowed = torch.ones(3, 1, 1, 6, dtype=torch.bool)
    allowed[0, ..., :2] = False  # left padding
    additive = torch.zeros(3, 1, 1, 6).masked_fill(~allowed, torch.finfo(torch.float32).min).to(dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=allowed, enable_gqa=True
    ).transpose(1, 2)
    for mask in (allowed, additive):
        output, _ = loading._grouped_sdpa_forward(None, query, key, value, mask, scaling=None)
        assert output.shape == (3, 1, 4, 8) and output.dtype == dtype
        torch.testing.assert_close(output.float(), expected, rtol=tolerance, atol=tolerance)


def test_top_p_sampling_draws_from_the_nucleus_in_proportion():
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    # A peaked row (its nucleus among the top candidates) and a flat one (the nucleus needs the full sort).
    logits = torch.stack([torch.linspace(8, -8, 1000), torch.linspace(0.01, 0, 1000)])
    warped = TopPLogitsWarper(top_p=0.9)(None, logits / 0.7)
    expected = torch.softmax(warped, dim=-1)
    draws = torch.stack([generate.sample_token(logits, 0.7, 0.9, generator) for _ in range(4000)])
    for row in range(2):
        counts = torch.bincount(draws[:, row], minlength=1000).float() / len(draws)
        assert set(draws[:, row].tolist()) <= set(torch.nonzero(expected[row]).flatten().tolist())
        assert (counts - expected[row]).abs().max() < 0.03
    assert len(set(draws[:, 1].tolist())) > generate.NUCLEUS_CANDIDATES  # the flat row sampled past the candidates
    assert torch.equal(generate.sample_token(logits, 0.0, 0.9, generator), torch.tensor([0, 0]))


@pytest.mark.vllm
def test_vllm_backend_samples_n_completions(project):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    params = tiny_params(backend="vllm")
    out = paths.generations_dir("base", "fr")
    generate.generate_language(params, "base", "fr", out)
    assert len(completions(out)) == 15
