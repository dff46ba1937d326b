"""
Prefix on-policy distillation: the training loop.

One step (paper §3, Algorithm of prefix OPD):
    L_train  = schedule(step)                                   schedule.py
    y ~ q(. | x), stopped after L_train tokens                  sample.py  (the student samples)
    log pi_T(y_t), log pi_theta(y_t) for every sampled token     score.py   (teacher, then student)
    loss = -(1/N) sum_seq sum_t rho_t (log pi_T - log q)(y_t)   loss.py    (Eq. 1, policy gradient)
    backward, clip, AdamW step, push weights to the sampler, log, checkpoint.

Run:
    python train.py                                    # the toy preset on a CPU (or 1.7B preset on a GPU)
    torchrun --nproc_per_node=8 train.py --prefix 1024 # the paper's Qwen3-1.7B-Base <- Qwen3-8B setup

Departures from the paper:
1. The loss is averaged over the sequences of the global batch and summed over tokens (loss.py);
   DDP and gradient accumulation reproduce exactly one big batch (tests/test_train.py).
2. Rollouts are seeded per prompt, not per rank (sample.py), so the result does not depend on the
   number of processes.
3. A step with a non-finite gradient norm is skipped, not applied; many in a row abort the run with
   the last checkpoint intact.
4. The toy preset trains a ~1M-parameter student for a few dozen steps on a synthetic task (toy.py)
   with a schedule scaled to its ~200-token responses.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import klprobe
import memory
from flops import step_flops
from loss import gkd_loss, opd_loss, reverse_kl_stats
from sample import HFSampler, build_prompt, describe_backend
from schedule import AdaptivePrefix, check_window, prefix_length, token_mask
from score import check_same_vocabulary, check_sampling_is_scorable, position_logits, token_logprobs

# ----------------------------------------------------------------------------- presets
# The single source of every preset-dependent default: a flag left unset takes its preset's value.
PRESETS = {
    "toy": dict(student="toy/student", teacher="toy/teacher", dataset="toy", prefix=64, prefix_step=32,
                max_new_tokens=320, prompts_per_step=16, samples_per_prompt=4, lr=3e-4, steps=16,
                micro_batch_tokens=16384, eval_problems=256, kl_bin=32, activation_checkpointing=False,
                vllm_sleep=False),
    "qwen3-1.7b": dict(student="Qwen/Qwen3-1.7B-Base", teacher="Qwen/Qwen3-8B",
                       dataset="open-thoughts/OpenThoughts3-1.2M", prefix=1024, prefix_step=0,
                       max_new_tokens=16384, prompts_per_step=512, samples_per_prompt=4, lr=5e-5, steps=60,
                       micro_batch_tokens=4096, eval_problems=0, kl_bin=256, activation_checkpointing=True,
                       vllm_sleep=False),
    "qwen3-8b": dict(student="Qwen/Qwen3-8B-Base", teacher="Qwen/Qwen3-8B",
                     dataset="open-thoughts/OpenThoughts3-1.2M", prefix=1024, prefix_step=0,
                     max_new_tokens=16384, prompts_per_step=512, samples_per_prompt=4, lr=5e-5, steps=60,
                     micro_batch_tokens=16384, eval_problems=0, kl_bin=256, activation_checkpointing=True,
                     vllm_sleep=True),
}

parser = argparse.ArgumentParser(description="Prefix on-policy distillation (arXiv 2602.15260)")
parser.add_argument("--preset", choices=PRESETS, default=None, help="toy on CPU, qwen3-1.7b on CUDA, unless given")
g = parser.add_argument_group("models")
g.add_argument("--student", help="student: hub name or local dir (trained, samples the rollouts)")
g.add_argument("--teacher", help="teacher: hub name or local dir (fixed, scores the rollouts); same vocabulary")
g = parser.add_argument_group("data")
g.add_argument("--dataset", help="'toy', a Hugging Face dataset name, or a local JSONL with a 'problem' field "
               "(and a 'response' for --rollouts-from dataset)")
g.add_argument("--num-questions", type=int, default=None, help="use the first N questions of the dataset "
               "(hub datasets are streamed: only those rows are read; paper: 30,700 of OpenThoughts3)")
g.add_argument("--max-context", type=int, default=None, help="tokens of prompt + response a model may see "
               "(default: the student's max_position_embeddings); longer prompts are skipped and counted")
g = parser.add_argument_group("prefix")
g.add_argument("--prefix", type=int, help="L_train at step 0, in tokens; 0 = full OPD up to --max-new-tokens")
g.add_argument("--prefix-step", type=int, help="delta_L: tokens added to L_train after every step (0 = fixed)")
g.add_argument("--max-new-tokens", type=int, help="L_max: the cap on L_train and on full OPD (paper: 16384)")
g.add_argument("--adaptive", action="store_true", help="grow L_train by --prefix-step only when the KL says the "
               "prefix is learnt (schedule.AdaptivePrefix: a plateau, or --kl-probe finds the KL beyond it higher)")
g.add_argument("--adaptive-window", type=int, default=2, help="adaptive: steps per window of the plateau rule "
               "(and the fewest steps at one L_train)")
g.add_argument("--adaptive-min-decrease", type=float, default=0.05, help="adaptive: grow when the prefix KL fell "
               "by less than this fraction from one window to the next")
g.add_argument("--adaptive-kl-ratio", type=float, default=1.0, help="adaptive: grow when the probe's KL inside the "
               "prefix is <= this times its KL over the next --prefix-step positions")
g.add_argument("--window", type=int, nargs=2, metavar=("A", "B"), default=None,
               help="train only on response tokens A <= t < B (paper Table 3 ablation)")
g.add_argument("--last-n", type=int, default=None, help="train only on each rollout's last N tokens (Table 3)")
g = parser.add_argument_group("objective")
g.add_argument("--loss", choices=["opd", "gkd", "sft"], default="opd",
               help="opd: sampled reverse KL (Eq. 1); gkd: full-vocabulary generalized JSD; sft: SeqKD NLL")
g.add_argument("--rollouts-from", choices=["student", "teacher", "dataset"], default="student",
               help="who writes the rollouts: student = on-policy; teacher = its samples; dataset = the "
               "dataset's reference responses cut at L_train (SeqKD: --loss sft; off-policy GKD)")
g.add_argument("--lmbda", type=float, default=None, help="GKD's lambda: each prompt's rollouts come from the "
               "student with this probability, else from --rollouts-from (teacher or dataset)")
g.add_argument("--beta", type=float, default=0.5, help="GKD beta: 0 forward KL(T||S), 1 reverse KL(S||T)")
g.add_argument("--gamma", type=float, default=0.0, help="discount over future per-token advantages (paper: 0)")
g.add_argument("--ratio-cap", type=float, default=None, help="truncate importance ratios at this value (off)")
g = parser.add_argument_group("optimisation")
g.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step, global (paper: 512)")
g.add_argument("--samples-per-prompt", type=int, help="rollouts per prompt (paper: 4)")
g.add_argument("--lr", type=float, help="AdamW learning rate, constant (paper: 5e-5)")
g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
g.add_argument("--steps", type=int, help="optimizer steps (paper: 60)")
g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
g.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward micro-batch")
g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
g.add_argument("--top-p", type=float, default=1.0, help="sampling nucleus (paper: 1.0)")
g.add_argument("--seed", type=int, default=0, help="seeds data order and every rollout")
g.add_argument("--max-bad-steps", type=int, default=3, help="abort after this many non-finite steps in a row")
g = parser.add_argument_group("run")
g.add_argument("--out", default=None, help="run directory (default: runs/<preset>)")
g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out "
               "(refused if a run-defining flag differs from the checkpoint's)")
g.add_argument("--overwrite", action="store_true", help="replace the run in --out (without it, a fresh run into "
               "a directory holding checkpoints is refused)")
g.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 (bf16 compute, activation "
               "checkpointing) instead of DDP: for students whose AdamW state does not fit one GPU")
g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute each "
               "decoder layer in backward: less memory for long sequences (always on with --fsdp; preset default)")
g.add_argument("--sampler", choices=["hf", "vllm"], default=None, help="rollout engine (default: vllm when it "
               "is installed and CUDA is present, else hf)")
g.add_argument("--vllm-kv-cache-gb", type=float, default=None, help="vLLM KV-cache budget per rank, GiB "
               "(default: 10 on GPUs)")
g.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction, help="GPU only: free the vLLM engine's "
               "weights and KV cache while the trainer scores and updates (preset default; on for qwen3-8b)")
g.add_argument("--check-push", action="store_true", help="after every weight push, compare the sampler's "
               "log-probs of this step's first rollout with the trainer's; logs push_logp_max_diff")
g.add_argument("--eval-problems", type=int, help="toy only: held-out problems graded before and after")
g.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True, help="toy only: also grade "
               "the teacher and the untrained student (a sweep needs them once, not in every run)")
g.add_argument("--kl-bin", type=int, help="tokens per position bin of the logged reverse KL (paper figures: 256)")
g.add_argument("--kl-probe-every", type=int, default=0, help="after step 1 and every N steps, sample full-length rollouts of a fixed "
               "probe set and log their reverse KL by position over the whole response (0: off; evaluation "
               "FLOP, left out of total_flops)")
g.add_argument("--kl-probe-prompts", type=int, default=16, help="prompts in the KL probe set (one rollout each)")
g.add_argument("--no-plots", action="store_true", help="skip the PNG plots at the end")
g = parser.add_argument_group("memory plan (memory.py)")
g.add_argument("--dry-run", action="store_true", help="print the per-GPU memory plan, FLOP and projected hours, "
               "then exit (0: fits, 1: does not); loads no weights")
g.add_argument("--gpu-memory-gb", type=float, default=None, help="memory budget per GPU, GB (default: the "
               "device's, or 80 without a GPU)")
g.add_argument("--gpus", type=int, default=None, help="--dry-run: processes planned for (default: the "
               "torchrun world size, else 8 for the Qwen3 presets and 1 for the toy)")
g.add_argument("--prompt-tokens", type=int, default=512, help="--dry-run: the longest prompt the plan assumes, "
               "tokens (a real run plans with its data's longest prompt)")
g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard in --out")
g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
args = parser.parse_args()


# ----------------------------------------------------------------------------- distributed setup
ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
if ddp:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
else:
    rank, world_size = 0, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
is_main = rank == 0


def print0(*a, **kw):
    if is_main:
        print(*a, **kw, flush=True)


if args.preset is None:  # a dry run plans a GPU run
    args.preset = "qwen3-1.7b" if torch.cuda.is_available() or args.dry_run else "toy"
    print0(f"preset: {args.preset} ({'CUDA is available' if torch.cuda.is_available() else 'no GPU found'})")
for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
if args.preset == "toy" and args.student == "toy/student":
    import toy
    args.teacher, args.student = map(str, toy.ensure_built())
args.out = Path(args.out or f"runs/{args.preset}")
if args.prefix < 0:
    raise SystemExit(f"error: --prefix must be >= 0 tokens (0 = full OPD up to --max-new-tokens), got {args.prefix}")
L_0 = args.prefix if args.prefix > 0 else args.max_new_tokens  # --prefix 0: full OPD
check_window(tuple(args.window) if args.window else None, args.last_n)
if args.adaptive and args.prefix_step < 1:
    raise SystemExit("error: --adaptive grows L_train by --prefix-step tokens: give --prefix-step >= 1")
if L_0 < 1 or args.max_new_tokens < 1:
    raise SystemExit(f"error: L_train must be >= 1 token (got --prefix {args.prefix}, --max-new-tokens "
                     f"{args.max_new_tokens})")
if args.prompts_per_step % world_size:
    raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must divide evenly over {world_size} ranks")
if args.check_push and not (args.sampler == "vllm" and args.rollouts_from == "student" and args.lmbda is None):
    raise SystemExit("error: --check-push compares a separate sampling engine with the trainer: it needs "
                     "--sampler vllm and the student's rollouts")
if args.loss == "opd" and (args.rollouts_from != "student" or args.lmbda is not None):
    raise SystemExit("error: the OPD estimator needs the student's own rollouts; use --loss gkd or sft off-policy")
if args.lmbda is not None and (args.rollouts_from == "student" or not 0 <= args.lmbda <= 1):
    raise SystemExit("error: --lmbda p in [0, 1] mixes the student's rollouts with --rollouts-from teacher or dataset")
student_samples = args.rollouts_from == "student" or bool(args.lmbda)  # is the student ever sampled?
sampler_given = args.sampler is not None
if args.sampler is None:  # vLLM where it runs at its best; the transformers loop everywhere else
    vllm_found = importlib.util.find_spec("vllm") is not None
    args.sampler = "vllm" if vllm_found and (torch.cuda.is_available() or args.dry_run) else "hf"
if args.vllm_sleep and not args.dry_run and not torch.cuda.is_available():
    raise SystemExit("error: --vllm-sleep needs a GPU (vLLM's CPU backend cannot sleep); use --no-vllm-sleep")
if args.gpu_memory_gb is None:
    args.gpu_memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 80.0
L_max = prefix_length(args.steps - 1, L_0, args.prefix_step, args.max_new_tokens)  # the run's longest L_train
if args.loss == "opd":  # the ratio pi_theta / q must compare the distribution the sampler drew from
    try:
        check_sampling_is_scorable(args.temperature, args.top_p)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def rollout_flops(student_config, teacher_config, on_policy_seqlens, off_policy_seqlens):
    """App. B FLOP of a step's rollouts, counted per objective and per who wrote them (flops.step_flops)."""
    total = 0
    for seqlens, source in ((on_policy_seqlens, "student"), (off_policy_seqlens, args.rollouts_from)):
        if seqlens:
            total += step_flops(student_config, teacher_config, seqlens, loss=args.loss, rollouts_from=source)
    return total


def planned_flops(student_config, teacher_config, prompt_tokens: int, L_train: int) -> int:
    """rollout_flops of one step whose rollouts all reach L_train; a share --lmbda of them on-policy."""
    rollouts = args.prompts_per_step * args.samples_per_prompt
    on = round(rollouts * (args.lmbda if args.lmbda is not None else args.rollouts_from == "student"))
    return rollout_flops(student_config, teacher_config, [prompt_tokens + L_train] * on,
                         [prompt_tokens + L_train] * (rollouts - on))


if args.dry_run:  # the plan for a GPU run of these flags, from the model shapes alone (memory.py, flops.py)
    gpus = args.gpus or (world_size if ddp else 1 if args.preset == "toy" else 8)
    context = dict(world_size=gpus, prompt_tokens=args.prompt_tokens, L_max=L_max, on_gpu=True)
    memory_plan = memory.plan_run(args, **context)
    per_step = [planned_flops(args.student, args.teacher, args.prompt_tokens,
                              prefix_length(k, L_0, args.prefix_step, args.max_new_tokens)) for k in range(args.steps)]
    hours = sum(per_step) / (gpus * memory.GPU_PEAK_FLOPS * memory.UTILISATION) / 3600
    print0(f"dry run: {args.student} <- {args.teacher} on {gpus} GPU(s) of {args.gpu_memory_gb:.0f} GB, "
           f"{'FSDP2' if args.fsdp else 'DDP'}, sampler {args.sampler}, L_train {L_0} + {args.prefix_step}/step "
           f"up to {L_max}, prompts of <= {args.prompt_tokens} tokens\n\n{memory_plan.table()}\n")
    print0(f"FLOP (App. B, every rollout reaching L_train): {per_step[0]:.3e} at step 1, {sum(per_step):.3e} "
           f"for {args.steps} steps; {hours:.1f} h at {memory.UTILISATION:.0%} of {memory.GPU_PEAK_FLOPS / 1e12:.0f} "
           f"TFLOP/s per GPU (an assumption, not a measurement)")
    hint = None if memory_plan.fits else memory.fit_hint(args, **context)
    if hint:
        print0(f"does not fit; with {hint} it would")
    print0(json.dumps({"fits": memory_plan.fits, "peak_gb": round(memory_plan.peak_gb, 2),
                       "budget_gb": args.gpu_memory_gb, "gpus": gpus, "sampler": args.sampler,
                       "hf_batch": memory_plan.hf_batch, "flops_step_1": per_step[0],
                       "flops_total": sum(per_step), "hours": round(hours, 2), "fit_hint": hint,
                       "parts": {f"{part} [{phase}]": round(b / 1e9, 2) for part, phase, b, _ in memory_plan.rows}}))
    raise SystemExit(0 if memory_plan.fits else 1)
try:  # a local path that is not there: one line, not the traceback of a hub lookup
    from eval import check_model_path
    args.student, args.teacher = check_model_path(args.student, "--student"), check_model_path(args.teacher, "--teacher")
except ValueError as e:
    raise SystemExit(f"error: {e}")
resume_from = checkpoint.open_run_dir(args.out, args)  # --resume/--overwrite checks; loaded once the model is wrapped
torch.manual_seed(args.seed + rank)
random.seed(args.seed)
np.random.seed(args.seed)
if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores


# ----------------------------------------------------------------------------- models
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402  (after the distributed setup)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # one progress bar: ours

try:
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher)
except OSError as e:  # a hub name that does not resolve, or a directory without a tokenizer
    raise SystemExit(f"error: cannot load the tokenizers of {args.student} and {args.teacher}: {str(e).splitlines()[0]}")
try:  # before any sampling (paper §8), then again once the output layers are loaded
    check_same_vocabulary(tokenizer, teacher_tokenizer)
except ValueError as e:
    raise SystemExit(f"error: student {args.student}, teacher {args.teacher}: {e}")
half = torch.bfloat16 if device.type == "cuda" else torch.float32
student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)  # fp32 master weights
if not args.fsdp:  # under FSDP2 it stays on the CPU: fully_shard moves only this rank's shard to the GPU
    student = student.to(device)
teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=half).to(device).eval().requires_grad_(False)
try:
    check_same_vocabulary(tokenizer, teacher_tokenizer, student, teacher)
except ValueError as e:
    raise SystemExit(f"error: student {args.student}, teacher {args.teacher}: {e}")
student.config.use_cache = False
max_context = args.max_context or student.config.max_position_embeddings


# ----------------------------------------------------------------------------- checkpoints
ckpt_dir = args.out / "checkpoints"


class LogProbs(torch.nn.Module):
    """What DDP or FSDP wraps: its forward is the student's per-token log-probs, so the wrapper's
    hooks (gradient all-reduce, parameter all-gather) see every parameter."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, logits_at=None, temperature=1.0):
        if logits_at is not None:  # GKD: the whole next-token distribution, at these positions only
            return position_logits(self.lm, input_ids, attention_mask, logits_at)
        return token_logprobs(self.lm, input_ids, attention_mask, temperature=temperature)


if args.activation_checkpointing or args.fsdp:  # each decoder layer keeps only its input and recomputes in backward
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = LogProbs(student)
raw_student = student  # the unwrapped HF model: for sampling, weight pushes and save_pretrained
if args.fsdp:  # FSDP2: each decoder layer is a shard unit, the root holds embeddings, norm and lm_head
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world_size,))
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()  # bf16 compute, fp32 master weights and reductions
    for layer in student.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)
elif ddp:  # gradients live in DDP's all-reduce buckets: no second copy
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
start_step, total_flops, wall_before, meta = 0, 0.0, 0.0, {}
if resume_from is not None:  # each rank reads its own shard of weights and AdamW state
    meta = checkpoint.load(resume_from, model, optimizer)
    start_step, total_flops, wall_before = meta["step"], meta["total_flops"], meta["wall_seconds"]
    print0(f"resumed from {resume_from} at step {start_step}")
adaptive = None
if args.adaptive:  # schedule.py: L_train grows when the KL signal says the prefix is learnt
    adaptive = AdaptivePrefix(L_0, args.prefix_step, args.max_new_tokens, min_steps=args.adaptive_window,
                              window=args.adaptive_window, min_rel_decrease=args.adaptive_min_decrease,
                              kl_ratio=args.adaptive_kl_ratio)
    if "adaptive" in meta:
        adaptive.load_state_dict(meta["adaptive"])


def save_checkpoint(step: int, meta: dict):
    checkpoint.save(ckpt_dir, step, model, optimizer, raw_student, tokenizer, meta, sharded=args.fsdp,
                    is_main=is_main)


# The sampler: with DDP and the transformers backend, the trainer's own module. Under FSDP the
# parameters are sharded and rank-local decode loops (each rank stops at its own EOS) cannot
# all-gather in step, so a bf16 copy samples; vLLM holds its own copy. Copies receive the student's
# weights after every optimizer step, streamed one tensor at a time.
vllm_samples = args.sampler == "vllm" and student_samples
student_copy = None
if args.fsdp and not vllm_samples:
    student_copy = AutoModelForCausalLM.from_pretrained(args.student, dtype=half).to(device).eval()
eval_student = student_copy if args.fsdp else raw_student  # the toy evaluation runs on rank 0 alone
teacher_sampler = HFSampler(teacher, tokenizer, temperature=args.temperature, top_p=args.top_p) \
    if args.rollouts_from == "teacher" else None
if vllm_samples:
    from sample import VLLMSampler
    sampler = VLLMSampler(args.student, seed=args.seed + rank, temperature=args.temperature, top_p=args.top_p,
                          kv_cache_gb=args.vllm_kv_cache_gb, dtype="bfloat16" if device.type == "cuda" else "float32",
                          max_model_len=max_context, enable_sleep_mode=args.vllm_sleep)
else:
    sampler = HFSampler(eval_student, tokenizer, temperature=args.temperature, top_p=args.top_p)
print0(describe_backend("vllm" if vllm_samples else "hf")
       + (" (the default: vLLM is installed and CUDA is present)" if vllm_samples and not sampler_given else "")
       + ("" if args.rollouts_from == "student" else f"; off-policy rollouts from the {args.rollouts_from}"
          + (f" for a share 1 - {args.lmbda:g} of the prompts" if args.lmbda is not None else "")))
needs_push = student_copy is not None or vllm_samples


def student_weights(dtype):
    """(name, tensor) of the student's full weights, one at a time, cast to dtype. Under FSDP2 each is
    all-gathered just before it is yielded and freed after: a collective, every rank iterates in step."""
    for name, tensor in raw_student.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard
            tensor = tensor.full_tensor()
        yield name, tensor.detach().to(dtype)


@torch.no_grad()
def push_weights():
    """Send the student's new weights to the copy that samples (a collective under FSDP)."""
    if student_copy is not None:
        copy_state = student_copy.state_dict()
        for name, tensor in student_weights(half):
            copy_state[name].copy_(tensor)
    if vllm_samples:
        sampler.push_weights(student_weights(torch.bfloat16 if device.type == "cuda" else torch.float32))


if needs_push and resume_from is not None:
    push_weights()


# ----------------------------------------------------------------------------- data
try:  # problems, and the reference responses of --rollouts-from dataset (data.py)
    examples = data.load_examples(args.dataset, seed=args.seed, num_questions=args.num_questions)
except ValueError as e:
    raise SystemExit(f"error: {e}")
prompts = [build_prompt(tokenizer, e.problem) for e in examples]
fits = [len(p) + args.max_new_tokens <= max_context for p in prompts]
prompts_skipped = fits.count(False)  # longer than the context: never sampled, counted in the log
examples, prompts = [e for e, ok in zip(examples, fits) if ok], [p for p, ok in zip(prompts, fits) if ok]
if len(prompts) < args.prompts_per_step:
    raise SystemExit(f"error: {len(prompts)} usable prompts, fewer than --prompts-per-step {args.prompts_per_step}")
responses = [data.response_ids(tokenizer, e.response) for e in examples] if args.rollouts_from == "dataset" else None
end_of_turn = data.end_of_turn_id(tokenizer)  # what a whole reference response ends with
if responses is not None and None in responses:
    raise SystemExit(f"error: --rollouts-from dataset needs a reference response for every problem; {args.dataset} "
                     f"has none for problem {responses.index(None)}")


def step_prompts(step: int) -> list[int]:
    """Global prompt indices of a step: epochs of a seeded permutation, the same on every rank."""
    per_epoch = len(prompts) // args.prompts_per_step
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(prompts))
    return order[k * args.prompts_per_step:(k + 1) * args.prompts_per_step].tolist()


# ----------------------------------------------------------------------------- derived values
rollouts_per_step = args.prompts_per_step * args.samples_per_prompt
mean_prompt = sum(map(len, prompts)) / len(prompts)
L_now = prefix_length(start_step, L_0, args.prefix_step, args.max_new_tokens)
flops_now = planned_flops(student.config, teacher.config, round(mean_prompt), L_now)
print0(f"student {args.student} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params), "
       f"teacher {args.teacher}, {world_size} process(es) on {device.type}")
print0(f"prompts: {len(prompts)} usable, {prompts_skipped} skipped as longer than the context ({max_context})")
print0(f"per step: {args.prompts_per_step} prompts x {args.samples_per_prompt} = {rollouts_per_step} rollouts, "
       f"<= {rollouts_per_step * L_now} response tokens at L_train={L_now} "
       f"(schedule: {L_0} + {args.prefix_step}/step, cap {args.max_new_tokens}); "
       f"<= {flops_now:.3g} FLOP at that L (App. B)")
# The memory plan at this data's longest prompt (memory.py): on a GPU, stop now, not at an OOM an hour in.
plan_context = dict(world_size=world_size, prompt_tokens=max(map(len, prompts)), L_max=L_max,
                    on_gpu=device.type == "cuda")
memory_plan = memory.plan_run(args, **plan_context)
if device.type == "cuda":
    print0(f"memory plan: peak {memory_plan.peak_gb:.1f} of {args.gpu_memory_gb:.0f} GB per GPU "
           f"(the table: the same command with --dry-run)")
    if not memory_plan.fits:
        hint = memory.fit_hint(args, **plan_context)
        raise SystemExit(f"error: this run needs {memory_plan.peak_gb:.0f} GB per GPU, more than "
                         f"--gpu-memory-gb {args.gpu_memory_gb:.0f}; " + (f"add {hint}" if hint else "no single flag fixes it"))
    if isinstance(sampler, HFSampler):
        sampler.kv_cache_bytes = memory_plan.hf_kv_cache_bytes  # the batch fills what the plan leaves


# ----------------------------------------------------------------------------- helpers of the loop
def sample_rollouts(step, indices, global_ids, L_train):
    """This rank's rollouts and how many of its prompts were on-policy: per prompt, from the student (with
    probability --lmbda, or always when it is the source) or from the off-policy source, stopped at L_train
    and seeded per (step, prompt, sample)."""
    on = data.on_policy_prompts(global_ids, args.lmbda, args.seed, step) if args.lmbda is not None \
        else [args.rollouts_from == "student"] * len(indices)
    rollouts = []
    for policy in (True, False):
        mine = [(i, g) for i, g, o in zip(indices, global_ids, on) if o == policy]
        if not mine:
            continue
        ids, gids = [prompts[i] for i, _ in mine], [g for _, g in mine]
        if policy:
            rollouts += sampler.generate(ids, args.samples_per_prompt, L_train, args.seed, prompt_indices=gids)
        elif args.rollouts_from == "dataset":
            rollouts += data.reference_rollouts(ids, [responses[i] for i, _ in mine], args.samples_per_prompt,
                                                L_train, end_of_turn, gids)
        else:
            rollouts += teacher_sampler.generate(ids, args.samples_per_prompt, L_train, args.seed, prompt_indices=gids)
    return rollouts, sum(on)


probe_prompts = np.random.default_rng([args.seed, 1]).permutation(len(prompts))[:args.kl_probe_prompts].tolist()


def kl_probe():
    """The reverse KL by position over whole responses (klprobe.py) of the fixed probe prompts, summed over
    ranks. Evaluation: its FLOP stay out of total_flops. Seeds of its own (negative prompt indices)."""
    mine = probe_prompts[rank::world_size]
    part = klprobe.kl_by_position(sampler, teacher, [prompts[i] for i in mine], args.max_new_tokens, args.seed,
                                  prompt_indices=[-1 - i for i in mine], pad_token_id=tokenizer.pad_token_id,
                                  batch_size=max(1, args.micro_batch_tokens // (max(map(len, prompts)) + args.max_new_tokens)))
    sums, counts = all_sum(part.sums.to(device)), all_sum(part.counts.to(device))
    return klprobe.PositionKL(sums.cpu(), counts.cpu())


def pad_rollouts(rollouts):
    """Right-padded prompt+completion ids, and where each completion starts."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rollouts), T), dtype=torch.long)
    for b, r in enumerate(rollouts):
        row = r.prompt_ids + r.completion_ids
        ids[b, :len(row)], attn[b, :len(row)] = torch.tensor(row), 1
    starts = torch.tensor([len(r.prompt_ids) for r in rollouts])
    lengths = torch.tensor([len(r.completion_ids) for r in rollouts])
    return ids.to(device), attn.to(device), starts.to(device), lengths.to(device)


def completion_index(starts, C, T):
    """(B, C) positions whose next-token prediction is a completion token (clamped inside the row)."""
    index = starts[:, None] - 1 + torch.arange(C, device=starts.device)[None, :]
    return index.clamp(max=T - 2)


def completion_part(per_position, starts, C):
    """(B, T-1) per-position values -> (B, C) values at the completion tokens."""
    return per_position.gather(1, completion_index(starts, C, per_position.shape[1] + 1))


def prepare(group):
    """One micro-batch: padded ids, the completion's mask and its sampler log-probs, and (but for GKD,
    which scores inside the update) the teacher's log-prob of every sampled token."""
    ids, attn, starts, lengths = pad_rollouts(group)
    C = int(lengths.max())
    mask = token_mask(lengths, C, tuple(args.window) if args.window else None, args.last_n)
    sampler_logp = torch.zeros(len(group), C, device=device)
    for b, r in enumerate(group):
        sampler_logp[b, :len(r.sampler_logp)] = torch.tensor(r.sampler_logp)
    teacher_logp = None
    if args.loss != "gkd":
        with torch.no_grad(), autocast:
            teacher_logp = completion_part(token_logprobs(teacher, ids, attn), starts, C).float()
    return dict(ids=ids, attn=attn, starts=starts, C=C, mask=mask, sampler_logp=sampler_logp, teacher_logp=teacher_logp)


def same_count_on_every_rank(batches):
    """Pad with zero-weight copies of the last micro-batch (mask 0: no loss, no gradient, no statistics)
    up to the largest count over ranks. Under FSDP2 every student forward and backward is a collective,
    so a rank with fewer micro-batches would leave the others waiting forever. Returns the padded
    list and every rank's own count."""
    counts = torch.zeros(world_size, dtype=torch.long, device=device)
    counts[rank] = len(batches)
    counts = all_sum(counts).tolist()
    zero_weight = batches[-1] | {"mask": torch.zeros_like(batches[-1]["mask"])}
    return batches + [zero_weight] * (max(counts) - len(batches)), counts


def objective(batch, num_sequences):
    """(loss, ratio, log pi_theta, log pi_T) of one micro-batch under --loss; the two log-probs are of
    the sampled tokens, (B, C)."""
    ids, attn, starts, C, mask = (batch[k] for k in ("ids", "attn", "starts", "C", "mask"))
    if args.loss == "gkd":  # full distributions at the completion positions, this micro-batch only
        at = completion_index(starts, C, ids.shape[1])
        with torch.no_grad():
            teacher_logits = position_logits(teacher, ids, attn, at)  # (B, C, V)
        student_logits = model(ids, attn, logits_at=at)  # (B, C, V)
        loss = gkd_loss(student_logits, teacher_logits, mask, num_sequences, beta=args.beta)
        targets = completion_part(ids[:, 1:], starts, C)[..., None]  # (B, C, 1) the sampled tokens
        student_logp, teacher_logp = (torch.log_softmax(x.float(), -1).gather(-1, targets).squeeze(-1)
                                      for x in (student_logits, teacher_logits))
        return loss, torch.ones_like(mask), student_logp, teacher_logp
    # OPD: log pi_theta of the distribution the sampler drew from, at its temperature, so the ratio is
    # exactly 1 on the trainer's own rollouts (loss.py: KL(q_tau || pi_T)); SFT: the plain NLL
    temperature = args.temperature if args.loss == "opd" else 1.0
    student_logp = completion_part(model(ids, attn, temperature=temperature), starts, C)
    if args.loss == "opd":
        loss, ratio = opd_loss(student_logp, batch["sampler_logp"], batch["teacher_logp"], mask, num_sequences,
                               gamma=args.gamma, ratio_cap=args.ratio_cap)
    else:  # sft on the sampled tokens (SeqKD when the teacher samples)
        loss, ratio = -(student_logp * mask).sum() / num_sequences, torch.ones_like(mask)
    return loss, ratio, student_logp, batch["teacher_logp"]


def micro_batches(rollouts, budget):
    """Consecutive groups whose padded size (rows x longest row) stays within the token budget."""
    group, longest = [], 0
    for r in rollouts:
        n = len(r.prompt_ids) + len(r.completion_ids)
        if group and (len(group) + 1) * max(longest, n) > budget:
            yield group
            group, longest = [], 0
        group.append(r)
        longest = max(longest, n)
    if group:
        yield group


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if ddp:
        dist.all_reduce(t)
    return t


autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
log_path = args.out / "metrics.jsonl"
checkpoint.clear_run_dir(args.out, start_step if resume_from else None, is_main)
if is_main:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "args.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v
                                                   for k, v in vars(args).items()}, indent=1))
writers = []
if is_main and args.tensorboard:
    from torch.utils.tensorboard import SummaryWriter
    tb = SummaryWriter(args.out / "tb")
    writers.append(lambda m, s: [tb.add_scalar(k, v, s) for k, v in m.items() if isinstance(v, (int, float))])
if is_main and args.wandb:
    import wandb
    wandb.init(project="prefix-opd", config=vars(args), dir=str(args.out))
    writers.append(lambda m, s: wandb.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=s))

# Toy only: accuracy before training, on held-out problems (sampled at temperature 1, one per problem).
# Checkpoints carry it, so a resumed run still prints the before/after table.
eval_set, acc = [], dict(meta.get("toy_acc_before", {}))
if acc.get("eval_problems") != args.eval_problems:
    acc = {}
if eval_student is None and args.dataset == "toy" and args.eval_problems:
    print0("toy evaluation skipped: under --fsdp with vLLM sampling there is no unsharded student to evaluate")
elif args.dataset == "toy" and args.eval_problems and (resume_from is None or acc):
    import eval as evaluation
    import toy
    eval_set = toy.make_problems(args.eval_problems, seed=args.seed, split="test")
    if is_main and not acc and args.eval_before:
        for name, lm in (("teacher", teacher), ("student_before", eval_student)):
            acc[name] = evaluation.evaluate(lm, tokenizer, eval_set, 1, toy.MAX_NEW_TOKENS, args.seed,
                                            desc=f"eval {name}")["acc"]
        print0(f"toy accuracy before training: teacher {acc['teacher']:.3f}, student {acc['student_before']:.3f}")
        acc["eval_problems"] = len(eval_set)
toy_meta = {"toy_acc_before": dict(acc)} if acc else {}


# ----------------------------------------------------------------------------- the loop
t_start = time.time()
bad_steps = 0
bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not is_main,
           desc="prefix OPD", dynamic_ncols=True)
for step in bar:
    # 1. schedule: how many tokens this step samples and trains
    L_train = adaptive.L if adaptive else prefix_length(step, L_0, args.prefix_step, args.max_new_tokens)

    # 2. sample: this rank's share of the step's prompts, stopped at L_train
    t0 = time.time()
    indices = step_prompts(step)[rank::world_size]
    global_ids = [step * args.prompts_per_step + i for i in range(rank, args.prompts_per_step, world_size)]
    rollouts, on_policy = sample_rollouts(step, indices, global_ids, L_train)
    num_sequences = len(rollouts)  # same on every rank; DDP's mean over ranks makes it the global mean
    if args.vllm_sleep:
        sampler.sleep()  # weights to the CPU, KV cache dropped: the trainer gets the memory
    t_sample = time.time() - t0

    # 3. score: the teacher's log-prob of every sampled token, one micro-batch at a time
    t0 = time.time()
    batches, micro_batch_counts = same_count_on_every_rank(
        [prepare(group) for group in micro_batches(rollouts, args.micro_batch_tokens)])
    t_score = time.time() - t0

    # 4. loss and update: micro-batches accumulate gradients; DDP syncs only on the last one, FSDP2
    #    reduce-scatters each one's (so no rank ever holds the whole model's fp32 gradient)
    t0 = time.time()
    loss_sum, kl_sum, tokens, ratio_sum, above_cap = (torch.zeros((), device=device) for _ in range(5))
    ratio_max = torch.zeros((), device=device)
    n_bins = (L_train + args.kl_bin - 1) // args.kl_bin
    bin_sums, bin_counts = torch.zeros(n_bins, device=device), torch.zeros(n_bins, device=device)
    model.train()
    for i, batch in enumerate(batches):
        sync = model.no_sync() if ddp and not args.fsdp and i < len(batches) - 1 else contextlib.nullcontext()
        with sync, autocast:
            loss, ratio, student_logp, teacher_logp = objective(batch, num_sequences)
            loss.backward()
        mask = batch["mask"]
        # log pi_theta - log pi_T on the sampled tokens: the reverse KL on the student's own rollouts
        kl, n_tokens, kl_bins, count_bins = reverse_kl_stats(student_logp.detach(), teacher_logp, mask, args.kl_bin, n_bins)
        loss_sum += loss.detach() * num_sequences
        kl_sum, tokens = kl_sum + kl, tokens + n_tokens
        bin_sums, bin_counts = bin_sums + kl_bins[:n_bins], bin_counts + count_bins[:n_bins]
        ratio_sum += (ratio * mask).sum()
        ratio_max = torch.maximum(ratio_max, (ratio * mask).max())
        if args.ratio_cap is not None:
            above_cap += ((ratio >= args.ratio_cap) * mask).sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)  # grads already all-reduced
    if args.fsdp:
        grad_norm = grad_norm.full_tensor()  # a DTensor under FSDP: the norm over all shards
    finite = bool(torch.isfinite(grad_norm))  # identical on every rank after the all-reduce: one decision
    if finite:
        optimizer.step()
        bad_steps = 0
    else:
        bad_steps += 1
    optimizer.zero_grad(set_to_none=True)
    if args.vllm_sleep:
        sampler.wake_up()
    if needs_push:
        push_weights()  # on-policy: the next rollouts come from the updated student
    t_update = time.time() - t0
    push_logp_max_diff = None
    if args.check_push:  # did the push land? the engine and the trainer score the same fixed tokens
        sequence = rollouts[0].prompt_ids + rollouts[0].completion_ids  # this step's first rollout on this rank
        sequence = sequence[:max_context - 1]  # vLLM needs room to generate one token after a scored sequence
        with torch.no_grad(), autocast:  # the trainer's student (a collective under FSDP)
            ids = torch.tensor([sequence], device=device)
            trainer_logp = model(ids, torch.ones_like(ids))[0]  # (T-1,)
        engine_logp = torch.tensor(sampler.score([sequence])[0], device=device)  # (T-1,)
        diff = (engine_logp - trainer_logp).abs().max()
        if ddp:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)  # the worst rank
        push_logp_max_diff = diff.item()

    # the KL over whole responses: after the first step, then every --kl-probe-every steps
    probe = kl_probe() if args.kl_probe_every and (step == 0 or (step + 1) % args.kl_probe_every == 0) else None

    # 5. log: sums over ranks, then one line on rank 0 and one JSON line in metrics.jsonl
    counts = torch.tensor([len(rollouts), sum(r.truncated for r in rollouts), on_policy], device=device,
                          dtype=torch.float32)
    stats = all_sum(torch.stack([loss_sum, kl_sum, tokens, ratio_sum, above_cap]))
    counts, bin_sums, bin_counts = all_sum(counts), all_sum(bin_sums), all_sum(bin_counts)
    if ddp:
        dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX)
    seqlens = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts]
    on_rollouts = on_policy * args.samples_per_prompt  # sample_rollouts puts the on-policy ones first
    flops = float(all_sum(torch.tensor(float(rollout_flops(student.config, teacher.config, seqlens[:on_rollouts],
                                                           seqlens[on_rollouts:])), dtype=torch.float64, device=device)))
    total_flops += flops
    loss_sum, kl_sum, tokens, ratio_sum, above_cap = stats.tolist()
    n_rollouts, n_truncated, n_on_policy = counts.tolist()
    metrics = {
        "step": step + 1, "L_train": L_train, "loss": loss_sum / n_rollouts,
        "reverse_kl": kl_sum / max(tokens, 1), "grad_norm": float(grad_norm), "skipped": not finite,
        "rollouts": int(n_rollouts), "truncated": int(n_truncated),
        "on_policy_fraction": n_on_policy / args.prompts_per_step, "response_tokens": int(tokens),
        "mean_response_tokens": tokens / n_rollouts,
        "ratio_mean": ratio_sum / max(tokens, 1), "ratio_max": ratio_max.item(),
        "ratio_above_cap": above_cap / max(tokens, 1) if args.ratio_cap else None,
        "kl_bin": args.kl_bin, "reverse_kl_by_position": [round((s / c).item(), 5) if c > 0 else None for s, c in zip(bin_sums, bin_counts)],
        "prompts_skipped": prompts_skipped, "micro_batches": micro_batch_counts, "flops": flops, "total_flops": total_flops,
        "time_sample": t_sample, "time_score": t_score, "time_update": t_update,
        "push_logp_max_diff": push_logp_max_diff,
        "reverse_kl_by_position_full": probe.bins(args.kl_bin)[0] if probe else None,
        "wall_seconds": wall_before + time.time() - t_start,
    }
    if adaptive:  # after the step at L_train: grow for the next one?
        inside, beyond = (probe.mean(0, L_train), probe.mean(*adaptive.beyond())) if probe else (None, None)
        metrics["adaptive_growth"] = adaptive.update(metrics["reverse_kl"], inside, beyond)
    if is_main:
        with open(log_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for write in writers:
            write(metrics, step + 1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['reverse_kl']:.3f}", L=L_train,
                        tok=int(tokens), flop=f"{total_flops:.2e}")
        if not finite:
            tqdm.write(f"step {step + 1}: non-finite gradient norm ({float(grad_norm)}), update skipped")
    if bad_steps >= args.max_bad_steps:
        raise SystemExit(f"error: {bad_steps} steps in a row with a non-finite loss or gradient; the last "
                         f"checkpoint ({checkpoint.latest(ckpt_dir)}) is intact")

    # 6. checkpoint
    if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
        save_checkpoint(step + 1, {"step": step + 1, "L_train": L_train, "total_flops": total_flops,
                                   "wall_seconds": metrics["wall_seconds"], "run_flags": checkpoint.run_flags(args)}
                        | toy_meta
                        | ({"adaptive": adaptive.state_dict()} if adaptive else {}))
        if ddp:
            dist.barrier()
bar.close()


# ----------------------------------------------------------------------------- the end: evaluation, plots
wall_seconds = wall_before + time.time() - t_start
if is_main:
    summary = {"preset": args.preset, "steps": args.steps, "total_flops": total_flops,
               "wall_seconds": wall_seconds, "world_size": world_size}
    if eval_set:
        import eval as evaluation
        acc["student_after"] = evaluation.evaluate(eval_student, tokenizer, eval_set, 1, toy.MAX_NEW_TOKENS,
                                                   args.seed, desc="eval student_after")["acc"]
        keys = {"teacher": "teacher_acc", "student_before": "student_acc_before", "student_after": "student_acc_after"}
        summary |= {key: acc[name] for name, key in keys.items() if name in acc} | {"eval_problems": len(eval_set)}
        print0(f"\n| toy, {len(eval_set)} held-out problems, 1 sample at T=1 | accuracy |\n|---|---|")
        for name in ("teacher", "student_before", "student_after"):
            if name in acc:
                print0(f"| {name.replace('_', ' ')} | {acc[name]:.3f} |")
    summary["wall_seconds_with_eval"] = wall_before + time.time() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.no_plots:
        import plots
        plots.training_plots(log_path, args.out)
    print0(f"done: {args.steps} steps, {total_flops:.3e} FLOP, {wall_seconds:.0f}s; see {args.out}")
    if args.tensorboard:
        tb.close()
    if args.wandb:
        wandb.finish()
if ddp:
    dist.barrier()
if vllm_samples:
    sampler.close()  # first: under torchrun its teardown also destroys the process group (VLLMSampler.close)
if ddp and dist.is_initialized():
    dist.destroy_process_group()
if ddp:
    # Every output is written and closed. Leave without the interpreter's teardown: destroying
    # gloo's C++ threads there can, rarely, abort a finished run ("terminate called without an
    # active exception", exit code -6), which torchrun reports as a failed job.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
