"""
Prefix on-policy distillation: the training loop.

One step (paper §3, Algorithm of prefix OPD):
    L_train  = schedule(step)                                    schedule.py
    y ~ q(. | x), stopped after L_train tokens                   sample.py  (the student samples)
    log pi_T(y_t) for every sampled token                        score.py   (the teacher scores)
    loss = -(1/N) sum_seq sum_t rho_t (log pi_T - log q)(y_t)    loss.py    (Eq. 1, policy gradient)
           with rho_t = pi_theta(y_t) / q(y_t)
    backward, clip, AdamW step, push the new weights to the sampler, log, checkpoint.

    python train.py                                     # the toy on a CPU (the 1.7B preset on a GPU)
    torchrun --nproc_per_node=8 train.py --prefix 1024  # the paper's Qwen3-1.7B-Base <- Qwen3-8B setup

Departures from the paper:
1. The loss is summed over tokens and averaged over sequences (loss.py); DDP and gradient
   accumulation reproduce exactly one big batch (tests/test_train.py).
2. Rollouts are seeded per prompt, not per rank (sample.py), so the result does not depend on the
   number of processes.
3. A step with a non-finite gradient norm is skipped, not applied; MAX_BAD_STEPS in a row abort the
   run with the last checkpoint intact.
4. The toy presets train a ~1M-parameter student for 16 steps on a synthetic task (toy.py: slips
   spread evenly, or a plan that opens the response) with a schedule scaled to its ~200-token responses.
"""

import argparse
import contextlib
import functools
import json
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
import klprobe
import memory
import models
import parallel
from parallel import all_max, all_sum
from flops import peak_flops, planned_flops, rollout_flops
from logger import MetricsLog
from loss import StepStats, gkd_loss, opd_loss
from sample import HFSampler, default_backend, describe_backend, push_logp_max_diff, student_sampler
from schedule import AdaptivePrefix, check_window, prefix_length
from score import (LogProbs, check_sampling_is_scorable, completion_logits, completion_logprobs, group_by_budget,
                   make_micro_batch, sampled_logprobs)

# ----------------------------------------------------------------------------- presets
# The single source of every preset-dependent default: a flag left unset takes its preset's value.
PAPER = dict(dataset="open-thoughts/OpenThoughts3-1.2M", prefix=1024, prefix_step=0, max_new_tokens=16384,
             prompts_per_step=512, samples_per_prompt=4, lr=5e-5, steps=60, micro_batch_tokens=4096,
             eval_problems=0, kl_bin=256, activation_checkpointing=True, vllm_sleep=False)
CPU = dict(activation_checkpointing=False, vllm_sleep=False, micro_batch_tokens=16384, samples_per_prompt=4)
TOY = CPU | dict(student="toy/student", teacher="toy/teacher", dataset="toy", prefix=64, prefix_step=32,
                 max_new_tokens=320, prompts_per_step=16, lr=1e-4, steps=16, eval_problems=256, kl_bin=32)
PRESETS = {  # models built here (models.built_pair): the toy tasks (toy.py) and SmolLM2 (smollm2.py)
    "toy": TOY, "toy-slips": TOY | dict(dataset="toy-slips"),
    "toy-plan": TOY | dict(student="toy/plan/student", teacher="toy/plan/teacher", dataset="toy-plan", prefix=16,
                           prefix_step=0),
    "smollm2": CPU | dict(student="smollm2/student", teacher="smollm2/teacher", prefix=32, prefix_step=0, steps=8,
                          dataset=str(Path(__file__).resolve().parent.parent / "shared/data/gsm8k_test.jsonl"),
                          max_new_tokens=512, prompts_per_step=4, lr=1e-4, micro_batch_tokens=4096, eval_problems=0,
                          kl_bin=8),
    "qwen3-1.7b": PAPER | dict(student="Qwen/Qwen3-1.7B-Base", teacher="Qwen/Qwen3-8B"),
    "qwen3-8b": PAPER | dict(student="Qwen/Qwen3-8B-Base", teacher="Qwen/Qwen3-8B", micro_batch_tokens=16384,
                             vllm_sleep=True),
}
# Fixed settings: the paper's (top-p, gamma), or safe values nobody has needed to tune.
TOP_P = 1.0  # sampling nucleus (paper: 1.0); top-p < 1 cannot be scored (score.check_sampling_is_scorable)
GAMMA = 0.0  # discount over future per-token advantages (paper: 0; loss.opd_loss has the general case)
GRAD_CLIP, WEIGHT_DECAY = 1.0, 0.0  # max global gradient norm; AdamW weight decay
MAX_BAD_STEPS = 3  # non-finite steps in a row before the run aborts
PACK_BY_LENGTH = True  # sort a rank's rollouts by length before grouping them into micro-batches (less padding)
KL_PROBE_PROMPTS = 16  # prompts of the KL probe set (one rollout each)
DRY_RUN_PROMPT_TOKENS = 512  # the longest prompt a --dry-run plans for (a real run uses its data's)
# Flags that may change between a run and its resume: how long it runs, how it logs, how it is laid out
# on the hardware. Every other flag defines the run and is saved in its checkpoints.
MAY_CHANGE = {"steps", "save_every", "resume", "overwrite", "out", "logger", "eval_problems", "eval_before",
              "kl_bin", "kl_probe_every", "dry_run", "gpu_memory_gb", "peak_tflops", "sampler", "vllm_kv_cache_gb",
              "vllm_sleep", "micro_batch_tokens", "activation_checkpointing", "fsdp"}

parser = argparse.ArgumentParser(description="Prefix on-policy distillation (arXiv 2602.15260)")
parser.add_argument("--preset", choices=PRESETS, help="default: toy on CPU, qwen3-1.7b on CUDA (custom models: the paper's)")
g = parser.add_argument_group("models")
g.add_argument("--student", help="student: hub name or local dir (trained, samples the rollouts)")
g.add_argument("--teacher", help="teacher: hub name or local dir (fixed, scores the rollouts); same vocabulary")
g = parser.add_argument_group("data")
g.add_argument("--dataset", help="'toy', a hub dataset, or a local JSONL ('problem'; 'response' for dataset rollouts)")
g.add_argument("--num-questions", type=int, help="the first N questions only (hub: streamed; paper: 30,700)")
g = parser.add_argument_group("prefix")
g.add_argument("--prefix", type=int, help="L_train at step 0, in tokens; 0 = full OPD up to --max-new-tokens")
g.add_argument("--prefix-step", type=int, help="delta_L: tokens added to L_train after every step (0 = fixed)")
g.add_argument("--max-new-tokens", type=int, help="L_max: the cap on L_train and on full OPD (paper: 16384)")
g.add_argument("--adaptive", action="store_true", help="grow L_train by --prefix-step only when the KL says the "
               "prefix is learnt (schedule.AdaptivePrefix)")
g.add_argument("--window", type=int, nargs=2, metavar=("A", "B"), help="train only on tokens A <= t < B (Table 3)")
g.add_argument("--last-n", type=int, help="train only on each rollout's last N tokens (Table 3)")
g = parser.add_argument_group("objective")
g.add_argument("--loss", choices=["opd", "gkd", "sft"], default="opd",
               help="opd: sampled reverse KL (Eq. 1); gkd: full-vocabulary generalized JSD; sft: SeqKD NLL")
g.add_argument("--rollouts-from", choices=["student", "teacher", "dataset"], help="who writes the rollouts: the "
               "student (on-policy, default), the teacher, or the dataset's responses cut at L_train (SeqKD)")
g.add_argument("--lmbda", type=float, help="GKD's lambda: a prompt's rollouts are the student's with this "
               "probability, else --rollouts-from's (default: dataset)")
g.add_argument("--beta", type=float, default=0.5, help="GKD beta: 0 forward KL(T||S), 1 reverse KL(S||T)")
g.add_argument("--ratio-cap", type=float, help="truncate importance ratios at this value (off)")
g = parser.add_argument_group("optimisation")
g.add_argument("--prompts-per-step", type=int, help="prompts per optimizer step, global (paper: 512)")
g.add_argument("--samples-per-prompt", type=int, help="rollouts per prompt (paper: 4)")
g.add_argument("--lr", type=float, help="AdamW learning rate, constant (paper: 5e-5)")
g.add_argument("--steps", type=int, help="optimizer steps (paper: 60)")
g.add_argument("--micro-batch-tokens", type=int, help="padded tokens per forward/backward micro-batch")
g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
g.add_argument("--seed", type=int, default=0, help="seeds data order and every rollout")
g = parser.add_argument_group("run")
g.add_argument("--out", help="run directory (default: runs/<preset>)")
g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out (same flags)")
g.add_argument("--overwrite", action="store_true", help="replace the run in --out (else a fresh run there is refused)")
g.add_argument("--fsdp", action="store_true", help="shard the student with FSDP2 instead of DDP (for the 8B)")
g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction,
               help="recompute each decoder layer in backward (always on with --fsdp; preset default)")
g.add_argument("--sampler", choices=["hf", "vllm"], help="rollout engine (default: vllm where installed and CUDA "
               "is present, else hf); a vLLM engine's weight push is checked every step")
g.add_argument("--vllm-kv-cache-gb", type=float, help="vLLM KV-cache budget per rank, GiB (default 10 on GPUs)")
g.add_argument("--vllm-sleep", action=argparse.BooleanOptionalAction,
               help="GPU only: free vLLM's weights and KV cache while the trainer works (preset default)")
g.add_argument("--eval-problems", type=int, help="toy only: held-out problems graded before and after")
g.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True,
               help="toy only: also grade the teacher and the untrained student (a sweep needs them once)")
g.add_argument("--kl-bin", type=int, help="tokens per position bin of the logged reverse KL (paper figures: 256)")
g.add_argument("--kl-probe-every", type=int, default=0, help="after step 1 and every N steps, log the reverse KL by "
               f"position of full-length rollouts of {KL_PROBE_PROMPTS} fixed prompts (0: off; not in total_flops)")
g.add_argument("--logger", nargs="*", choices=["tensorboard", "wandb"], default=[],
               help="also log there (metrics.jsonl is always written)")
g = parser.add_argument_group("memory and speed")
g.add_argument("--dry-run", type=int, nargs="?", const=0, metavar="GPUS", help="print the memory plan, FLOP and "
               "hours for GPUS processes (default: torchrun's, or 8; toy 1) and exit 0 if it fits, 1 if not")
g.add_argument("--gpu-memory-gb", type=float, help="memory budget per GPU, GB (default: the device's, or 80)")
g.add_argument("--peak-tflops", type=float, help="dense bf16 peak per device for mfu (default: flops.peak_flops)")


def check_args(args, world_size: int) -> int:
    """Cross-flag rules, each a one-line error; returns L_0, the first L_train (--prefix 0: full OPD)."""
    if args.prefix < 0:
        raise SystemExit(f"error: --prefix must be >= 0 tokens (0 = full OPD up to --max-new-tokens), got {args.prefix}")
    L_0 = args.prefix if args.prefix > 0 else args.max_new_tokens
    check_window(tuple(args.window) if args.window else None, args.last_n)
    if args.adaptive and args.prefix_step < 1:
        raise SystemExit("error: --adaptive grows L_train by --prefix-step tokens: give --prefix-step >= 1")
    if L_0 < 1 or args.max_new_tokens < 1:
        raise SystemExit(f"error: L_train must be >= 1 token (got --prefix {args.prefix}, --max-new-tokens "
                         f"{args.max_new_tokens})")
    if args.prompts_per_step % world_size:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must divide evenly over {world_size} ranks")
    if args.lmbda is not None and (args.rollouts_from == "student" or not 0 <= args.lmbda <= 1):
        raise SystemExit("error: --lmbda p in [0, 1] mixes the student's rollouts with --rollouts-from teacher or dataset")
    if args.rollouts_from is None:  # GKD's lambda mixes in the dataset's responses unless told otherwise
        args.rollouts_from = "dataset" if args.lmbda is not None else "student"
    if args.loss == "opd" and (args.rollouts_from != "student" or args.lmbda is not None):
        raise SystemExit("error: the OPD estimator needs the student's own rollouts; use --loss gkd or sft off-policy")
    if args.vllm_sleep and args.dry_run is None and not torch.cuda.is_available():
        raise SystemExit("error: --vllm-sleep needs a GPU (vLLM's CPU backend cannot sleep); use --no-vllm-sleep")
    try:
        if args.loss == "opd":  # the ratio pi_theta / q must compare the distribution the sampler drew from
            check_sampling_is_scorable(args.temperature, TOP_P)
        args.student = models.check_model_path(args.student, "--student")
        args.teacher = models.check_model_path(args.teacher, "--teacher")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return L_0


args = parser.parse_args()
given = {k for k, v in vars(args).items() if v is not None}  # what the command line set

# ----------------------------------------------------------------------------- distributed setup
ddp, rank, world_size, device = parallel.init()  # ddp: launched by torchrun
is_main = rank == 0
print0 = functools.partial(print, flush=True) if is_main else lambda *a, **kw: None  # rank 0 speaks


# ----------------------------------------------------------------------------- config: preset, checks
custom = args.preset is None and (args.student or args.teacher)
if args.preset is None:  # a dry run plans a GPU run
    args.preset = "qwen3-1.7b" if torch.cuda.is_available() or args.dry_run is not None or custom else "toy"
from_preset = {k: v for k, v in (PAPER if custom else PRESETS[args.preset]).items() if getattr(args, k) is None}
for key, value in from_preset.items():
    setattr(args, key, value)
why = "" if custom or "preset" in given else f" ({'CUDA is available' if torch.cuda.is_available() else 'no GPU found'})"
print0(f"preset: {'none, custom models: the paper' if custom else args.preset}{why}; from it: "
       + ", ".join(f"{k} {v}" for k, v in from_preset.items()))
if {"student", "teacher"} <= from_preset.keys() and args.preset in models.BUILT_HERE:  # built on first use
    try:
        args.teacher, args.student = models.built_pair(args.preset)
    except ValueError as e:  # the SmolLM2 wheel is not installed
        raise SystemExit(f"error: {e}")
args.out = Path(args.out or f"runs/{args.preset}")
L_0 = check_args(args, world_size)
L_longest = prefix_length(args.steps - 1, L_0, args.prefix_step, args.max_new_tokens)  # the run's longest L_train
student_samples = args.rollouts_from == "student" or bool(args.lmbda)  # is the student ever sampled?
if args.sampler is None:  # vLLM where it runs at its best; the transformers loop everywhere else
    args.sampler = default_backend(cuda=torch.cuda.is_available() or args.dry_run is not None)
vllm_samples = args.sampler == "vllm" and student_samples
if args.gpu_memory_gb is None:
    args.gpu_memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 80.0
rollouts_per_step = args.prompts_per_step * args.samples_per_prompt
on_policy_share = args.lmbda if args.lmbda is not None else float(args.rollouts_from == "student")
plan = dict(student=args.student, teacher=args.teacher, fsdp=args.fsdp, sampler=args.sampler, loss=args.loss,  # memory.plan
            beta=args.beta, rollouts_from="student" if args.lmbda else args.rollouts_from, L_longest=L_longest,
            micro_batch_tokens=args.micro_batch_tokens, activation_checkpointing=args.activation_checkpointing,
            vllm_kv_cache_gb=args.vllm_kv_cache_gb, vllm_sleep=args.vllm_sleep, gpu_memory_gb=args.gpu_memory_gb)


def step_flops_at(student_config, teacher_config, prompt_tokens: int, L_train: int) -> int:
    return planned_flops(student_config, teacher_config, rollouts_per_step, on_policy_share, prompt_tokens + L_train,
                         args.loss, args.rollouts_from)


if args.dry_run is not None:  # the plan of a GPU run of these flags, from the model shapes alone (memory.py)
    gpus = args.dry_run or (world_size if ddp else 1 if args.preset.startswith("toy") else 8)
    per_step = [step_flops_at(args.student, args.teacher, DRY_RUN_PROMPT_TOKENS,
                              prefix_length(k, L_0, args.prefix_step, args.max_new_tokens)) for k in range(args.steps)]
    fits = memory.dry_run(plan | dict(world_size=gpus, prompt_tokens=DRY_RUN_PROMPT_TOKENS, on_gpu=True), per_step,
                          f"{L_0} + {args.prefix_step}/step")
    raise SystemExit(0 if fits else 1)
run_flags = {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items()) if k not in MAY_CHANGE}
resume_from = checkpoint.open_run_dir(args.out, run_flags, resume=args.resume, overwrite=args.overwrite)
torch.manual_seed(args.seed + rank)  # data order and rollouts draw from generators of their own (data.py, sample.py)
if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # ranks share the cores


# ----------------------------------------------------------------------------- models
try:
    tokenizer, student, teacher = models.load_pair(args.student, args.teacher, device, keep_student_on_cpu=args.fsdp,
                                                   activation_checkpointing=args.activation_checkpointing or args.fsdp)
except ValueError as e:
    raise SystemExit(f"error: {e}")
half = torch.bfloat16 if device.type == "cuda" else torch.float32
model = LogProbs(student)  # the module DDP/FSDP2 wraps; `student` stays the unwrapped HF model
if args.fsdp:  # FSDP2: each decoder layer a shard unit, the root holds embeddings, norm and lm_head
    model = parallel.fsdp2(model, student.get_decoder().layers, device, world_size)
elif ddp:  # gradients live in DDP's all-reduce buckets: no second copy
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
start_step, total_flops, wall_before, meta = 0, 0.0, 0.0, {}
if resume_from is not None:  # each rank reads its own shard of weights and AdamW state
    meta = checkpoint.load(resume_from, model, optimizer)
    start_step, total_flops, wall_before = meta["step"], meta["total_flops"], meta["wall_seconds"]
    print0(f"resumed from {resume_from} at step {start_step}")
adaptive = None
if args.adaptive:  # schedule.py: L_train grows when the KL signal says the prefix is learnt
    adaptive = AdaptivePrefix(L_0, args.prefix_step, args.max_new_tokens)  # its thresholds: the class defaults
    if "adaptive" in meta:
        adaptive.load_state_dict(meta["adaptive"])


# ----------------------------------------------------------------------------- data
max_context = student.config.max_position_embeddings
try:  # problems, their chat prompts, and the reference responses of --rollouts-from dataset (data.py)
    examples = data.load_examples(args.dataset, seed=args.seed, num_questions=args.num_questions)
    prompts, responses, prompts_skipped = data.training_prompts(
        examples, tokenizer, max_context, args.max_new_tokens, args.prompts_per_step,
        with_responses=args.rollouts_from == "dataset", name=args.dataset)
except ValueError as e:
    raise SystemExit(f"error: {e}")
end_of_turn = data.end_of_turn_id(tokenizer)  # what a whole reference response ends with


# ----------------------------------------------------------------------------- derived values, memory plan
mean_prompt = sum(map(len, prompts)) / len(prompts)
L_now = prefix_length(start_step, L_0, args.prefix_step, args.max_new_tokens)
print0(f"student {args.student} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M params), "
       f"teacher {args.teacher}, {world_size} process(es) on {device.type}")
print0(f"prompts: {len(prompts)} usable, {prompts_skipped} skipped as longer than the context ({max_context})")
print0(f"per step: {args.prompts_per_step} prompts x {args.samples_per_prompt} = {rollouts_per_step} rollouts, "
       f"<= {rollouts_per_step * L_now} response tokens at L_train={L_now} "
       f"(schedule: {L_0} + {args.prefix_step}/step, cap {args.max_new_tokens}); "
       f"<= {step_flops_at(student.config, teacher.config, round(mean_prompt), L_now):.3g} FLOP at that L (App. B)")
# The memory plan at this data's longest prompt (memory.py): on a GPU, stop now, not at an OOM an hour in.
plan |= dict(world_size=world_size, prompt_tokens=max(map(len, prompts)), on_gpu=device.type == "cuda")
memory_plan = memory.plan(**plan)
if device.type == "cuda":
    print0(f"memory plan: peak {memory_plan.peak_gb:.1f} of {args.gpu_memory_gb:.0f} GB per GPU (table: --dry-run)")
    if not memory_plan.fits:
        raise SystemExit(f"error: {memory.no_fit_message(plan)}")


# ----------------------------------------------------------------------------- the samplers
# The student's (sample.student_sampler): the trainer's own module, a bf16 copy (FSDP2) or vLLM's engine.
sampler = student_sampler(student, args.student, tokenizer, device, backend="vllm" if vllm_samples else "hf",
                          fsdp=args.fsdp, temperature=args.temperature, top_p=TOP_P, seed=args.seed + rank,
                          kv_cache_bytes=memory_plan.hf_kv_cache_bytes if device.type == "cuda" else None,
                          vllm_kv_cache_gb=args.vllm_kv_cache_gb, max_model_len=max_context, vllm_sleep=args.vllm_sleep)
teacher_sampler = HFSampler(teacher, tokenizer, temperature=args.temperature, top_p=TOP_P) \
    if args.rollouts_from == "teacher" else None
print0(describe_backend("vllm" if vllm_samples else "hf", default="sampler" not in given,
                        off_policy=None if args.rollouts_from == "student" else args.rollouts_from, lmbda=args.lmbda))
if resume_from is not None:
    sampler.push(checkpoint.stream_weights(student, half))


def sample_rollouts(step: int, L_train: int):
    """This rank's share of the step's prompts and their rollouts, stopped at L_train and seeded per (step,
    prompt, sample): per prompt from the student (with probability --lmbda, or always when it is the
    source) or from the off-policy source. Returns (rollouts, on-policy prompts); on-policy ones first."""
    indices = data.step_prompts(len(prompts), args.prompts_per_step, args.seed, step)[rank::world_size]
    global_ids = [step * args.prompts_per_step + i for i in range(rank, args.prompts_per_step, world_size)]
    on = data.on_policy_prompts(global_ids, args.lmbda, args.seed, step) if args.lmbda is not None \
        else [args.rollouts_from == "student"] * len(indices)
    rollouts = []
    for policy in (True, False):
        mine, gids = [i for i, o in zip(indices, on) if o == policy], [g for g, o in zip(global_ids, on) if o == policy]
        if mine and (policy or args.rollouts_from == "teacher"):
            rollouts += (sampler if policy else teacher_sampler).generate(
                [prompts[i] for i in mine], args.samples_per_prompt, L_train, args.seed, prompt_indices=gids)
        elif mine:  # the dataset's reference responses, cut at L_train
            rollouts += data.reference_rollouts([prompts[i] for i in mine], [responses[i] for i in mine],
                                                args.samples_per_prompt, L_train, end_of_turn, gids)
    return rollouts, sum(on)


def micro_batches(rollouts) -> tuple[list[dict], list[int], torch.Tensor]:
    """This rank's micro-batches under the token budget, packed by length (a sum over sequences: the order changes
    the gradient only by rounding), as many on every rank (parallel.same_count); and its (padded, all) slots."""
    by_length = sorted(rollouts, key=lambda r: len(r.prompt_ids) + len(r.completion_ids)) if PACK_BY_LENGTH else rollouts
    groups = list(group_by_budget(by_length, args.micro_batch_tokens))
    window = tuple(args.window) if args.window else None
    batches = [make_micro_batch(g, tokenizer.pad_token_id, device, window, args.last_n) for g in groups]
    lengths = [[len(r.prompt_ids) + len(r.completion_ids) for r in g] for g in groups]  # no device sync per batch
    slots = torch.tensor([sum(len(n) * max(n) - sum(n) for n in lengths), sum(len(n) * max(n) for n in lengths)],
                         device=device, dtype=torch.float64)
    return *parallel.same_count(batches, device), slots


def step_flops(rollouts, on_policy: int) -> float:
    """App. B FLOP of the step's rollouts, summed over ranks (sample_rollouts puts the on-policy ones first)."""
    seqlens, on = [len(r.prompt_ids) + len(r.completion_ids) for r in rollouts], on_policy * args.samples_per_prompt
    mine = rollout_flops(student.config, teacher.config, seqlens[:on], seqlens[on:], args.loss, args.rollouts_from)
    return float(all_sum(torch.tensor(float(mine), dtype=torch.float64, device=device)))


# The KL probe (klprobe.py): fixed prompts no step trains on (where enough are left), sampled in full
trained = {i for k in range(args.steps) for i in data.step_prompts(len(prompts), args.prompts_per_step, args.seed, k)}
kl_probe = klprobe.ProbeSet(prompts, KL_PROBE_PROMPTS, args.seed, rank, world_size, args.max_new_tokens, trained=trained,
                            batch_size=max(1, args.micro_batch_tokens // (max(map(len, prompts)) + args.max_new_tokens)))


# ----------------------------------------------------------------------------- logging, toy evaluation
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
ckpt_dir = args.out / "checkpoints"
checkpoint.clear_run_dir(args.out, start_step if resume_from else None, is_main)
log = MetricsLog(args.out, args.logger, vars(args)) if is_main else None  # also writes args.json
# Toy only: held-out accuracy before and after (eval.ToyEval); checkpoints carry "before" for a resumed run.
eval_student = sampler.model if args.fsdp and not vllm_samples else None if args.fsdp else student
toy_eval = None
if eval_student is None and args.dataset in data.TOY_TASKS and args.eval_problems:
    print0("toy evaluation skipped: under --fsdp with vLLM sampling there is no unsharded student to evaluate")
elif args.dataset in data.TOY_TASKS and args.eval_problems:  # a resumed run evaluates only if it has the "before" numbers
    import eval as evaluation
    toy_eval = evaluation.ToyEval(args.eval_problems, args.seed, tokenizer, meta.get("toy_acc_before", {}),
                                  task=data.TOY_TASKS[args.dataset])
    toy_eval = None if resume_from is not None and not toy_eval.acc else toy_eval
    if is_main and toy_eval and not toy_eval.acc and args.eval_before:
        toy_eval.run({"teacher": teacher, "student_before": eval_student})
toy_meta = {"toy_acc_before": dict(toy_eval.acc)} if toy_eval and toy_eval.acc else {}


# ----------------------------------------------------------------------------- the loop
peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.cuda.get_device_name(device)) \
    if device.type == "cuda" else None  # the device's dense bf16 FLOP/s: the denominator of the logged mfu
t_start, bad_steps = time.time(), 0
bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not is_main,
           desc="prefix OPD", dynamic_ncols=True)
for step in bar:
    # 1. schedule: how many tokens this step samples and trains
    L_train = adaptive.L if adaptive else prefix_length(step, L_0, args.prefix_step, args.max_new_tokens)

    # 2. sample: this rank's share of the step's prompts, stopped after L_train tokens
    t0 = t_step = time.time()
    rollouts, on_policy = sample_rollouts(step, L_train)
    num_sequences = len(rollouts)  # this rank's; the same on every rank (loss.py: normalisation)
    sampler.sleep()  # vLLM with --vllm-sleep: weights to the CPU, KV cache dropped, the trainer gets the memory
    t_sample = time.time() - t0

    # 3. score: the teacher's log-prob of every sampled token, one micro-batch at a time (GKD scores
    #    whole distributions inside the update instead, to hold one micro-batch of logits at a time)
    t0 = time.time()
    batches, micro_batch_counts, pad_slots = micro_batches(rollouts)
    for batch in batches:
        with torch.no_grad(), autocast:
            batch["teacher_logp"] = completion_logprobs(teacher, batch).float() if args.loss != "gkd" else None
    t_score = time.time() - t0

    # 4. loss: Eq. 1 per micro-batch, gradients accumulated; DDP syncs only on the last one, FSDP2
    #    reduce-scatters each one's (so no rank ever holds the whole model's fp32 gradient)
    t0 = time.time()
    stats = StepStats(L_train, args.kl_bin, device, args.ratio_cap)
    model.train()
    for i, batch in enumerate(batches):
        mask = batch["mask"]  # (B, C) 1 on the trained completion tokens (prefix, window or last n)
        sync = model.no_sync() if ddp and not args.fsdp and i < len(batches) - 1 else contextlib.nullcontext()
        with sync, autocast:
            if args.loss == "opd":  # log pi_theta at the sampler's temperature: the ratio is 1 on its own rollouts
                student_logp = model(batch, temperature=args.temperature)  # (B, C), carries the gradient
                teacher_logp = batch["teacher_logp"]
                loss, ratio = opd_loss(student_logp, batch["sampler_logp"], teacher_logp, mask, num_sequences,
                                       gamma=GAMMA, ratio_cap=args.ratio_cap)
            elif args.loss == "gkd":  # full next-token distributions at the completion positions
                student_logits = model(batch, logits=True)  # (B, C, V)
                with torch.no_grad():
                    teacher_logits = completion_logits(teacher, batch)  # (B, C, V)
                loss, ratio = gkd_loss(student_logits, teacher_logits, mask, num_sequences, args.beta), torch.ones_like(mask)
                student_logp, teacher_logp = sampled_logprobs(student_logits, batch), sampled_logprobs(teacher_logits, batch)
            else:  # sft: the NLL of the rollout tokens (SeqKD when the teacher or the dataset wrote them)
                student_logp, teacher_logp = model(batch), batch["teacher_logp"]
                loss, ratio = -(student_logp * mask).sum() / num_sequences, torch.ones_like(mask)
            loss.backward()
        stats.add(loss, ratio, student_logp, teacher_logp, mask, num_sequences)

    # 5. update: clip, step (skipped when the norm is not finite), push the new weights to the sampler
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), GRAD_CLIP)  # grads already all-reduced
    if args.fsdp:
        grad_norm = grad_norm.full_tensor()  # a DTensor under FSDP: the norm over all shards
    finite = bool(torch.isfinite(grad_norm))  # identical on every rank after the all-reduce: one decision
    if finite:
        optimizer.step()
    bad_steps = 0 if finite else bad_steps + 1
    optimizer.zero_grad(set_to_none=True)
    sampler.wake_up()
    sampler.push(checkpoint.stream_weights(student, half))  # on-policy: next rollouts from the new student
    t_update, t_step = time.time() - t0, time.time() - t_step
    with autocast:  # did the push land? the engine and the trainer score this step's first rollout
        push_diff = all_max(push_logp_max_diff(sampler, model, rollouts[0], max_context)).item() if vllm_samples else None

    # the KL over whole responses (beyond L_train): after the first step, then every --kl-probe-every steps
    probe = kl_probe.run(sampler, teacher, tokenizer.pad_token_id, all_sum) \
        if args.kl_probe_every and (step == 0 or (step + 1) % args.kl_probe_every == 0) else None

    # 6. log: sums over ranks, then one line on rank 0 and one JSON line in metrics.jsonl
    flops = step_flops(rollouts, on_policy)
    total_flops += flops
    pad, slots = all_sum(pad_slots).tolist()
    metrics = {"step": step + 1, "L_train": L_train} | stats.reduce(rollouts, on_policy, args.prompts_per_step,
                                                                     all_sum, all_max)
    metrics |= {"grad_norm": float(grad_norm), "skipped": not finite, "prompts_skipped": prompts_skipped,
                "micro_batches": micro_batch_counts, "pad_fraction": pad / slots, "flops": flops,
                "total_flops": total_flops, "mfu": flops / (t_step * world_size * peak) if peak else None,
                "tokens_per_second": metrics["response_tokens"] / t_step, "time_sample": t_sample,
                "time_score": t_score, "time_update": t_update, "time_step": t_step, "push_logp_max_diff": push_diff,
                "reverse_kl_by_position_full": probe.bins(args.kl_bin)[0] if probe else None,
                "reverse_kl_full": probe.mean(0, args.max_new_tokens) if probe else None,
                "wall_seconds": wall_before + time.time() - t_start}
    if adaptive:  # after the step at L_train: grow for the next one?
        inside, beyond = (probe.mean(0, L_train), probe.mean(*adaptive.beyond())) if probe else (None, None)
        metrics["adaptive_growth"] = adaptive.update(metrics["reverse_kl"], inside, beyond)
    if is_main:
        log.write(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", kl=f"{metrics['reverse_kl']:.3f}", L=L_train,
                        tok=metrics["response_tokens"], flop=f"{total_flops:.2e}",
                        **({"mfu": f"{metrics['mfu']:.1%}"} if peak else {}))
        if not finite:
            tqdm.write(f"step {step + 1}: non-finite gradient norm ({float(grad_norm)}), update skipped")
    if bad_steps >= MAX_BAD_STEPS:
        raise SystemExit(f"error: {bad_steps} steps in a row with a non-finite loss or gradient; the last "
                         f"checkpoint ({checkpoint.latest(ckpt_dir)}) is intact")

    # 7. checkpoint
    if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
        checkpoint.save(ckpt_dir, step + 1, model, optimizer, student, tokenizer,
                        {"step": step + 1, "L_train": L_train, "total_flops": total_flops,
                         "wall_seconds": metrics["wall_seconds"], "run_flags": run_flags} | toy_meta
                        | ({"adaptive": adaptive.state_dict()} if adaptive else {}), sharded=args.fsdp, is_main=is_main)
bar.close()


# ----------------------------------------------------------------------------- the end: evaluation, plots
wall_seconds = wall_before + time.time() - t_start
if is_main:
    summary = {"preset": args.preset, "steps": args.steps, "total_flops": total_flops, "wall_seconds": wall_seconds,
               "world_size": world_size}
    if toy_eval:
        toy_eval.run({"student_after": eval_student})
        summary |= toy_eval.summary()
        print0(toy_eval.table())
    summary["wall_seconds_with_eval"] = wall_before + time.time() - t_start
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    import plots
    plots.training_plots(log.path, args.out)
    print0(f"done: {args.steps} steps, {total_flops:.3e} FLOP, {wall_seconds:.0f}s; see {args.out}")
    log.close()
parallel.finish(ddp, close_first=sampler.close if vllm_samples else None)  # vLLM's teardown: VLLMSampler.close
