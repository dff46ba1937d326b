"""
The toy tasks, their tokenizer, and the teacher and student checkpoints that train.py distils between.

Two tasks (TASKS), each a chain of digits added mod 10 with a worked solution and a boxed answer:
'slips', where the student slips at any step alike, so the decisive tokens are spread evenly over
the response and a trained prefix carries little (docs/RESULTS.md), and 'plan', where the student
errs only in the plan that opens the response, the paper's premise (§3): a short teacher prefix
recovers most of the gap, and a short trained prefix covers all the student has to unlearn.

## slips (checkpoints in toy/teacher and toy/student)

    problem   Work mod 10: a=4,b=4,c=a+b,d=a+c,e=a+d,f=c+e. What is f?
    solution  a=4
              b=4
              c=a+b,a=4,b=4,4+4=8,8 mod 10=8,c=8
              d=a+c,a=4,c=8,4+8=12,12 mod 10=2,d=2
              e=a+d,a=4,d=2,4+2=6,6 mod 10=6,e=6
              f=c+e,c=8,e=6,8+6=14,14 mod 10=4,f=4
              </think>
              \\boxed{4}

Every variable after the constants is an earlier one plus the one just before it, so a wrong sum
at any step changes the answer. A step line restates the definition, looks up both operands, adds
two digits, reduces the sum mod 10 and binds the result. Why it is built this way:
1. Long but learnable on a CPU. Solutions are 159-245 tokens (one token per character), so a
   prefix rollout costs a fraction of a full one, as in the paper. Yet almost every token is a
   copy found by content, never by counting positions: an operand's value is the digit after an
   earlier `name=`, a definition is the text after its `name=` in the problem, the reduced digit
   is the one just before ` mod`. A 3-layer, width-128 Qwen3 learns it in ~500 SFT steps of 32
   solutions (an 85-token addition written digit by digit, whose operands are found by position,
   was not learned by a 2-layer width-128 one in 600 steps).
2. Short prompts, long responses. The tokenizer gives each fixed piece of the prompt one token
   (PROMPT_PIECES: the chat template's turns, `<think>\\n`, the instruction sentence and the
   problem's wording; TASK_PIECES per task), as a real tokenizer turns a frequent phrase into a few
   tokens; only the definitions go character by character. And a step line writes the sum in full
   before reducing it. Prompts are then 39-55 tokens against responses of 160-246 (with EOS), and in App. B FLOP
   (flops.opd_flops) full OPD costs 5.3x a prefix run at L_train = 8 and 4.6x one at 16. Why both:
   a prefix saves at most the response, so the ratio never exceeds the cost of prompt + response
   over that of the prompt alone, and per definition the prompt holds 6 tokens (`d=b+c,`) and the
   step line 35-37 with its newline (23 with the sum reduced at once). With the prompt one token
   per character and sums reduced at once, prompts of ~157 tokens against ~143-token responses
   held the ratio to 2x.
3. Few decisive tokens. Only the sum needs arithmetic, its one or two digits per line. An error
   there is a token the teacher gives almost no probability, so the per-token reverse KL of
   on-policy distillation points at exactly the tokens that are wrong.
4. A base student that follows the format but is often wrong. Teacher and student share a base
   trained from scratch on clean solutions; the teacher is trained further on clean solutions, the
   student on the same problems with sloppy solutions, where each sum slips by one (4+8=11 or
   4+8=13) with probability SLIP and the later steps carry the wrong value on, as a real mistake
   would. Sampled at temperature 1 the student reproduces its data's slips and solves few
   problems, while the right digit stays its most likely one: distillation has to sharpen a
   distribution the student already has, which a few minutes of CPU training can do. Slips happen
   at every step alike, so what the student unlearns on a prefix carries over to the rest (paper §4).

## plan (checkpoints in toy/plan/teacher and toy/plan/student)

    problem   Work mod 10: a=0,b=3,c=3. Each next letter adds the one before it and the one three
              before it. What is g?
    solution  add n-3
              a=0
              b=3
              c=3
              d=a+c,a=0,c=3,0+3=3,3 mod 10=3,d=3
              e=b+d,b=3,d=3,3+3=6,6 mod 10=6,e=6
              f=c+e,c=3,e=6,3+6=9,9 mod 10=9,f=9
              g=d+f,d=3,f=9,3+9=12,12 mod 10=2,g=2
              </think>
              \\boxed{2}

The problem gives 3-4 constants, a rule in words (PLAN_CUES) and the letter asked, 4-6 steps on.
The solution opens with its plan, `add n-1`, `add n-2`, `add n-3` or `add a`: each letter is the
one before it plus itself, the letter two or three before it, or a. Then it works the chain that
plan names, one slips step line per letter. Why it is built this way:
1. A short plan decides the answer. The plan line is 6-8 tokens, its newline included, and the
   token that tells the plans apart is at position 4 to 6, inside any prefix of 8. Every later
   token follows from the plan and the constants: a solution is plan_solution(problem, plan).
2. The execution dominates the cost. Each cue is one token of the vocabulary and the definitions
   are written in the solution, not the problem, so prompts are 20-24 tokens against responses of
   170-256 (with EOS), and full OPD costs 9.3x a prefix run at L_train = 8 and 7.3x one at 16
   (flops.opd_flops over 256 test problems' solutions).
3. A student that works any plan but often picks the wrong one. The base is trained on the
   student's data: with probability PLAN_SLIP the written plan is another one, drawn uniformly,
   and it is worked right, so the base learns to work the plan written, whatever the cue says.
   The teacher is trained further on right plans, the student further on its data. In the
   committed pair, P(right plan | prompt) is 0.999 for the teacher and 0.29 for the student (each
   wrong plan ~0.24: the right one stays its most likely); the student works the plan it is
   given, its own or the teacher's, to the last token in 97% of rollouts.
4. A wrong plan is graded wrong, unless its chain ends on the same digit: 11% of wrong plans do
   (measured over the test problems). A fourth plan `add b` was dropped for `add n-1`: chains
   adding a and adding b end alike 30% of the time (always when a = b).
Measured with probe.probe on 128 test problems, one sample each at temperature 1: the student
alone 0.305, after the teacher's first 4 tokens 0.383, after 8, 16 or 64 tokens 0.977, the
teacher alone 1.000.

Departures from the paper's setting: the paper distils between pretrained Qwen3 models on
competition maths. Here both models are trained from scratch by `build()` with a character-level
vocabulary (plus the prompt's fixed pieces), and answers are graded by an exact string match on the
last \\boxed{} (single digits).

Build (once per task). slips: ~10 min on a quiet 2-core CPU, from the pace of its first 100 SFT
steps there; the committed build ran on a machine shared with other jobs and took 28 min,
build.json's build_seconds; a second build followed the committed one's losses step for step as far
as it was run (650 of 900 steps). plan: 900 SFT steps like slips, each ~0.87x as long (shorter
prompts), so ~11 min on a quiet 2-core CPU; the committed build ran build("toy/plan", "plan") with
one thread on a machine shared with other jobs and took 27 min (build.json), and a second one the
same way gave the same bytes in 17 min. The checkpoints are committed under toy/. On a shared
machine, OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep while they wait instead of spinning) made
small builds 2-5x faster with the same bytes:
    python toy.py                       # slips, into toy/ (shared machine: OMP_WAIT_POLICY=PASSIVE ...)
    python toy.py --task plan           # plan, into toy/plan/
"""

import hashlib
import json
import math
import random
import time
from pathlib import Path

import torch

from sample import BOXED_INSTRUCTION, build_prompt, sample_hf

TOY_DIR = Path(__file__).resolve().parent / "toy"
TASKS = ("slips", "plan")  # 'slips' keeps toy/teacher and toy/student; every other task has toy/TASK/
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SLIP = 0.2  # slips: probability that a sum in the student's solutions is off by one
PLAN_SLIP = 0.65  # plan: probability that the plan written in the student's solutions is another one
MAX_NEW_TOKENS = 320  # room past the longest solution (245 tokens + EOS); a rollout that hits it is truncated
TEST_EVERY = 8  # one problem in 8 belongs to the test split, chosen by a hash of its text
# SFT batches per task: the base from scratch, shared by teacher and student, then each branch further;
# slips: the base on clean solutions; plan: on the student's (wrong plans, worked right), so that
# it learns to work whatever plan is written before the teacher learns to write the right one
BUILD = {"slips": dict(base_steps=600, branch_steps=150, base_slip=0.0, student_slip=SLIP),
         "plan": dict(base_steps=600, branch_steps=150, base_slip=PLAN_SLIP, student_slip=PLAN_SLIP)}

# Special tokens of the Qwen3 chat format, plus a pad token.
PAD, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PROBLEM_HEAD, PROBLEM_ASK = "Work mod 10: ", ". What is "  # the problem's fixed wording
# The fixed pieces of every prompt (sample.build_prompt), one token each: the chat template's user
# and assistant turns, `<think>\n`, the instruction, and the problem's wording.
PROMPT_PIECES = (f"{IM_START}user\n", PROBLEM_HEAD, PROBLEM_ASK, f"\n\n{BOXED_INSTRUCTION}",
                 f"{IM_END}\n{IM_START}assistant\n", f"{THINK}\n")
# plan: the plan that opens a solution (`add n-2`: each letter is the one before it plus the letter
# two before it) and the rule's wording in the problem, the cue the plan is read from
PLAN_CUES = {"n-1": ". Each next letter adds the one before it twice",
             "n-2": ". Each next letter adds the two before it",
             "n-3": ". Each next letter adds the one before it and the one three before it",
             "a": ". Each next letter adds the one before it and a"}
TASK_PIECES = {"slips": PROMPT_PIECES, "plan": PROMPT_PIECES + tuple(PLAN_CUES.values())}

# ----------------------------------------------------------------------------- the task


def _chain(rng: random.Random):
    """A random program: constants [(name, digit)] and steps [(name, other, prev)], name = other + prev."""
    n_const, n_steps = rng.randint(2, 3), rng.randint(4, 6)
    constants = [(LETTERS[i], rng.randrange(10)) for i in range(n_const)]
    steps = []
    for i in range(n_const, n_const + n_steps):
        other, prev = LETTERS[rng.randrange(i - 1)], LETTERS[i - 1]  # the chain runs through prev
        steps.append((LETTERS[i], other, prev))
    return constants, steps


def _problem_text(constants, steps) -> str:
    defs = [f"{n}={v}" for n, v in constants] + [f"{n}={x}+{y}" for n, x, y in steps]
    return f"{PROBLEM_HEAD}{','.join(defs)}{PROBLEM_ASK}{steps[-1][0]}?"


def _solve(constants, steps, slip: float = 0.0, rng: random.Random | None = None):
    """The worked solution (the text after `<think>\\n`, without EOS) and its final value.

    With slip > 0 each sum is off by one with that probability (0 slips to 1), and the later steps
    use the wrong value: the student's training data."""
    value = dict(constants)
    lines = [f"{n}={v}" for n, v in constants]
    for n, x, y in steps:
        total = value[x] + value[y]  # 0..18, written in full before it is reduced
        if slip > 0 and rng.random() < slip:
            total = abs(total + rng.choice((-1, 1)))
        value[n] = total % 10
        lines.append(f"{n}={x}+{y},{x}={value[x]},{y}={value[y]},{value[x]}+{value[y]}={total},"
                     f"{total} mod 10={value[n]},{n}={value[n]}")
    answer = str(value[steps[-1][0]])
    return "\n".join(lines) + f"\n{END_THINK}\n\\boxed{{{answer}}}", answer


def _plan_draw(rng: random.Random) -> str:
    """A random plan problem: 3-4 constants, a rule named by its cue, and the letter 4-6 steps on."""
    n_const, n_steps = rng.randint(3, 4), rng.randint(4, 6)
    defs = ",".join(f"{LETTERS[i]}={rng.randrange(10)}" for i in range(n_const))
    rule = rng.choice(list(PLAN_CUES))
    return f"{PROBLEM_HEAD}{defs}{PLAN_CUES[rule]}{PROBLEM_ASK}{LETTERS[n_const + n_steps - 1]}?"


def plan_of(problem: str) -> str:
    """The right plan of a plan problem: the one whose cue the problem's wording holds."""
    return next(plan for plan, cue in PLAN_CUES.items() if cue + PROBLEM_ASK in problem)


def plan_solution(problem: str, plan: str | None = None) -> tuple[str, str]:
    """The worked solution of a plan problem under `plan` (default: the right one), and its answer.

    It opens with the plan, `add n-2`, then works the chain the plan names, line by line as slips
    does: letter i is letter i-1 plus itself (`n-1`), letter i-2 (`n-2`), i-3 (`n-3`) or a (`a`)."""
    right = plan_of(problem)
    defs, asked = problem.removeprefix(PROBLEM_HEAD).removesuffix("?").split(PLAN_CUES[right] + PROBLEM_ASK)
    constants = [(d[0], int(d[2:])) for d in defs.split(",")]
    plan = plan or right
    steps = []
    for i in range(len(constants), LETTERS.index(asked) + 1):
        other = {"n-1": LETTERS[i - 1], "n-2": LETTERS[i - 2], "n-3": LETTERS[i - 3]}.get(plan, plan)
        steps.append((LETTERS[i], other, LETTERS[i - 1]))
    solution, answer = _solve(constants, steps)
    return f"add {plan}\n{solution}", answer


def split_of(problem: str) -> str:
    """'test' for one problem in TEST_EVERY, by a hash of its text; else 'train'. Splits never overlap."""
    digest = hashlib.sha256(problem.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "little") % TEST_EVERY == 0 else "train"


def make_problems(n: int, seed: int = 0, split: str = "test", slip: float = 0.0, task: str = "slips") -> list[dict]:
    """n distinct problems of `task` and `split`, deterministic in (n, seed, split, task).

    Each is {id, problem, answer, solution}. With slip > 0 the solution (and its boxed answer) may be
    wrong, and `answer` is still the correct one: slips, each sum off by one with probability slip;
    plan, with probability slip the plan is one of the others, drawn uniformly, and worked correctly."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    tag = "toy" if task == "slips" else f"toy-{task}"
    rng = random.Random(f"{tag}/{split}/{seed}")
    slip_rng = random.Random(f"{tag}/{split}/{seed}/slips")  # its own stream: slips never change the problems
    problems, seen = [], set()
    while len(problems) < n:
        if task == "slips":
            constants, steps = _chain(rng)
            problem = _problem_text(constants, steps)
        else:
            problem = _plan_draw(rng)
        if split_of(problem) != split or problem in seen:
            continue
        seen.add(problem)
        if task == "slips":
            solution, answer = _solve(constants, steps)
            if slip > 0:
                solution, _ = _solve(constants, steps, slip, slip_rng)
        else:
            solution, answer = plan_solution(problem)
            if slip > 0 and slip_rng.random() < slip:
                other = slip_rng.choice([q for q in PLAN_CUES if q != plan_of(problem)])
                solution, _ = plan_solution(problem, other)
        problems.append({"id": f"{split}-{seed}-{len(problems)}", "problem": problem, "answer": answer,
                         "solution": solution})
    return problems


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced; None when there is none or it is unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            if depth == 0:
                return text[i:j]
            depth -= 1
    return None


def is_correct(completion: str, answer: str) -> bool:
    return extract_boxed(completion) == answer


# ----------------------------------------------------------------------------- tokenizer and models


def make_tokenizer(task: str = "slips"):
    """Character-level PreTrainedTokenizerFast with the Qwen3 chat tokens, a ChatML template, and one
    token for each of the task's TASK_PIECES (matched longest first, so `<|im_end|>\\n<|im_start|>assistant\\n`
    wins over `<|im_end|>` inside a prompt; a completion still ends in the bare `<|im_end|>`, EOS)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, IM_START, IM_END]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + [THINK, END_THINK] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one char each
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TASK_PIECES[task]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def make_model(tokenizer, hidden_size=128, layers=3, heads=4, seed=0):
    """A fresh Qwen3ForCausalLM over the toy vocabulary (head_dim 32: vLLM's CPU attention needs >= 32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, head_dim=32, max_position_embeddings=1024,
                         # untied: with tied embeddings the uniform guess over digits that SFT passes
                         # through pulls the digit embeddings together, and a run sat there for 600 steps
                         tie_word_embeddings=False, rope_theta=10000.0, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 1.0, 1.0, 0
    gen.max_new_tokens = MAX_NEW_TOKENS
    return model


def sft_batch(tokenizer, problems):
    """Right-padded (input_ids, attention_mask, labels): loss on the solution and EOS only."""
    rows, starts = [], []
    for p in problems:
        prompt = build_prompt(tokenizer, p["problem"])
        response = tokenizer(p["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + response)
        starts.append(len(prompt))
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    labels = torch.full((len(rows), T), -100)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, (r, s) in enumerate(zip(rows, starts)):
        input_ids[b, :len(r)] = torch.tensor(r)
        attention_mask[b, :len(r)] = 1
        labels[b, s:len(r)] = torch.tensor(r[s:])  # the model shifts labels: position t predicts t+1
    return input_ids, attention_mask, labels


def sft(model, tokenizer, problems, *, batch_size, lr, warmup=50, log_every=50):
    """AdamW on `problems`, each seen once, in batches; linear warmup then cosine decay to lr/20.

    A batch mixes problems of every shape (number of constants and steps) and so pads: in a run
    whose batches each held one shape, the operand look-ups were learned far more slowly."""
    batches = [problems[i:i + batch_size] for i in range(0, len(problems), batch_size)]
    steps = len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    t0 = time.time()
    for step, batch in enumerate(batches):
        input_ids, attention_mask, labels = sft_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss  # mean over response tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            print(f"  step {step:4d}/{steps}  loss {loss.item():.4f}  {time.time() - t0:4.0f}s", flush=True)
    model.eval()
    return model


def accuracy(model, tokenizer, problems, seed=0, batch_size=64) -> float:
    """Fraction solved by one sample per problem at temperature 1 (top-p 1), graded on the last \\boxed{}."""
    prompts = [build_prompt(tokenizer, p["problem"]) for p in problems]
    rollouts = sample_hf(model, prompts, 1, MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_p=1.0, seed=seed,
                         batch_size=batch_size)
    texts = tokenizer.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    return sum(is_correct(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)


def save(model, tokenizer, path: Path):
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)


def task_dir(task: str = "slips") -> Path:
    """Where a task's checkpoints live: toy/ for slips (as committed before tasks had names), else toy/TASK."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return TOY_DIR if task == "slips" else TOY_DIR / task


def build(out_dir: Path | None = None, task: str = "slips", seed: int = 0, base_steps: int | None = None,
          branch_steps: int | None = None, batch_size: int = 32, n_eval: int = 200) -> tuple[Path, Path]:
    """SFT from scratch (the base), then two branches on the same problems: clean solutions (teacher)
    and the student's, with slips or wrong plans (BUILD). Same shape, same tokenizer; prints accuracies."""
    settings = BUILD[task]
    base_steps = settings["base_steps"] if base_steps is None else base_steps
    branch_steps = settings["branch_steps"] if branch_steps is None else branch_steps
    torch.manual_seed(seed)
    out_dir, t0 = Path(out_dir or task_dir(task)), time.time()
    tokenizer = make_tokenizer(task)
    model = make_model(tokenizer, seed=seed)
    print(f"toy model ({task}): {sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"base: {base_steps} steps of {batch_size} solutions with slip probability {settings['base_slip']}, "
          f"from scratch")
    sft(model, tokenizer, make_problems(base_steps * batch_size, seed, "train", slip=settings["base_slip"], task=task),
        batch_size=batch_size, lr=2e-3)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, slip in (("teacher", 0.0), ("student", settings["student_slip"])):
        print(f"{name}: the base + {branch_steps} steps of {batch_size} solutions with slip probability {slip}")
        model.load_state_dict(base_state)
        problems = make_problems(branch_steps * batch_size, seed + 1, "train", slip=slip, task=task)  # same problems
        sft(model, tokenizer, problems, batch_size=batch_size, lr=1e-3)
        save(model, tokenizer, out_dir / name)
    build_seconds = time.time() - t0

    from transformers import AutoModelForCausalLM

    test = make_problems(n_eval, seed, "test", task=task)
    info = {"seed": seed, "build_seconds": round(build_seconds), "n_eval": n_eval, "temperature": 1.0}
    if task != "slips":  # slips' build.json keeps the keys it was committed with
        info = {"task": task, **settings, "base_steps": base_steps, "branch_steps": branch_steps,
                "batch_size": batch_size, **info}
    for name in ("teacher", "student"):
        loaded = AutoModelForCausalLM.from_pretrained(out_dir / name).eval()
        info[f"{name}_acc"] = accuracy(loaded, tokenizer, test, seed=seed)
    (out_dir / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"built in {build_seconds / 60:.1f} min; accuracy on {n_eval} test problems, one sample each at "
          f"temperature 1: teacher {info['teacher_acc']:.1%}, student {info['student_acc']:.1%}")
    return out_dir / "teacher", out_dir / "student"


def ensure_built(out_dir: Path | None = None, task: str = "slips") -> tuple[Path, Path]:
    """(teacher_path, student_path) of `task`, building them first if they are missing."""
    out_dir = Path(out_dir or task_dir(task))
    teacher, student = out_dir / "teacher", out_dir / "student"
    if not ((teacher / "model.safetensors").exists() and (student / "model.safetensors").exists()):
        build(out_dir, task)
    return teacher, student


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the toy teacher and student checkpoints of one task.")
    parser.add_argument("--task", choices=TASKS, default="slips", help="which toy task (default: slips, into toy/)")
    parser.add_argument("--out", type=Path, help="output directory (default: toy/ for slips, toy/TASK for others)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    build(args.out, args.task)
