"""sample.py: real early stopping, exact sampler log-probs, the right distribution, reproducibility."""

import time

import pytest
import torch

from conftest import favour_token, tiny_qwen3, tiny_tokenizer
from sample import build_prompt, sample_hf, sampling_logprobs
from score import token_logprobs

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def rollouts(model, L, seed=0, n=2, prompts=PROMPTS, **kw):
    return sample_hf(model, prompts, n, L, eos_token_id=EOS, pad_token_id=PAD, seed=seed, **kw)


def test_build_prompt_enforces_think_at_the_end(tokenizer):
    ids = build_prompt(tokenizer, "What is 1+1?")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 1+1?")
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    plain = tiny_tokenizer(with_think=False)
    assert "<think>" not in plain.decode(build_prompt(plain, "What is 1+1?"))


def test_no_completion_exceeds_L_train_and_eos_ends_a_rollout():
    model = tiny_qwen3()
    with torch.no_grad():  # make EOS likely so that both endings occur
        model.lm_head.weight[EOS] = 0.25 * model.lm_head.weight[20] + 0.02
    out = rollouts(model, L=12, n=8)
    assert len(out) == 3 * 8 and [r.prompt_index for r in out] == [i for i in range(3) for _ in range(8)]
    assert all(len(r.completion_ids) <= 12 for r in out)
    assert all(len(r.sampler_logp) == len(r.completion_ids) for r in out)
    for r in out:
        assert r.truncated == (EOS not in r.completion_ids)
        if not r.truncated:
            assert r.completion_ids.index(EOS) == len(r.completion_ids) - 1  # nothing after EOS
    assert any(r.truncated for r in out) and any(not r.truncated for r in out)


class CountingModel(torch.nn.Module):
    """Counts forward passes: one prefill plus one per further generated token proves the early stop."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0
        self.device = model.device

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


@pytest.mark.parametrize("L", [1, 8, 64])
def test_generation_really_stops_at_L_train(L):
    model = CountingModel(tiny_qwen3())
    rollouts(model, L=L)
    assert model.calls == L  # prefill yields token 1, each decode step one more: no work past L


def test_wall_time_grows_with_L_train():
    model = tiny_qwen3()
    rollouts(model, L=4)  # warm-up
    times = {}
    for L in (16, 256):
        start = time.perf_counter()
        rollouts(model, L=L)
        times[L] = time.perf_counter() - start
    print(f"sampling time: L=16 {times[16]:.3f}s, L=256 {times[256]:.3f}s")
    assert times[256] > 4 * times[16]


def test_sampler_logprobs_equal_score_py():
    model = tiny_qwen3()
    for r in rollouts(model, L=20):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        scored = token_logprobs(model, ids)[0, len(r.prompt_ids) - 1:]
        assert torch.allclose(scored, torch.tensor(r.sampler_logp), atol=1e-4)


def test_temperature_logprobs_are_of_the_tempered_distribution():
    model = tiny_qwen3()
    r = rollouts(model, L=10, temperature=0.7)[0]
    ids = torch.tensor([r.prompt_ids + r.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(r.prompt_ids) - 1:-1]
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1)
    assert torch.allclose(want, torch.tensor(r.sampler_logp), atol=1e-4)


def test_first_token_frequencies_match_the_model_and_top_p_cuts_the_tail():
    model = tiny_qwen3(vocab_size=8)
    prompt = [3, 4, 5]
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1], -1)
    for top_p in (1.0, 0.6):
        out = sample_hf(model, [prompt], 4000, 1, eos_token_id=EOS, pad_token_id=PAD, top_p=top_p, batch_size=4000)
        freq = torch.bincount(torch.tensor([r.completion_ids[0] for r in out]), minlength=8) / 4000
        want = sampling_logprobs(torch.log(probs)[None], 1.0, top_p)[0].exp()
        assert (freq - want).abs().sum() / 2 < 0.04  # total variation, ~4 standard errors
        assert (freq[want == 0] == 0).all()
    assert (want == 0).any()  # the 0.6 nucleus really removed tokens


def test_same_seed_same_rollouts_and_batch_independence():
    model = tiny_qwen3()
    a, b, c = rollouts(model, L=16), rollouts(model, L=16), rollouts(model, L=16, seed=1)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in a] != [r.completion_ids for r in c]
    # A prompt sampled alone (as on another rank) draws what it draws inside the full batch.
    alone = sample_hf(model, [PROMPTS[2]], 2, 16, eos_token_id=EOS, pad_token_id=PAD, prompt_indices=[2])
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in a[4:6]]
    small_batches = rollouts(model, L=16, batch_size=1)
    assert [r.completion_ids for r in small_batches] == [r.completion_ids for r in a]


@pytest.mark.parametrize("kwargs, match", [(dict(prompts=[]), "empty"), (dict(L=0), "L_train"),
                                           (dict(prompts=[[]]), "no tokens"), (dict(n=0), "samples per prompt")])
def test_bad_input_is_rejected(kwargs, match):
    args = dict(L=4, prompts=PROMPTS, n=1) | kwargs
    with pytest.raises(ValueError, match=match):
        rollouts(tiny_qwen3(), args.pop("L"), **args)


def test_hf_sampler_stops_at_every_generation_eos(tokenizer):
    from sample import HFSampler
    model = tiny_qwen3(vocab_size=len(tokenizer))
    extra = tokenizer.convert_tokens_to_ids("</think>")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, extra]  # as Qwen3: <|im_end|>, <|endoftext|>
    with torch.no_grad():
        model.lm_head.weight[extra] = 0.3 * model.lm_head.weight[20] + 0.05  # make the second EOS likely
    out = HFSampler(model, tokenizer).generate([[5, 6, 7]], 16, 24, seed=0)
    ended = [r for r in out if not r.truncated]
    assert ended and all(r.completion_ids[-1] in (tokenizer.eos_token_id, extra) for r in ended)
    assert any(r.completion_ids[-1] == extra for r in ended)


# ----------------------------------------------------------------------------- stop tokens


def base_tokenizer():
    """EOS <|endoftext|> (as Qwen3 base checkpoints name it), ChatML template: turns end with <|im_end|>."""
    return tiny_tokenizer(eos_token="<|endoftext|>")


def test_stop_token_ids_add_the_template_end_of_turn_to_a_base_tokenizer_eos():
    from sample import end_of_turn_id, stop_token_ids
    from transformers import GenerationConfig
    tok = base_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == endoftext != im_end
    assert end_of_turn_id(tok) == im_end
    assert stop_token_ids(tok) == sorted([im_end, endoftext])
    think_end = tok.convert_tokens_to_ids("</think>")  # any id: the generation config's ids are added
    generation_config = GenerationConfig(eos_token_id=[endoftext, think_end])
    assert stop_token_ids(tok, generation_config) == sorted([im_end, endoftext, think_end])
    model = tiny_qwen3(vocab_size=len(tok))
    model.generation_config.eos_token_id = endoftext
    assert stop_token_ids(tok, model) == sorted([im_end, endoftext])

    # no template: build_prompt's ChatML layout, whose turns end with <|im_end|>
    tok.chat_template = None
    assert end_of_turn_id(tok) == im_end
    # another template: its own end-of-turn token, found by rendering a turn
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</think>"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert end_of_turn_id(tok) == think_end
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_id(tok) is None and stop_token_ids(tok) == [endoftext]  # nothing special closes a turn


def test_hf_sampler_stops_a_base_student_at_the_end_of_its_turn():
    from sample import HFSampler
    tok = base_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    prompts = [build_prompt(tok, "What is 1+1?"), build_prompt(tok, "What is 2+3?")]
    model = favour_token(tiny_qwen3(vocab_size=len(tok)), im_end, prompts[0])  # rollouts end within a few tokens
    model.generation_config.eos_token_id = endoftext  # the base checkpoint's config names <|endoftext|> only
    out = HFSampler(model, tok).generate(prompts, 8, 24, seed=0)
    ended = [r for r in out if not r.truncated]
    assert any(r.completion_ids[-1] == im_end for r in ended)
    for r in out:  # nothing after the end of the turn
        assert im_end not in r.completion_ids[:-1] and endoftext not in r.completion_ids[:-1]
    # what the EOS alone did: the same rollouts ran on past <|im_end|> into an invented next turn
    eos_only = sample_hf(model, prompts, 8, 24, eos_token_id=endoftext, pad_token_id=tok.pad_token_id, seed=0)
    assert any(im_end in r.completion_ids[:-1] for r in eos_only)
