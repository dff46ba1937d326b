"""
Evaluation: mean accuracy over k samples per problem, the number in the paper's tables.

What it computes, for a benchmark of N problems x_i with gold answers a_i:

    acc = 1/N sum_i 1/k sum_j 1[answer(y_ij) == a_i],    y_ij ~ pi(. | x_i),  j = 1..k

Protocol (paper §4.1 and App. E): zero-shot; the problem goes in the chat template's user turn with
the boxed-answer instruction, and `<think>` is enforced at the end of the prompt
(sample.build_prompt); temperature 1.0, top-p 1.0, at most 16,384 new tokens; k = 4 samples per
problem for MATH500, GPQA-Diamond, MMLU-Pro and GSM8K, k = 16 for AIME24 and AIME25. answer(y) is
the content of the last \\boxed{} of the response. Maths answers are compared with the gold answer
by math-verify (symbolic and numeric equivalence: \\dfrac{1}{2} = 0.5, 1,000 = 1000); a
multiple-choice answer must name one choice, the gold letter (`\\boxed{B or C}` is wrong).

Checkpoint selection (App. E): every checkpoint saved during training is evaluated on a dev set,
and only the best one on the test benchmarks:

    python eval.py --select runs/NAME --dev aime24 --test math500,aime25,gpqa,mmlu_pro,gsm8k
    python eval.py --select runs/toy-plan --dev toy-plan-dev --test toy-plan     # the toy's own dev set

Results are kept per checkpoint (RUN_DIR/eval/dev/step_XXXXXX) and reused by a later --select only
while the checkpoint's path and a fingerprint of its files (checkpoint_fingerprint) are unchanged:
a checkpoint that a new run wrote over an old one's is evaluated again.

Outputs under --out: BENCH.jsonl (one line per problem with its prompt, k responses, extracted
answers and correct flags, appended as problems finish, so a stopped run resumes where it stopped),
summary.json (per benchmark: acc, k, n, mean response length in tokens, truncation rate) and
results.md (the layout of the paper's Tables 1/2: benchmarks as columns, plus the training FLOP and
hours from the checkpoint's meta.json when train.py wrote it).

Departures from the paper, and choices it leaves open:
1. MMLU-Pro is a fixed sample of 500 test questions drawn with seed 0. GPQA-Diamond stores the
   correct answer first, so its four choices are shuffled with a seed derived from the question's
   id. The paper's own subset and choice order are not reproduced.
2. Grading is bounded: an extracted answer longer than MAX_ANSWER_CHARS is wrong, and every
   math-verify parse and comparison gives up after GRADE_TIMEOUT_S seconds (counted wrong). Any
   error in grading counts as wrong, never as a crash.
3. A response without a \\boxed{} is wrong: there is no "the answer is ..." fallback. The whole
   response is searched, thinking included, so a truncated response that boxed an answer while
   thinking is graded on that answer.
4. Each response is drawn from its own random stream, seeded by (seed, problem index, sample
   index) (sample.py): which problems share a batch does not change what is drawn. A resumed run
   repeats an uninterrupted one, and train.py's in-process call (toy preset: 256 test problems,
   k = 1, seed 0) reports what `--benchmarks toy` reports for the same weights.
5. Toy answers are graded like maths answers. toy.is_correct's exact string match agrees on
   canonical answers (`\\boxed{7}`); math-verify also accepts forms such as `\\boxed{07}`.
"""

import argparse
import gc
import hashlib
import json
import re
import threading
import time
from pathlib import Path

import torch
from math_verify import LatexExtractionConfig, parse, verify
from math_verify.errors import TimeoutException
from tqdm import tqdm

from data import TOY_TASKS, load_benchmark_hub, load_benchmark_local
from models import check_model_path, load_hf_model
from sample import BOXED_INSTRUCTION, HFSampler, build_prompt, default_backend, describe_backend
from toy import extract_boxed  # the one \boxed{} reader: the toy task grades through it too

TEMPERATURE, TOP_P = 1.0, 1.0  # App. E
MAX_NEW_TOKENS = 16384  # App. E; the toy benchmark uses toy.MAX_NEW_TOKENS
# samples per problem: App. E for the paper's benchmarks; toy: what train.py reports (one per problem)
# The toy's dev sets (App. E's role of AIME24, for --select): TOY_DEV_N test-split problems drawn right after the
# --toy-n test problems from the same stream, so never one of them.
TOY_DEV = {f"{name}-dev": task for name, task in TOY_TASKS.items()}
TOY_DEV_N = 32  # small: every checkpoint of every run of a sweep is graded on it
K_DEFAULT = {"math500": 4, "aime24": 16, "aime25": 16, "gpqa": 4, "mmlu_pro": 4, "gsm8k": 4} | \
    {name: 1 for name in [*TOY_TASKS, *TOY_DEV]}
TITLES = {"math500": "MATH500", "aime24": "AIME24", "aime25": "AIME25", "gpqa": "GPQA-D",
          "mmlu_pro": "MMLU-Pro", "gsm8k": "GSM8K", "toy": "Toy", "toy-slips": "Toy (slips)", "toy-plan": "Toy (plan)"}
TITLES |= {f"{name}-dev": f"{TITLES[name]} dev" for name in TOY_TASKS}
PAPER_BENCHMARKS = ["math500", "aime24", "aime25", "gpqa", "mmlu_pro", "gsm8k"]
MAX_ANSWER_CHARS = 1000  # the longest MATH500 gold answer has 53 characters
GRADE_TIMEOUT_S = 3  # per math-verify parse or comparison (whole seconds: it uses signal.alarm)
LETTERS = "ABCDEFGHIJ"  # MMLU-Pro has up to 10 choices
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."
BATCH_SIZE = {"hf": 64, "vllm": 4096}  # rollouts per generate call; vLLM schedules its own batches
TOY_N, TOY_SEED = 256, 0  # the toy test set (toy.make_problems) of train.py's toy preset

# ----------------------------------------------------------------------------- grading

_LATEX = [LatexExtractionConfig()]


def _same_text(a: str, b: str) -> bool:
    """Equal up to spacing, \\left/\\right, $ and \\dfrac: a fast path that needs no parser."""
    def norm(s):
        return re.sub(r"\s+|\\left|\\right|\$", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return norm(a) == norm(b)


def equivalent(answer: str, gold: str) -> bool:
    """math-verify's verdict on answer == gold (symbolic, numeric, sets, intervals, tuples)."""
    # math-verify bounds its own work with signal.alarm, which works on the main thread only;
    # elsewhere the length cap in grade_math is the only bound.
    timeout = GRADE_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", extraction_config=_LATEX, parsing_timeout=timeout)
    answer_parsed = parse(f"\\boxed{{{answer}}}", extraction_config=_LATEX, parsing_timeout=timeout)
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))  # gold first: verify is not symmetric


def grade_math(response: str, gold: str) -> bool:
    """True when the last \\boxed{} of `response` equals `gold`. Never raises: any error is wrong."""
    try:
        answer = extract_boxed(response)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:  # a 10,000-digit "answer" is wrong at once
            return False
        return _same_text(answer, gold) or equivalent(answer, gold)
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


# One choice: a letter, bare or in parentheses, alone or followed by `.`, `:` or `)` and that choice's text.
_ONE_CHOICE = re.compile(r"\s*(?:\((?P<paren>[A-J])\)|(?P<bare>[A-J])(?:[.:)]|(?=\s*$)))(?P<text>.*)",
                         flags=re.DOTALL | re.IGNORECASE)
# A second choice in that text: it opens with a connective (`or C`, `, C`, `/C`) or is a lone letter (`(B) C`) ...
_HEDGE_START = re.compile(r"\s*(?:(?:or|and|nor)\b|\\lor|\\vee|[,/&;|+]|\(?[A-J]\)?[.:)]?\s*$)",
                          flags=re.IGNORECASE)
# ... or names another choice the way choices are named: `(C)`, or `C)` as a word (`f(a)` is not one)
_CHOICE_MARKER = re.compile(r"(?<![\w\\])\([A-J]\)|(?<![\w(\\])[A-J]\)")


def extract_choice(response: str) -> str | None:
    """The one letter named in the last \\boxed{}: B, (B), \\text{B}, B. and `B) the choice's text`.

    None when the box names no choice or more than one: `B or C`, `B/C`, `B, C`, `B and C`,
    `(B) or (C)`, `B) 4 kg, C) 5 kg`. A letter must stand alone or be followed by `.`, `:` or `)`,
    so a sentence (`I think it is C`) is no answer, and its `I` is not choice I. A choice whose own
    text names choices (`J) Both (A) and (B)`) is refused too when written out: box the letter alone."""
    boxed = extract_boxed(response)
    if boxed is None:
        return None
    boxed = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", boxed)
    match = _ONE_CHOICE.fullmatch(boxed)
    if match is None:
        return None
    text = match.group("text")
    if _HEDGE_START.match(text) or _CHOICE_MARKER.search(text):
        return None
    return (match.group("paren") or match.group("bare")).upper()


def grade_choice(response: str, gold_letter: str) -> bool:
    """True when the letter in the last \\boxed{} of `response` is `gold_letter`. Never raises."""
    try:
        return extract_choice(response) == gold_letter.strip().upper()
    except Exception:
        return False


def grade(problem: dict, response: str) -> bool:
    gold = str(problem["answer"])
    return grade_choice(response, gold) if "choices" in problem else grade_math(response, gold)


# ----------------------------------------------------------------------------- benchmarks
# A problem is {id, problem, answer}; multiple choice adds `choices` (a list) and `answer` is a letter.
# data.py reads them from the hub or from local JSONL files.


def load_benchmark(name: str, data_dir=None, limit=None, toy_n=TOY_N, toy_seed=TOY_SEED) -> list[dict]:
    if name in TOY_TASKS:
        import toy
        problems = toy.make_problems(toy_n, toy_seed, split="test", task=TOY_TASKS[name])
    elif name in TOY_DEV:
        import toy
        problems = toy.make_problems(toy_n + TOY_DEV_N, toy_seed, split="test", task=TOY_DEV[name])[toy_n:]
    elif data_dir is not None:
        problems = load_benchmark_local(name, Path(data_dir))
    else:
        problems = load_benchmark_hub(name)
    return problems[:limit] if limit else problems


def user_turn(problem: dict) -> tuple[str, str]:
    """(text, instruction) of the user turn: multiple choice lists lettered choices and asks for the letter."""
    if "choices" not in problem:
        return problem["problem"], BOXED_INSTRUCTION
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, problem["choices"]))
    return f"{problem['problem']}\n\n{choices}", CHOICE_INSTRUCTION


# ----------------------------------------------------------------------------- sampling backends


def make_sampler(model_or_path, tokenizer, backend: str, temperature: float, top_p: float, batch_size: int,
                 vllm_kv_cache_gb: float | None = None, vllm_gpu_fraction: float = 0.9):
    """An object with .generate(prompts, n, max_new_tokens, seed, prompt_indices) -> list[Rollout].
    vllm_gpu_fraction: of GPU memory, for this engine alone (vLLM's budget is per engine); by default
    the engine has the GPU to itself (no trainer beside it). On CPU give vllm_kv_cache_gb."""
    if hasattr(model_or_path, "generate") and not isinstance(model_or_path, torch.nn.Module):
        sampler = model_or_path  # already a sampler (sample.HFSampler or sample.VLLMSampler)
        if (getattr(sampler, "temperature", temperature), getattr(sampler, "top_p", top_p)) != (temperature, top_p):
            raise ValueError(f"the sampler draws at temperature {sampler.temperature}, top-p {sampler.top_p}; "
                             f"evaluation asked for {temperature}, {top_p}")
        return sampler
    if backend == "hf":
        model = load_hf_model(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
        # On a GPU the batch is sized by the KV cache the free memory holds (80% of it), so 16k-token
        # responses get a few rows at a time instead of an OOM; batch_size is the cap elsewhere.
        kv_cache_bytes = 0.8 * torch.cuda.mem_get_info(model.device)[0] if model.device.type == "cuda" else None
        return HFSampler(model, tokenizer, temperature=temperature, top_p=top_p, batch_size=batch_size,
                         kv_cache_bytes=kv_cache_bytes)
    if backend == "vllm":
        if not isinstance(model_or_path, (str, Path)):
            raise ValueError("the vllm backend loads weights itself: pass a checkpoint path or a VLLMSampler")
        from sample import VLLMSampler  # imports vllm

        # load_hf_model's dtypes: vLLM's "auto" would downcast a float32 checkpoint to bfloat16 on CPU
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        return VLLMSampler(str(model_or_path), dtype=dtype, temperature=temperature, top_p=top_p,
                           gpu_memory_utilization=vllm_gpu_fraction, kv_cache_gb=vllm_kv_cache_gb)
    raise ValueError(f"backend must be 'hf' or 'vllm', got {backend!r}")


# ----------------------------------------------------------------------------- evaluation


def read_records(out_path, problems, k, settings) -> dict:
    """{id: record} of the problems a previous run finished in out_path (resume)."""
    if out_path is None or not Path(out_path).exists():
        return {}
    data = Path(out_path).read_bytes()
    if data and not data.endswith(b"\n"):  # killed mid-write: drop the partial last line
        data = data[:data.rfind(b"\n") + 1]
        Path(out_path).write_bytes(data)
    records = {}
    for line in data.decode().splitlines():
        record = json.loads(line)
        theirs = {key: record[key] for key in settings} | {"k": len(record["correct"])}
        if theirs != settings | {"k": k}:
            raise ValueError(f"{out_path} holds results sampled with {theirs}, not {settings | {'k': k}}: "
                             f"use another --out")
        records[record["id"]] = record
    wanted = {p["id"] for p in problems}
    return {i: r for i, r in records.items() if i in wanted}


def summarize(records: list[dict], k: int) -> dict:
    correct = [c for r in records for c in r["correct"]]
    lengths = [n for r in records for n in r["response_tokens"]]
    truncated = [t for r in records for t in r["truncated"]]
    return {"acc": sum(correct) / len(correct), "k": k, "n": len(records),
            "mean_response_tokens": sum(lengths) / len(lengths), "truncation_rate": sum(truncated) / len(truncated)}


def evaluate(model_or_path, tokenizer, problems: list[dict], k: int, max_new_tokens: int, seed: int,
             backend: str = "hf", *, temperature: float = TEMPERATURE, top_p: float = TOP_P,
             batch_size: int | None = None, vllm_kv_cache_gb: float | None = None, out_path=None,
             desc: str = "eval") -> dict:
    """Mean accuracy over k samples per problem: {acc, k, n, mean_response_tokens, truncation_rate,
    n_resumed, records}.

    model_or_path: a checkpoint path, a transformers model, or a sampler (sample.HFSampler /
    VLLMSampler). Problem i is sampled with prompt index i, so its responses depend only on (model,
    seed, i): the same call from train.py or from this script gives the same accuracy. With out_path,
    each problem's record is appended there as it finishes and problems already there are skipped.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if len({p["id"] for p in problems}) != len(problems):
        raise ValueError("problem ids must be unique")
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_or_path)
    batch_size = batch_size or BATCH_SIZE[backend]
    sampler = make_sampler(model_or_path, tokenizer, backend, temperature, top_p, batch_size, vllm_kv_cache_gb)
    settings = {"seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    records = read_records(out_path, problems, k, settings)
    todo = [i for i, p in enumerate(problems) if p["id"] not in records]
    per_call = max(1, batch_size // k)  # problems per generate call: about one batch of rollouts
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem", dynamic_ncols=True)
    for start in range(0, len(todo), per_call):
        indices = todo[start:start + per_call]
        prompts = [build_prompt(tokenizer, *user_turn(problems[i])) for i in indices]
        rollouts = sampler.generate(prompts, k, max_new_tokens, seed, prompt_indices=indices)  # prompt-major
        for n, i in enumerate(indices):
            mine = rollouts[n * k:(n + 1) * k]
            responses = tokenizer.batch_decode([r.completion_ids for r in mine], skip_special_tokens=True)
            extract = extract_choice if "choices" in problems[i] else extract_boxed
            record = {"id": problems[i]["id"], "index": i, "prompt": tokenizer.decode(prompts[n]),
                      "answer": problems[i]["answer"], "responses": responses,
                      "extracted": [extract(y) for y in responses],
                      "correct": [grade(problems[i], y) for y in responses],
                      "response_tokens": [len(r.completion_ids) for r in mine],
                      "truncated": [r.truncated for r in mine], **settings}
            records[record["id"]] = record
            if out_path is not None:
                with open(out_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        bar.update(len(indices))
        done = [c for r in records.values() for c in r["correct"]]
        bar.set_postfix(acc=f"{sum(done) / len(done):.3f}")
    bar.close()
    ordered = [records[p["id"]] for p in problems]
    return summarize(ordered, k) | {"n_resumed": len(problems) - len(todo), "records": ordered}


# ----------------------------------------------------------------------------- reports


class ToyEval:
    """train.py's toy table: accuracy on n held-out toy problems, one sample each at temperature 1, of
    the teacher and the student before and after training. `saved`: the numbers a checkpoint carried."""
    KEYS = {"teacher": "teacher_acc", "student_before": "student_acc_before", "student_after": "student_acc_after"}

    def __init__(self, n: int, seed: int, tokenizer, saved: dict, task: str = "slips"):
        import toy
        self.problems = toy.make_problems(n, seed=seed, split="test", task=task)
        self.seed, self.tokenizer = seed, tokenizer
        self.acc = dict(saved) if saved.get("eval_problems") == n else {}

    def run(self, lms: dict):
        """Grade each model (name: model) and keep its accuracy."""
        import toy
        for name, lm in lms.items():
            self.acc[name] = evaluate(lm, self.tokenizer, self.problems, 1, toy.MAX_NEW_TOKENS, self.seed,
                                      desc=f"eval {name}")["acc"]
        self.acc["eval_problems"] = len(self.problems)
        if "student_before" in lms:
            print(f"toy accuracy before training: teacher {self.acc['teacher']:.3f}, student "
                  f"{self.acc['student_before']:.3f}", flush=True)

    def summary(self) -> dict:
        return {key: self.acc[name] for name, key in self.KEYS.items() if name in self.acc} | \
            {"eval_problems": len(self.problems)}

    def table(self) -> str:
        rows = [f"| {name.replace('_', ' ')} | {self.acc[name]:.3f} |" for name in self.KEYS if name in self.acc]
        return "\n".join([f"\n| toy, {len(self.problems)} held-out problems, 1 sample at T=1 | accuracy |",
                          "|---|---|"] + rows)


def read_meta(checkpoint) -> dict | None:
    """train.py's meta.json {step, L_train, total_flops, wall_seconds}, when the checkpoint has one."""
    path = Path(checkpoint) / "meta.json"
    return json.loads(path.read_text()) if path.exists() else None


def results_table(rows: list[tuple[str, dict, dict | None]]) -> str:
    """Markdown in the layout of the paper's Tables 1/2: one row per model, benchmarks as columns."""
    benches = [b for b in K_DEFAULT if any(b in summary for _, summary, _ in rows)]
    lines = ["| model | " + " | ".join(TITLES[b] for b in benches) + " | train FLOP | train hours |",
             "| --- |" + " ---: |" * (len(benches) + 2)]
    for name, summary, meta in rows:
        accs = [f"{100 * summary[b]['acc']:.1f}" if b in summary else "-" for b in benches]
        flops = f"{meta['total_flops']:.2e}" if meta else "-"
        hours = f"{meta['wall_seconds'] / 3600:.2f}" if meta else "-"
        lines.append(f"| {name} | " + " | ".join(accs) + f" | {flops} | {hours} |")
    ks = ", ".join(f"{TITLES[b]} {rows[0][1][b]['k']}" for b in benches if b in rows[0][1])
    lines.append(f"\nAccuracy (%) averaged over k samples per problem (k: {ks}).")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line


FINGERPRINT_SPAN = 64 * 2**10  # bytes read from each end of a large checkpoint file


def checkpoint_fingerprint(model_path) -> str | None:
    """A hash of what a checkpoint directory holds (None for a hub id): every file's name and size,
    the whole of each file up to 2 * FINGERPRINT_SPAN bytes (meta.json with train.py's step and wall
    time, config.json), and the first and last FINGERPRINT_SPAN bytes of larger ones (a safetensors
    header, then the end of its last tensors, which every optimizer step moves). Cheap (a few reads
    per file, whatever the model's size) and independent of timestamps, so a copied run keeps its
    cached results while an overwritten checkpoint gets new ones."""
    root = Path(model_path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 * FINGERPRINT_SPAN:
                digest.update(f.read())
            else:
                digest.update(f.read(FINGERPRINT_SPAN))
                f.seek(size - FINGERPRINT_SPAN)
                digest.update(f.read())
    return digest.hexdigest()


def evaluate_checkpoint(model_path, benchmarks: list[str], args, out_dir: Path, name=None,
                        replace_stale: bool = False) -> dict:
    """Every benchmark on one checkpoint; writes BENCH.jsonl, summary.json and results.md in out_dir.

    out_dir's config.json names the checkpoint and its fingerprint: results there are resumed only
    for the same checkpoint with the same contents. For other contents at the same path (a run
    written again into the same directory) they are deleted and redone when replace_stale (--select,
    whose cache this is), else refused."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.json"
    current = {"model": str(model_path), "fingerprint": checkpoint_fingerprint(model_path)}
    earlier = json.loads(config_path.read_text()) if config_path.exists() else current
    if earlier.get("model") != current["model"]:
        raise SystemExit(f"error: {out_dir} holds results of {earlier.get('model')}: use another --out")
    if earlier.get("fingerprint") != current["fingerprint"]:
        if not replace_stale:
            raise SystemExit(f"error: {out_dir} holds results of {model_path} as it was before its files changed: "
                             f"use another --out")
        print(f"{model_path} changed since its results in {out_dir} were written: evaluating it again")
        for stale in [*out_dir.glob("*.jsonl"), out_dir / "summary.json", out_dir / "results.md"]:
            stale.unlink(missing_ok=True)
    config_path.write_text(json.dumps(current, indent=2) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # one model or engine per checkpoint, shared by its benchmarks
    model = load_hf_model(model_path) if args.backend == "hf" else model_path
    batch_size = args.batch_size or BATCH_SIZE[args.backend]
    sampler = make_sampler(model, tokenizer, args.backend, args.temperature, args.top_p, batch_size,
                           args.vllm_kv_cache_gb)
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for bench in benchmarks:
        problems = load_benchmark(bench, args.data_dir, args.limit, args.toy_n, args.toy_seed)
        k, max_new_tokens = args.k or K_DEFAULT[bench], max_new_tokens_for(bench, args)
        result = evaluate(sampler, tokenizer, problems, k, max_new_tokens, args.seed, args.backend,
                          temperature=args.temperature, top_p=args.top_p, batch_size=batch_size,
                          out_path=out_dir / f"{bench}.jsonl", desc=bench)
        if result["n_resumed"]:
            print(f"{bench}: resumed {result['n_resumed']} of {len(problems)} problems from {out_dir / bench}.jsonl")
        summary[bench] = {key: v for key, v in result.items() if key != "records"} | {"max_new_tokens": max_new_tokens}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{bench}: acc {summary[bench]['acc']:.4f} (k={k}, n={len(problems)}), mean length "
              f"{summary[bench]['mean_response_tokens']:.0f} tokens, truncated {summary[bench]['truncation_rate']:.3f}")
    table = results_table([(name or Path(model_path).name, summary, read_meta(model_path))])
    (out_dir / "results.md").write_text(table)
    del sampler, model  # free the weights (or the vLLM engine) before the next checkpoint
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def max_new_tokens_for(bench: str, args) -> int:
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    if bench in TOY_TASKS or bench in TOY_DEV:
        import toy
        return toy.MAX_NEW_TOKENS
    return MAX_NEW_TOKENS


def checkpoints_of(run_dir: Path) -> list[Path]:
    """runs/NAME/checkpoints/step_XXXXXX in step order (train.py renames a finished one into place)."""
    found = [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def select(args) -> None:
    """App. E for each run directory: every checkpoint on the dev set; the best (ties: the earlier) on the test
    benchmarks. Several runs in one call share the start-up (imports, benchmark loading)."""
    for run_dir in map(Path, args.select):
        select_run(run_dir, Path(args.out) if args.out else run_dir / "eval", args)


def select_run(run_dir: Path, out_dir: Path, args) -> None:
    checkpoints = checkpoints_of(run_dir)
    if not checkpoints:
        raise SystemExit(f"error: no checkpoints under {run_dir / 'checkpoints'}")
    dev_acc, rows = {}, []
    for ckpt in checkpoints:
        summary = evaluate_checkpoint(ckpt, [args.dev], args, out_dir / "dev" / ckpt.name, replace_stale=True)
        dev_acc[ckpt.name] = summary[args.dev]["acc"]
        rows.append((ckpt.name, {args.dev: summary[args.dev]}, read_meta(ckpt)))
    best = max(checkpoints, key=lambda c: dev_acc[c.name])  # max() keeps the first of equal values
    chosen = {"dev": args.dev, "dev_acc": dev_acc, "best": best.name}
    (out_dir / "select.json").write_text(json.dumps(chosen, indent=2) + "\n")
    (out_dir / "select.md").write_text(f"Dev set: {TITLES[args.dev]}. Best checkpoint: {best.name}.\n\n"
                                       + results_table(rows))
    print((out_dir / "select.md").read_text())
    if args.test:
        evaluate_checkpoint(best, args.test, args, out_dir / "test" / best.name, name=f"{run_dir.name}/{best.name}",
                            replace_stale=True)
        print((out_dir / "test" / best.name / "results.md").read_text())


def check_data_dir(data_dir, benchmarks: list[str]) -> None:
    """DATA_DIR is a directory holding every benchmark asked for (the toy needs none): ValueError, one line."""
    if not Path(data_dir).is_dir():
        raise ValueError(f"--data-dir {data_dir}: no such directory")
    for bench in benchmarks:
        if bench not in TOY_TASKS and bench not in TOY_DEV:
            try:
                load_benchmark(bench, data_dir, limit=1)
            except FileNotFoundError as e:
                raise ValueError(f"--data-dir: {e}") from None


def benchmark_list(text: str) -> list[str]:
    return [b for b in text.split(",") if b]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Accuracy over k samples per problem (paper §4.1, App. E).")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint directory or hub name to evaluate")
    g.add_argument("--backend", choices=["hf", "vllm"], default=None, help="sampler: transformers (sample.py) or "
                   "vLLM (default: vllm when it is installed and CUDA is present, else hf)")
    g.add_argument("--vllm-kv-cache-gb", type=float,
                   help="vLLM KV cache in GiB (needed on CPU; default: 90%% of GPU memory)")
    g = p.add_argument_group("checkpoint selection (App. E)")
    g.add_argument("--select", metavar="RUN_DIR", nargs="+", help="evaluate every RUN_DIR/checkpoints/step_* on --dev")
    g.add_argument("--dev", default="aime24", help="dev benchmark for --select")
    g.add_argument("--test", type=benchmark_list, default=[], help="comma-separated benchmarks for the best checkpoint")
    g = p.add_argument_group("data")
    g.add_argument("--benchmarks", type=benchmark_list, default=PAPER_BENCHMARKS,
                   help=f"comma-separated, from {','.join(K_DEFAULT)} (with --model)")
    g.add_argument("--data-dir", help="read BENCH.jsonl (id, problem, answer[, choices]) here instead of the hub")
    g.add_argument("--limit", type=int, help="only the first N problems of each benchmark (smoke tests)")
    g.add_argument("--toy-n", type=int, default=TOY_N, help="problems in the toy test set (its dev set: the "
                   f"{TOY_DEV_N} drawn after them)")
    g.add_argument("--toy-seed", type=int, default=TOY_SEED, help="seed of the toy test set")
    g = p.add_argument_group("sampling")
    g.add_argument("--k", type=int, help="samples per problem (default: 16 for AIME, 4 for the other paper "
                                         "benchmarks (App. E), 1 for toy)")
    g.add_argument("--max-new-tokens", type=int,
                   help=f"response budget in tokens (default {MAX_NEW_TOKENS}; toy: toy.MAX_NEW_TOKENS)")
    g.add_argument("--temperature", type=float, default=TEMPERATURE, help="sampling temperature")
    g.add_argument("--top-p", type=float, default=TOP_P, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (each problem and sample gets its own stream)")
    g.add_argument("--batch-size", type=int, help=f"rollouts per generate call (default: {BATCH_SIZE})")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="output directory (with --select default: RUN_DIR/eval)")
    g.add_argument("--name", help="row label in results.md (default: the checkpoint directory's name)")
    args = p.parse_args(argv)
    if (args.model is None) == (args.select is None):
        p.error("give exactly one of --model and --select")
    if args.model is not None and args.out is None:
        p.error("--model needs --out")
    if args.select and len(args.select) > 1 and args.out:
        p.error("--out takes one --select RUN_DIR (several write to RUN_DIR/eval each)")
    for b in args.benchmarks + args.test + [args.dev]:
        if b not in K_DEFAULT:
            p.error(f"unknown benchmark {b!r}; choose from {','.join(K_DEFAULT)}")
    args.backend_by_default = args.backend is None
    args.backend = args.backend or default_backend()  # vLLM on a GPU where it is installed
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        print(describe_backend(args.backend) + (" (the default here)" if args.backend_by_default else ""))
    except ImportError as e:
        raise SystemExit(f"error: {e}")
    benches = ([args.dev] + args.test) if args.select else args.benchmarks
    try:  # bad paths end in one line, before any model is loaded
        if args.model is not None:
            args.model = check_model_path(args.model)
        if args.data_dir is not None:
            check_data_dir(args.data_dir, list(dict.fromkeys(benches)))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    for b in dict.fromkeys(benches):
        k = args.k or K_DEFAULT[b]
        print(f"{b}: k={k} samples per problem, up to {max_new_tokens_for(b, args)} new tokens, "
              f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}")
    t0 = time.time()
    if args.select:
        select(args)
    else:
        evaluate_checkpoint(args.model, args.benchmarks, args, Path(args.out), name=args.name)
        print((Path(args.out) / "results.md").read_text())
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":  # vLLM spawns processes: keep the entry point guarded
    main()
