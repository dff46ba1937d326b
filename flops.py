"""Training cost model: FLOP per rollout for on-policy (prefix) distillation (paper Appendix B), and
the same count for the objectives it is compared with (GKD, SeqKD/SFT, off-policy GKD).

The paper counts cost with VERL's FlopsCounter, the estimate VERL uses to report MFU. For a dense
Qwen2/Qwen3/Llama-style decoder with hidden size h, MLP size I, n_layers layers, n_heads query
heads and n_kv_heads key/value heads of size head_dim, and vocabulary V:

    q_size = o_size = n_heads * head_dim         k_size = v_size = n_kv_heads * head_dim
    N_dense  = n_layers * (3*h*I + h*(q_size + k_size + v_size + o_size)) + 2*V*h
    F_train  = 6 * N_dense * sum_i s_i  +  12 * sum_i s_i^2 * head_dim * n_heads * n_layers
    F_fwd    = F_train / 3
    F_OPD    = F_train(S) + 2 * F_fwd(S) + F_fwd(T)                     (Appendix B)

s_i is the length of rollout i, prompt plus response, so in prefix OPD s_i = prompt + min(response,
L_train). Per rollout the student S is trained once (forward + backward) and run forward twice,
once to sample and once for the old log-probs; the teacher T runs forward once for teacher_logp.
Sampling with a KV cache runs every weight matmul once per token, as one forward pass over the
finished sequence does, which is why F_fwd stands in for it.

Other objectives (step_flops), counted the same way: whoever samples pays F_fwd of its model on
the sampled sequences, the student pays F_train for its update, and the teacher pays one more
F_fwd when the loss reads its distribution and sampling has not already produced it. s_i is the
length of sequence i (prompt plus the response tokens trained on), whoever wrote the response.

    loss  rollouts from  FLOP per step                          passes
    opd   student        F_train(S) + 2 F_fwd(S) + F_fwd(T)     sample, old log-probs, teacher_logp, update
    gkd   student        F_train(S) +   F_fwd(S) + F_fwd(T)     sample, teacher logits, update
    gkd   teacher        F_train(S) + 2 F_fwd(T)                teacher samples, teacher logits, update
    gkd   dataset        F_train(S) +   F_fwd(T)                teacher logits, update
    sft   student        F_train(S) +   F_fwd(S)                sample, update
    sft   teacher        F_train(S) +   F_fwd(T)                SeqKD: teacher samples, update
    sft   dataset        F_train(S)                             update only: nothing sampled, no teacher

  - OPD is Appendix B's formula. Its second student forward is VERL's old-log-prob pass: VERL
    recomputes log pi_old with the trainer before the update, as the denominator of its importance
    ratio. The count keeps it so that OPD's numbers are the paper's (train.py takes log q from the
    sampler and runs no such pass, so it executes F_fwd(S) less than it reports). OPD needs the
    student's own rollouts: step_flops refuses it with teacher or dataset rollouts.
  - On-policy GKD (Agarwal et al. 2024; paper §5.3): the student samples (F_fwd(S)), the teacher
    runs forward over the rollouts for its full next-token distributions (F_fwd(T)), and the
    student trains on the divergence (F_train(S)). No old-log-prob pass is counted: the GKD loss has
    no importance ratio, it compares the two distributions at the current weights, so nothing needs
    log pi_old. The teacher's full logits cost what OPD's teacher_logp costs: the lm_head matmul is
    2 V h per token whether one log-prob or all V are kept. The divergence itself is O(V)
    elementwise work per token (two log-softmaxes, the mixture, two KLs: roughly 70 V FLOP forward
    and backward, 1e7 for Qwen3's vocabulary), left out like every softmax here: under 0.1% of the
    8 N_dense = 16 GFLOP per token a Qwen3-1.7B student spends sampling and training.
  - Off-policy GKD (the teacher samples): F_fwd(T) to sample, then F_fwd(T) again for the full
    logits, because sampling keeps one log-prob per position, not V logits per position (L x V
    floats per rollout), then F_train(S).
  - SeqKD (SFT on the teacher's samples): F_fwd(T) to sample, F_train(S) for the student's NLL.
    The loss reads the tokens only, so the teacher is not run again.
  - SFT on dataset responses samples nothing: F_train(S), plus F_fwd(T) only when the loss reads
    the teacher (GKD on dataset responses).
  - Passes run only for logging are not counted (train.py scores every rollout with the teacher
    to log the reverse KL, under --loss sft too): the count is the objective's cost, as Appendix B's is.

Source: `_estimate_qwen2_flops` in verl/utils/flops_counter.py (github.com/volcengine/verl), the
function VERL's FlopsCounter picks for model_type qwen2, qwen3 and llama. The paper cites commit
c936ec7; the function is identical in the two revisions read here (02cf355f, d8ecee0c).
What that estimate counts, and what it leaves out:
  - 6 = 2 FLOP per multiply-add, times 3 for the forward and a backward twice as costly.
  - 12 = two score matmuls (Q K^T and A V), 2 FLOP per multiply-add, times 3. They are counted over
    the full s x s matrix with n_heads heads (under GQA every query head still attends). The
    causal mask makes half of it dead work, which flash-attention kernels skip, so for such kernels
    this term is about twice what is executed.
  - The attention term is summed per sequence (sum of s^2), not over the packed batch.
  - 2*V*h counts the input embedding as if it were a matmul (it is a gather) plus the lm_head, so a
    model with tied embeddings (Qwen3 0.6B to 4B) has its shared matrix counted twice.
  - Norm weights (RMSNorm, Qwen3's per-head q_norm/k_norm), biases (Qwen2's qkv bias), RoPE,
    softmax, activations and the loss are not counted.
The attention overcount grows with s, so it weighs on long rollouts more than on prefixes: for a
Qwen3-1.7B student and Qwen3-8B teacher, attention is 2% of F_OPD for a 456-token rollout but 44%
for a 16584-token one, and counting only the causal half would cut the full/prefix ratio at
L_train = 256 (16384-token full rollouts, 200-token prompt) from 63.5x to 50.1x.

Departures from VERL:
  1. Returns FLOP (an exact int), not VERL's achieved TFLOP/s (VERL divides by the step time).
  2. A missing or None head_dim falls back to h // n_heads; VERL's getattr would pass None on and
     crash. Qwen3 configs always carry head_dim (128), which differs from h // n_heads for the
     0.6B, 4B and 32B models, so the fallback must not be used for them.
  3. The formula is applied to any dense config whatever its model_type (VERL reports 0 for types
     it does not know); mixture-of-experts configs are refused rather than counted as dense.
  4. Inputs are checked: an empty list, a negative or non-integer length raises ValueError.
"""

import argparse
import operator

# Qwen3 dense shapes, keyed by hub name, so no download is needed. hidden_size and
# intermediate_size as in each model's config.json (mirrored in rasbt/LLMs-from-scratch,
# pkg/llms_from_scratch/qwen3.py); layers, heads (Q / KV) and tied embeddings as in the Qwen3
# technical report (arXiv 2505.09388, Table 1) and the model cards. Every size has head_dim 128 and
# vocab 151936. tie_word_embeddings does not enter the estimate; it is kept so that
# Qwen3Config(**shape) builds the real model.
_QWEN3 = {  # size: (hidden_size, intermediate_size, num_hidden_layers, heads, kv_heads, tied)
    "0.6B": (1024, 3072, 28, 16, 8, True),
    "1.7B": (2048, 6144, 28, 16, 8, True),
    "4B": (2560, 9728, 36, 32, 8, True),
    "8B": (4096, 12288, 36, 32, 8, False),
    "14B": (5120, 17408, 40, 40, 8, False),
    "32B": (5120, 25600, 64, 64, 8, False),
}


def _qwen3_shape(hidden, intermediate, layers, heads, kv_heads, tied):
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
                vocab_size=151936, tie_word_embeddings=tied)


QWEN3_SHAPES = {f"Qwen/Qwen3-{size}": _qwen3_shape(*dims) for size, dims in _QWEN3.items()}
# the -Base checkpoints share their model's shape; Qwen3-32B has no released -Base checkpoint
QWEN3_SHAPES.update({f"{name}-Base": shape for name, shape in list(QWEN3_SHAPES.items())
                     if name != "Qwen/Qwen3-32B"})

_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "vocab_size")
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def config_for(name_or_config):
    """A hub name in QWEN3_SHAPES gives a copy of its shape dict; any other name or local path is
    loaded with AutoConfig; a config object or dict is returned unchanged."""
    if not isinstance(name_or_config, str):
        return name_or_config
    if name_or_config in QWEN3_SHAPES:
        return dict(QWEN3_SHAPES[name_or_config])
    from transformers import AutoConfig  # imported here: the cost model itself needs no torch
    return AutoConfig.from_pretrained(name_or_config)


def _shape(config):
    """The integers the estimate reads, from a transformers config, a dict, or a name."""
    config = config_for(config)
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    if any(get(key) for key in _MOE_FIELDS):
        raise ValueError("mixture-of-experts config: this cost model is for dense models only")
    missing = [key for key in _FIELDS if get(key) is None]
    if missing:
        raise ValueError(f"config lacks {missing}; need {list(_FIELDS)} and optionally head_dim")
    shape = {key: int(get(key)) for key in _FIELDS}
    shape["head_dim"] = int(get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"])
    return shape


def model_shape(name_or_config) -> dict:
    """The integers of _shape plus tie_word_embeddings, from a hub name, a path or a config."""
    config = config_for(name_or_config)
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    return _shape(config) | {"tied": bool(get("tie_word_embeddings"))}


def _check_seqlens(seqlens):
    try:
        seqlens = [operator.index(s) for s in seqlens]
    except TypeError as err:
        raise ValueError(f"seqlens must be integer token counts, one per sequence; "
                         f"got {seqlens!r}") from err
    if not seqlens:
        raise ValueError("seqlens is empty: pass one prompt+response length per rollout")
    if min(seqlens) < 0:
        raise ValueError(f"sequence lengths must be >= 0, got {min(seqlens)}")
    return seqlens


def dense_params(config):
    """N_dense: the matmul weights VERL counts, embedding and lm_head both, even when tied."""
    c = _shape(config)
    h, d = c["hidden_size"], c["head_dim"]
    q_size = o_size = c["num_attention_heads"] * d
    k_size = v_size = c["num_key_value_heads"] * d
    mlp = 3 * h * c["intermediate_size"]  # gate_proj, up_proj, down_proj (SwiGLU)
    attn = h * (q_size + k_size + v_size + o_size)  # q_proj, k_proj, v_proj, o_proj
    return c["num_hidden_layers"] * (mlp + attn) + 2 * c["vocab_size"] * h


def train_flops(config, seqlens):
    """F_train: forward + backward FLOP of one update on sequences of these lengths."""
    c = _shape(config)
    seqlens = _check_seqlens(seqlens)
    dense = 6 * dense_params(c) * sum(seqlens)
    attn = 12 * sum(s * s for s in seqlens) * c["head_dim"] * c["num_attention_heads"] \
        * c["num_hidden_layers"]  # per sequence: sum of s^2, full s x s scores
    return dense + attn


def forward_flops(config, seqlens):
    """F_fwd = F_train / 3 (exact: both terms of F_train are multiples of 3)."""
    return train_flops(config, seqlens) // 3


def opd_flops(student_config, teacher_config, seqlens):
    """F_OPD for rollouts of these prompt+response lengths (Appendix B)."""
    return (train_flops(student_config, seqlens)          # student update, forward + backward
            + 2 * forward_flops(student_config, seqlens)  # sampling + old log-prob pass
            + forward_flops(teacher_config, seqlens))     # teacher_logp


LOSSES = ("opd", "gkd", "sft")
ROLLOUT_SOURCES = ("student", "teacher", "dataset")


def step_flops(student_config, teacher_config, seqlens, loss: str = "opd", rollouts_from: str = "student") -> int:
    """FLOP of one step of this objective on sequences of these prompt+response lengths (the table in
    the module docstring). teacher_config may be None where the teacher is not run (sft on the
    student's samples or on dataset responses)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if rollouts_from not in ROLLOUT_SOURCES:
        raise ValueError(f"rollouts_from must be one of {ROLLOUT_SOURCES}, got {rollouts_from!r}")
    if loss == "opd":
        if rollouts_from != "student":
            raise ValueError(f"OPD's estimator needs the student's own rollouts, not {rollouts_from} ones")
        return opd_flops(student_config, teacher_config, seqlens)
    if teacher_config is None and (loss == "gkd" or rollouts_from == "teacher"):
        raise ValueError(f"loss {loss!r} with {rollouts_from} rollouts runs the teacher: pass its config")
    flops = train_flops(student_config, seqlens)  # the student's update, forward + backward
    if rollouts_from == "student":
        flops += forward_flops(student_config, seqlens)  # the student samples
    elif rollouts_from == "teacher":
        flops += forward_flops(teacher_config, seqlens)  # the teacher samples
    if loss == "gkd":
        flops += forward_flops(teacher_config, seqlens)  # the teacher's full next-token distributions
    return flops


def rollout_flops(student_config, teacher_config, on_policy_seqlens, off_policy_seqlens, loss: str = "opd",
                  rollouts_from: str = "student") -> int:
    """FLOP of a step's rollouts, per objective and per who wrote them: the on-policy ones as the
    student's, the others as `rollouts_from`'s (GKD's lambda mixes the two)."""
    total = 0
    for seqlens, source in ((on_policy_seqlens, "student"), (off_policy_seqlens, rollouts_from)):
        if seqlens:
            total += step_flops(student_config, teacher_config, seqlens, loss=loss, rollouts_from=source)
    return total


def planned_flops(student_config, teacher_config, rollouts: int, on_policy_share: float, seqlen: int,
                  loss: str = "opd", rollouts_from: str = "student") -> int:
    """rollout_flops of a step whose rollouts all have seqlen tokens (prompt + L_train), a share of
    them on-policy: the cost a schedule plans for before any rollout is drawn."""
    on = round(rollouts * on_policy_share)
    return rollout_flops(student_config, teacher_config, [seqlen] * on, [seqlen] * (rollouts - on), loss,
                         rollouts_from)


# Dense bf16 tensor-core peaks, FLOP/s, from the vendors' datasheets (without sparsity): the
# denominator of the logged MFU, as verl logs it. Matched against torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "H800": 989e12,
                   "H20": 148e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A800": 312e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12, "MI300X": 1307e12}


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a GPU by its name (the longest table key it contains), None if unknown
    (a CPU, or a GPU not in the table: give train.py --peak-tflops)."""
    if not device_name:
        return None
    keys = [k for k in PEAK_BF16_FLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_FLOPS[max(keys, key=len)] if keys else None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Per-rollout FLOP of prefix OPD vs full OPD.")
    parser.add_argument("--student", default="Qwen/Qwen3-1.7B-Base",
                        help="student: hub name in QWEN3_SHAPES, or a path AutoConfig can read")
    parser.add_argument("--teacher", default="Qwen/Qwen3-8B", help="teacher, same forms")
    parser.add_argument("--prompt_len", type=int, default=200, help="prompt length (tokens)")
    parser.add_argument("--L_train", type=int, nargs="+", default=[256, 1024, 4096, 16384],
                        help="prefix lengths (response tokens kept per rollout)")
    parser.add_argument("--full_len", type=int, default=16384,
                        help="response length of a full-OPD rollout (tokens); it assumes every "
                             "rollout runs to this cap, an upper bound on full OPD's cost")
    args = parser.parse_args(argv)

    # per-token cost at short context, where the attention term vanishes
    train_per_token, fwd_per_token = 6 * dense_params(args.student), 2 * dense_params(args.teacher)
    print(f"student {args.student}: {train_per_token / 1e9:.2f} GFLOP/token to train")
    print(f"teacher {args.teacher}: {fwd_per_token / 1e9:.2f} GFLOP/token forward")
    full = opd_flops(args.student, args.teacher, [args.prompt_len + args.full_len])
    print(f"per rollout, prompt {args.prompt_len} tokens, full OPD samples {args.full_len} tokens")
    print(f"{'L_train':>8} {'prefix OPD TFLOP':>17} {'full OPD TFLOP':>15} {'full/prefix':>12}")
    for L_train in args.L_train:
        seqlen = args.prompt_len + min(L_train, args.full_len)
        prefix = opd_flops(args.student, args.teacher, [seqlen])
        print(f"{L_train:>8} {prefix / 1e12:>17.3f} {full / 1e12:>15.3f} {full / prefix:>11.1f}x")


if __name__ == "__main__":
    main()
