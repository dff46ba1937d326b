"""
The memory plan: bytes per GPU of every part of a training run, from the model shapes and the flags.

What it computes. A run holds some tensors for its whole life (resident) and others only inside one
phase of a step; the peak is

    peak = resident + max over phases (sample, score, update, push/save) of that phase's transient

resident   student weights, gradients and AdamW moments (fp32; DDP: whole on every GPU, FSDP2: the
           GPU's dim-0 shard, padded as FSDP2 pads it), the teacher (bf16, inference only), the vLLM
           engine's weights, KV cache and own overhead when vLLM samples.
sample     transformers sampler only: the KV cache of one generate batch, rows x (prompt + L_train)
           x 2 (K, V) x layers x kv_heads x head_dim x dtype bytes, plus one row of float32 logits
           per row; the batch is sized to fit what the rest leaves (hf_batch_size below).
score      the teacher's no-grad forward on one micro-batch: one layer's activations and one chunk
           of logits (score.py); GKD instead keeps the micro-batch's full-vocabulary logits.
update     gradients (fp32, freed after the optimizer step), activations of one micro-batch,
           one chunk of logits with its gradient (score.py), and under FSDP2 the bf16 all-gathered
           copy of the decoder layers being computed (two: FSDP2 prefetches the next) and of the root
           (embeddings, final norm, lm_head), which stays gathered through the forward; under DDP,
           autocast's bf16 copy of the weights.
push/save  the largest tensor gathered whole (fp32) and its bf16 copy: weight pushes and the
           Hugging Face checkpoint stream one tensor at a time (train.py), and the trainer state is
           saved shard by shard with torch.distributed.checkpoint.

Activations, counted as the tensors autograd keeps for backward per token. Measured by counting the
bytes of saved tensors (torch.autograd.graph.saved_tensors_hooks) of transformers' Qwen3 decoder on
CPU in float32 (tests/test_memory.py repeats it), a decoder layer keeps about
    6h + 4I + 4 q_dim + 4 kv_dim elements per token          (q_dim = heads x head_dim, kv_dim = kv_heads x head_dim)
(the residual stream and RMSNorm internals, 6h; the SwiGLU MLP's gate, up, act and product, 4I; q, k,
v and the attention output, their norms and rotary copies, ~4 each), plus ~3h outside the layers. The
backward starts with score.py's chunk of logits, whose recomputation and gradient are transient. With
activation checkpointing a layer keeps only its input (h per token), and the backward recomputes one
layer at a time: the peak adds the larger of that layer's activations and the chunk of logits. On GPUs, under bf16 autocast, the
matmul inputs and outputs (the 4I + 4q + 4kv part) are bf16 and the residual stream (6h) stays
float32: that is the byte count used there.

Departures / what is computed, not measured:
1. GPU figures are computed: the CUDA caching allocator's fragmentation and NCCL's buffers are covered
   by a fixed reserve (RESERVE_GB), and vLLM's own overhead (CUDA graphs, sampler buffers, activation
   workspace) by VLLM_OVERHEAD_GB. On CPU the static parts equal the real tensors' bytes exactly and
   the activation/logit estimate is checked against measured peaks (tests/test_memory.py).
2. The longest sequence is prompt + L_train with the longest prompt the run may see; a micro-batch
   holds at least one whole sequence, so its tokens are max(--micro-batch-tokens, longest sequence).
3. Host RAM is not planned (each rank loads the student on the CPU before FSDP2 shards it).
"""

import json
import math
from dataclasses import dataclass, field

from flops import model_shape
from sample import hf_batch_size, kv_bytes_per_token  # the sampler's own batch sizing

GB = 1e9
RESERVE_GB = 2.0  # allocator fragmentation, NCCL and CUDA context, per GPU (computed, not measured)
VLLM_OVERHEAD_GB = 2.0  # vLLM's CUDA graphs, sampler and activation workspace (computed, not measured)
SCORE_CHUNK = 512  # positions per lm_head chunk in score.py
# --dry-run's projected hours: A100 bf16 dense peak, and a utilisation assumed, not measured
GPU_PEAK_FLOPS, UTILISATION = 312e12, 0.3


def param_shapes(shape: dict) -> list[tuple[int, ...]]:
    """The shape of every parameter of a transformers Qwen3ForCausalLM (no biases), in module order."""
    h, I, d, V = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"], shape["vocab_size"]
    q, kv = shape["num_attention_heads"] * d, shape["num_key_value_heads"] * d
    layer = [(q, h), (kv, h), (kv, h), (h, q), (d,), (d,),  # q, k, v, o projections; q_norm, k_norm
             (I, h), (I, h), (h, I), (h,), (h,)]  # gate, up, down; input and post-attention norms
    return [(V, h)] + layer * shape["num_hidden_layers"] + [(h,)] + ([] if shape["tied"] else [(V, h)])


def num_params(shape: dict) -> int:
    return sum(math.prod(s) for s in param_shapes(shape))


def shard_numel(shape: dict, world_size: int) -> int:
    """Elements of one FSDP2 shard: every parameter is split on dim 0 into world_size chunks of
    ceil(dim0 / world_size) rows, the last ones padded."""
    return sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in param_shapes(shape))


def layer_activation_bytes(shape: dict, on_gpu: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    h, I = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    matmul_bytes = 2 if on_gpu else 4  # bf16 under autocast
    return 6 * h * 4 + (4 * I + 4 * q + 4 * kv) * matmul_bytes


def activation_bytes(shape: dict, tokens: int, checkpointing: bool, on_gpu: bool) -> int:
    """Bytes a student forward + backward over `tokens` tokens holds at its peak: what autograd
    stores, plus the larger of the backward's two transients, score.py's chunk of logits (first in
    the backward) and, with checkpointing, the one layer being recomputed."""
    L, h = shape["num_hidden_layers"], shape["hidden_size"]
    outside = 3 * h * 4  # embeddings output, final norm, the hidden states handed to score.py
    layer = layer_activation_bytes(shape, on_gpu)
    logits = logits_chunk_bytes(shape, with_grad=True)
    if checkpointing:  # each layer keeps its input; the backward recomputes one layer at a time
        return tokens * (L * h * 4 + outside) + max(logits, tokens * layer)
    return tokens * (L * layer + outside) + logits


def logits_chunk_bytes(shape: dict, with_grad: bool, positions: int = SCORE_CHUNK) -> int:
    """score.py's one chunk of logits: the lm_head output, its float32 copy and logsumexp's
    temporary (~10 bytes an entry); with grad, its recomputation in backward and the gradients
    (~18 bytes an entry, measured on CPU: tests/test_memory.py)."""
    return positions * shape["vocab_size"] * (18 if with_grad else 10)


def gkd_logits_bytes(shape: dict, tokens: int, beta: float, on_gpu: bool) -> int:
    """GKD's full-vocabulary tensors for `tokens` completion positions: the student's and the teacher's
    logits (bf16 on GPUs), and what loss.generalized_jsd keeps and frees through its backward:
    measured at 5 float32 tensors of tokens x V for beta 0 or 1 and 12 for a mixture (the extra
    log-mixture and its KL terms), gradient included (tests/test_memory.py)."""
    kept = 12 if 0 < beta < 1 else 5
    return (kept * 4 + 2 * (2 if on_gpu else 4)) * tokens * shape["vocab_size"]


@dataclass
class Plan:
    rows: list = field(default_factory=list)  # (part, phase, bytes, note)
    budget_gb: float = 80.0
    hf_batch: int | None = None  # rows per transformers generate call at L_longest (None: vLLM samples)
    hf_kv_cache_bytes: float | None = None  # what the transformers sampler's batches may fill

    def add(self, part, phase, nbytes, note=""):
        self.rows.append((part, phase, int(nbytes), note))

    def phase_bytes(self, phase) -> int:
        return sum(b for _, p, b, _ in self.rows if p == phase)

    @property
    def peak_bytes(self) -> int:
        transient = max((self.phase_bytes(p) for p in ("sample", "score", "update", "push/save")), default=0)
        return self.phase_bytes("resident") + transient

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    @property
    def fits(self) -> bool:
        return self.peak_gb <= self.budget_gb and self.hf_batch != 0

    def table(self) -> str:
        lines = ["| part | phase | GB | note |", "| --- | --- | ---: | --- |"]
        lines += [f"| {part} | {phase} | {b / GB:.2f} | {note} |" for part, phase, b, note in self.rows]
        for phase in ("sample", "score", "update", "push/save"):
            lines.append(f"| *{phase} phase total* | {phase} | {self.phase_bytes(phase) / GB:.2f} | |")
        lines.append(f"| **peak** = resident {self.phase_bytes('resident') / GB:.2f} + largest phase | | "
                     f"**{self.peak_gb:.2f}** | budget {self.budget_gb:.0f} GB: "
                     f"{'fits' if self.fits else 'does NOT fit'} |")
        return "\n".join(lines)


def plan(student, teacher, *, world_size: int, fsdp: bool, sampler: str, loss: str, rollouts_from: str,
         micro_batch_tokens: int, activation_checkpointing: bool, prompt_tokens: int, L_longest: int,
         vllm_kv_cache_gb: float | None, gpu_memory_gb: float, on_gpu: bool = True, beta: float = 0.5,
         vllm_sleep: bool = False) -> Plan:
    """The per-GPU plan of a train.py run (arguments named as its flags; L_longest: the run's longest L_train)."""
    S, T = model_shape(student), model_shape(teacher)
    half = 2 if on_gpu else 4  # bf16 on GPUs, float32 on CPU (train.py)
    p = Plan(budget_gb=gpu_memory_gb)
    n_student = num_params(S)
    local = shard_numel(S, world_size) if fsdp else n_student
    how = f"FSDP2 shard 1/{world_size}" if fsdp else "whole, DDP"
    n_tensors = len(param_shapes(S))
    p.add("student weights (fp32 master)", "resident", 4 * local, how)
    p.add("AdamW moments (fp32, 2x) and steps", "resident", 8 * local + 4 * n_tensors, how)
    p.add("teacher weights (inference)", "resident", half * num_params(T), "bf16" if on_gpu else "fp32")
    vllm = sampler == "vllm" and rollouts_from == "student"
    if vllm:
        kv_gb = 10.0 if vllm_kv_cache_gb is None else vllm_kv_cache_gb
        where = "sample" if vllm_sleep else "resident"  # asleep, the engine frees both while the trainer works
        p.add("vLLM engine weights", where, half * n_student, "bf16; freed by --vllm-sleep" if vllm_sleep else "bf16")
        p.add("vLLM KV cache", where, kv_gb * 2**30,
              f"--vllm-kv-cache-gb {kv_gb:g}: {int(kv_gb * 2**30 // kv_bytes_per_token(S, half)):,} tokens")
        p.add("vLLM overhead", "resident", VLLM_OVERHEAD_GB * GB, "CUDA graphs, workspace (computed)")
    elif fsdp and rollouts_from == "student":
        p.add("sampling copy of the student", "resident", half * n_student, "FSDP2 + transformers sampler")
    if on_gpu:
        p.add("allocator, NCCL, CUDA context", "resident", RESERVE_GB * GB, "reserve (computed)")

    longest = prompt_tokens + L_longest
    mb_tokens = max(micro_batch_tokens, longest)  # a micro-batch holds at least one whole sequence
    # update
    p.add("gradients (fp32)", "update", 4 * local, how + ("; reduce-scattered every micro-batch" if fsdp else ""))
    p.add("activations of one micro-batch", "update",
          activation_bytes(S, mb_tokens, activation_checkpointing or fsdp, on_gpu),
          f"{mb_tokens:,} tokens, " + ("checkpointed layers" if activation_checkpointing or fsdp else
                                       "no activation checkpointing") + f", {SCORE_CHUNK}-position chunk of logits")
    if loss == "gkd":  # logits of the completion positions of one micro-batch
        completion = max(1, mb_tokens // longest) * L_longest
        p.add("GKD full-vocabulary logits", "update", gkd_logits_bytes(S, completion, beta, on_gpu),
              f"{completion:,} completion positions")
    if fsdp:
        h, V = S["hidden_size"], S["vocab_size"]
        layer = (num_params(S) - V * h * (1 if S["tied"] else 2) - h) // S["num_hidden_layers"]
        root = V * h * (1 if S["tied"] else 2) + h
        p.add("FSDP2 gathered root + 2 layers (bf16)", "update", half * (root + 2 * layer), "unsharded in forward")
    elif on_gpu:
        p.add("autocast bf16 weight cache", "update", 2 * n_student, "DDP: bf16 casts kept through backward")
    # score
    p.add("teacher forward, one layer", "score", activation_bytes(T, mb_tokens, True, on_gpu) -
          mb_tokens * T["num_hidden_layers"] * T["hidden_size"] * 4, "no grad")
    p.add("teacher logits chunk", "score", logits_chunk_bytes(T, False), f"{SCORE_CHUNK} positions")
    # push / save: one tensor at a time
    largest = max(math.prod(s) for s in param_shapes(S))
    p.add("largest tensor gathered + cast", "push/save", (4 + half) * largest, "weights stream tensor by tensor")
    # sample (transformers backend): what is left is the KV budget; dataset responses need no sampling
    if not vllm and rollouts_from != "dataset":
        model = T if rollouts_from == "teacher" else S
        dtype_bytes = half if (fsdp or rollouts_from == "teacher") else 4  # DDP samples with the fp32 master
        p.hf_kv_cache_bytes = 0.9 * (gpu_memory_gb * GB - p.phase_bytes("resident"))
        p.hf_batch = hf_batch_size(model, longest, p.hf_kv_cache_bytes, dtype_bytes)
        per_row = longest * kv_bytes_per_token(model, dtype_bytes)
        p.add(f"KV cache, {p.hf_batch} rows x {longest:,} tokens", "sample", p.hf_batch * per_row,
              "transformers sampler, batch sized to fit")
    return p


def fit_hint(**plan_kwargs) -> dict | None:
    """The first single change of plan()'s arguments that makes a plan fit that does not as it
    stands, e.g. {"fsdp": True}; None if none does."""
    tries = [{"fsdp": True}] if not plan_kwargs["fsdp"] else []
    if not (plan_kwargs["activation_checkpointing"] or plan_kwargs["fsdp"]):
        tries.append({"activation_checkpointing": True})
    vllm = plan_kwargs["sampler"] == "vllm"
    if vllm and not plan_kwargs.get("vllm_sleep"):
        tries.append({"vllm_sleep": True})
    mb = plan_kwargs["micro_batch_tokens"]
    while mb > 512:
        mb //= 2
        tries.append({"micro_batch_tokens": mb})
    if vllm:
        tries.append({"vllm_kv_cache_gb": 4.0})
    return next((change for change in tries if plan(**plan_kwargs | change).fits), None)


def as_flag(change: dict | None) -> str | None:
    """{"micro_batch_tokens": 2048} -> "--micro-batch-tokens 2048": plan()'s arguments are named as
    train.py's flags."""
    if change is None:
        return None
    (key, value), = change.items()
    flag = "--" + key.replace("_", "-")
    return flag if value is True else f"{flag} {value:g}"


def no_fit_message(plan_kwargs: dict) -> str:
    """Why a run does not fit and the flag that would make it: train.py's start-up error on a GPU."""
    p, hint = plan(**plan_kwargs), as_flag(fit_hint(**plan_kwargs))
    return (f"this run needs {p.peak_gb:.0f} GB per GPU, more than --gpu-memory-gb {p.budget_gb:.0f}; "
            + (f"add {hint}" if hint else "no single flag fixes it"))


def dry_run(plan_kwargs: dict, flops_per_step: list[float], schedule: str) -> bool:
    """train.py --dry-run: print the plan's table, App. B FLOP of the run and its hours at an assumed
    utilisation, then one JSON line; returns whether it fits. Loads no weights, needs no GPU."""
    p, k = plan(**plan_kwargs), plan_kwargs
    gpus = k["world_size"]
    hours = sum(flops_per_step) / (gpus * GPU_PEAK_FLOPS * UTILISATION) / 3600
    print(f"dry run: {k['student']} <- {k['teacher']} on {gpus} GPU(s) of {k['gpu_memory_gb']:.0f} GB, "
          f"{'FSDP2' if k['fsdp'] else 'DDP'}, sampler {k['sampler']}, L_train {schedule} up to {k['L_longest']}, "
          f"prompts of <= {k['prompt_tokens']} tokens\n\n{p.table()}\n")
    print(f"FLOP (App. B, every rollout reaching L_train): {flops_per_step[0]:.3e} at step 1, "
          f"{sum(flops_per_step):.3e} for {len(flops_per_step)} steps; {hours:.1f} h at {UTILISATION:.0%} of "
          f"{GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s per GPU (an assumption, not a measurement)")
    hint = None if p.fits else as_flag(fit_hint(**plan_kwargs))
    if hint:
        print(f"does not fit; with {hint} it would")
    print(json.dumps({"fits": p.fits, "peak_gb": round(p.peak_gb, 2), "budget_gb": plan_kwargs["gpu_memory_gb"],
                      "gpus": gpus, "sampler": plan_kwargs["sampler"], "hf_batch": p.hf_batch,
                      "flops_step_1": flops_per_step[0], "flops_total": sum(flops_per_step),
                      "hours": round(hours, 2), "fit_hint": hint,
                      "parts": {f"{part} [{phase}]": round(b / GB, 2) for part, phase, b, _ in p.rows}}))
    return p.fits
