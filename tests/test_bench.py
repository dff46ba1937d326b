"""bench.py end to end at tiny size (the JSON it ends with), and the maths under its timings: the two
scoring paths it times give the same log-probs, and model.generate's log-probs as bench.py reads them
from the scores are the student's own."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ONE_THREAD_ENV, ROOT

TOY = ROOT / "toy"
pytestmark = pytest.mark.skipif(not (TOY / "teacher" / "config.json").exists(),
                                reason="toy checkpoints not built: run `python toy.py`")


@pytest.fixture(scope="module")
def toy_pair():
    """(teacher, student, tokenizer) of the committed toy, on CPU in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda name: AutoModelForCausalLM.from_pretrained(TOY / name, dtype=torch.float32).eval()
    return load("teacher"), load("student"), AutoTokenizer.from_pretrained(TOY / "student")


def test_quick_run_ends_with_the_json_of_both_phases(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--prompts", "2", "--samples", "2",
                           "--max-new-tokens", "16", "--backend", "hf,generate", "--score-rows", "4", "--repeats", "1",
                           "--out", str(out)], cwd=ROOT, env=ONE_THREAD_ENV | {"TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert "| toy | hf |" in done.stdout and "| toy | chunked" in done.stdout  # the markdown tables
    assert [s["name"] for s in result["samplers"]] == ["hf", "generate"]
    for s in result["samplers"]:
        assert s["rollouts"] == 4 and s["tokens"] == 4 * 16  # every toy rollout runs past 16 tokens
        assert s["tokens_per_second"] > 0 and len(s["seconds_each"]) == 1
    assert [s["name"] for s in result["scoring"]] == ["chunked", "full logits"]
    for s in result["scoring"]:
        assert s["seconds"] > 0 and s["peak_bytes"] >= 0 and s["logits_bytes"] > 0 and s["rows"] == 4
        assert s["max_abs_diff"] < 1e-4


def toy_sequences(tokenizer, n=6):
    """Prompt + worked solution + EOS of n toy problems: the lengths of real rollouts."""
    import toy
    from sample import build_prompt

    return [build_prompt(tokenizer, p["problem"]) + tokenizer(p["solution"], add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for p in toy.make_problems(n, seed=3, split="test")]


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_the_two_scoring_paths_agree(toy_pair, chunk_size):
    from bench import full_logits_logprobs, right_padded
    from score import token_logprobs

    teacher, _, tokenizer = toy_pair
    ids, mask = right_padded(toy_sequences(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        chunked = token_logprobs(teacher, ids, mask, chunk_size=chunk_size)
        full = full_logits_logprobs(teacher, ids, mask)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()  # predictions of real tokens from real tokens
    assert chunked.shape == full.shape == (ids.shape[0], ids.shape[1] - 1)
    diff = (chunked - full)[valid].abs().max().item()
    print(f"chunk {chunk_size}: max |chunked - full| {diff:.2e}")
    assert diff < 1e-5


def test_generate_logprobs_are_the_students_and_stop_where_hf_stops(toy_pair):
    """The log q bench.py reads from generate's scores equals the student's own log-prob of each kept
    token (score.token_logprobs at temperature 1), and a rollout ends at its stop token."""
    from bench import generate_with_logprobs
    from sample import build_prompt, stop_token_ids
    from score import token_logprobs
    import toy

    _, student, tokenizer = toy_pair
    prompts = [build_prompt(tokenizer, p["problem"]) for p in toy.make_problems(2, seed=4, split="test")]
    stop_ids = stop_token_ids(tokenizer, student)
    out = generate_with_logprobs(student, prompts, 2, toy.MAX_NEW_TOKENS, stop_ids=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, seed=0, batch_size=4)
    assert len(out) == 4
    for k, (completion, logq) in enumerate(out):
        assert len(completion) == len(logq) < toy.MAX_NEW_TOKENS  # toy responses end well inside the budget
        assert completion[-1] in stop_ids and not set(completion[:-1]) & set(stop_ids)
        prompt = prompts[k // 2]
        with torch.no_grad():
            scored = token_logprobs(student, torch.tensor([prompt + completion]))[0, len(prompt) - 1:]
        assert torch.allclose(torch.tensor(logq), scored, atol=1e-4)
