"""
Teacher-prefix probe: does a short teacher prefix already let the student finish correctly?
(paper §3, Fig. 3: the observation that motivates training on prefixes only)

What it computes, for every prefix length L in a list and a benchmark of N problems x_i with gold
answers a_i, with k samples per problem and a response budget of B tokens:

    t_ij ~ pi_T(. | x_i)                  the teacher's response (at most B tokens)
    s_ij ~ pi_S(. | x_i, t_ij[:L])        the student's continuation (at most B - L tokens)
    y_ij = t_ij[:L] + s_ij                graded as one response, prefix included
    acc(L) = 1/N sum_i 1/k sum_j 1[answer(y_ij) == a_i]

acc(0) is the student alone. acc(B) is the teacher alone (no student token is left), drawn as a
line beside the student-alone one. The paper's finding: acc(L) climbs towards the teacher's
accuracy for L much shorter than a whole response, so the first tokens of a reasoning trace carry
much of what decides it, which is why prefix OPD supervises prefixes only.

If t_ij ends (EOS) within its first L tokens, y_ij is the teacher's whole response and the student
adds nothing. Answers are graded by eval.grade (the last \\boxed{}; math-verify or the letter).

    python probe.py                                   # toy: toy/student and toy/teacher
    python probe.py --student Qwen/Qwen3-1.7B-Base --teacher Qwen/Qwen3-8B --benchmark math500 \\
        --data-dir ../shared/data --prefixes 0,16,64,256,1024 --k 4 --backend vllm --out runs/probe_math500

Outputs under --out: probe.json (settings and one summary per L), probe.md (the table), probe.png
(acc against L, student-alone and teacher-alone lines) and records.jsonl (every graded response).

Departures from the paper, and choices it leaves open:
1. The teacher samples each response once, with the whole budget B, and the prefix of length L is
   its first L tokens. sample.py draws token t from uniform t of the rollout's own random stream
   (vLLM: from draw t of the request's own generator), so these are token for token the tokens
   that sampling with max_new_tokens = L draws (tests/test_probe.py, tests/test_vllm.py). Every L
   then extends the same teacher response, and the whole responses give the teacher-alone accuracy
   at no extra cost.
2. Rollout j of problem i is seeded as sample 0 of prompt index i*k + j (sample.py seeds per prompt
   index and sample; the prompts with different teacher prefixes are different prompts, so each
   rollout is its own prompt). For k = 1 that is eval.py's seeding: acc(0) is what
   `eval.py --model STUDENT --seed SEED` reports, and the teacher line what it reports for the
   teacher with --seed SEED+1. The teacher draws with seed + 1 so that its prefix and the student's
   continuation never read the same uniforms: a teacher token drawn from uniform u tells where u
   fell, and a student token drawn from u again would not be an independent draw.
3. Sampling goes through eval.py's samplers, at temperature 1 and top-p 1: the transformers loop
   (--backend hf) or one vLLM engine per model (--backend vllm; the teacher's engine writes every
   prefix and is shut down, then the student's continues them). The seeding of departure 2 is the
   same for both, but vLLM draws with its own sampler, so its tokens differ from the loop's. The
   prompt is built with the student's tokenizer (both models see the same prompt), and each model
   stops at its own EOS ids, as eval.py would stop it.
"""

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eval import (BATCH_SIZE, K_DEFAULT, TEMPERATURE, TOP_P, check_data_dir, check_model_path, grade,
                  load_benchmark, load_hf_model, make_sampler, max_new_tokens_for, user_turn)
from sample import build_prompt, describe_backend
from data import TOY_TASKS
from models import display_path
from score import check_same_vocabulary

TEACHER_SEED_OFFSET = 1  # the teacher samples with seed + 1: streams of its own (departure 2)
PREFIXES = {"toy": [0, 8, 32, 64, 128], "toy-slips": [0, 8, 32, 64, 128],  # default L list per benchmark
            "toy-plan": [0, 4, 8, 16, 64]}  # (toy responses: 160-246 tokens; the plan opens them)
PAPER_PREFIXES = [0, 16, 64, 256, 1024]  # every other benchmark (responses of thousands of tokens)
VLLM_GPU_FRACTION = 0.45  # of GPU memory per vLLM engine: the student's starts even if the teacher's is not yet freed

# ----------------------------------------------------------------------------- checks


def check_prefixes(prefixes: list[int], max_new_tokens: int) -> None:
    if not prefixes:
        raise ValueError("no prefix lengths given")
    bad = [L for L in prefixes if not 0 <= L < max_new_tokens]
    if bad:
        raise ValueError(f"prefix lengths must be >= 0 and < the response budget {max_new_tokens} (the student "
                         f"continues for budget - L tokens, at least one): got {bad}")


# ----------------------------------------------------------------------------- the probe


def sample_rows(sampler, prompts, prompt_indices, max_new_tokens, seed, batch_size, desc):
    """One rollout per prompt (sample 0 of its prompt index), batch by batch under a progress bar."""
    rollouts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        end = start + batch_size
        rollouts += sampler.generate(prompts[start:end], 1, max_new_tokens, seed,
                                     prompt_indices=prompt_indices[start:end])
    return rollouts


def sampler_for(model, tokenizer, backend: str, batch_size: int, vllm_kv_cache_gb: float | None):
    """eval.py's sampler for one model (a model, a path or a ready sampler), at the probe's temperature and top-p."""
    return make_sampler(model, tokenizer, backend, TEMPERATURE, TOP_P, batch_size, vllm_kv_cache_gb,
                        vllm_gpu_fraction=VLLM_GPU_FRACTION)


def release(sampler) -> None:
    """Free a sampler built by probe() before the next one starts: a vLLM engine is shut down now."""
    if hasattr(sampler, "close"):
        sampler.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(records: list[dict], L: int, seconds: float) -> dict:
    """acc(L) with its standard error over problems (the k samples of a problem are not independent)."""
    per_problem = {}
    for r in records:
        per_problem.setdefault(r["index"], []).append(r["correct"])
    means = [sum(c) / len(c) for c in per_problem.values()]  # (N,)
    N, acc = len(means), sum(means) / len(means)
    stderr = math.sqrt(sum((m - acc) ** 2 for m in means) / (N - 1) / N) if N > 1 else 0.0
    n_rollouts = len(records)
    return {"L": L, "acc": acc, "stderr": stderr, "n": N, "k": n_rollouts // N,
            "teacher_done_rate": sum(r["teacher_done"] for r in records) / n_rollouts,
            "mean_teacher_tokens": sum(r["teacher_tokens"] for r in records) / n_rollouts,
            "mean_response_tokens": sum(r["response_tokens"] for r in records) / n_rollouts,
            "truncation_rate": sum(r["truncated"] for r in records) / n_rollouts, "seconds": seconds}


def probe(student, teacher, tokenizer, problems: list[dict], prefixes: list[int], k: int, max_new_tokens: int,
          seed: int, *, teacher_tokenizer=None, backend: str = "hf", batch_size: int | None = None,
          vllm_kv_cache_gb: float | None = None) -> dict:
    """acc(L) for every L in prefixes (0, the student alone, is always added) and for L = max_new_tokens
    (the teacher alone). Returns {teacher_seed, prefixes: [summary per L], student_alone, teacher_alone,
    records}; a record is one graded response, its token ids included (response_ids).

    student, teacher: transformers models or checkpoint paths (backend "hf"), checkpoint paths (backend
    "vllm"), or samplers (eval.make_sampler). An engine built here is shut down when its rows are drawn."""
    check_prefixes(prefixes, max_new_tokens)
    if not problems:
        raise ValueError("no problems to probe")
    if k < 1:
        raise ValueError(f"samples per problem must be >= 1, got {k}")
    prefixes = sorted(set(prefixes) | {0})
    batch_size = batch_size or BATCH_SIZE[backend]
    teacher_seed = seed + TEACHER_SEED_OFFSET

    prompts = [build_prompt(tokenizer, *user_turn(p)) for p in problems]
    rows = [(i, j) for i in range(len(problems)) for j in range(k)]  # rollout j of problem i
    row_prompts = [prompts[i] for i, _ in rows]
    prompt_indices = [i * k + j for i, j in rows]  # each row's seed: sample 0 of this prompt index (departure 2)

    # The teacher's whole responses: the teacher-alone line, and every prefix is their first L tokens (departure 1).
    # eval.py's samplers: each model stops at its own EOS ids (its tokenizer's and its generation config's).
    t0 = time.time()
    teacher_sampler = sampler_for(teacher, teacher_tokenizer or tokenizer, backend, batch_size, vllm_kv_cache_gb)
    teacher_rollouts = sample_rows(teacher_sampler, row_prompts, prompt_indices, max_new_tokens, teacher_seed,
                                   batch_size, desc="teacher, whole")
    if teacher_sampler is not teacher:  # built here: the teacher is done, free its engine for the student's
        release(teacher_sampler)
    del teacher_sampler
    teacher_seconds = time.time() - t0
    student_sampler = sampler_for(student, tokenizer, backend, batch_size, vllm_kv_cache_gb)

    records, summaries = [], {}
    for L in prefixes + [max_new_tokens]:  # L = max_new_tokens: the teacher alone
        t0 = time.time()
        prefix = [t.completion_ids[:L] for t in teacher_rollouts]
        # the teacher's EOS within its first L tokens: its whole response, nothing left to continue
        teacher_done = [not t.truncated and len(t.completion_ids) <= L for t in teacher_rollouts]
        todo = [r for r in range(len(rows)) if not teacher_done[r] and L < max_new_tokens]
        continuation = {}
        if todo:  # the student continues from prompt + prefix, with the tokens the budget has left
            outs = sample_rows(student_sampler, [row_prompts[r] + prefix[r] for r in todo],
                               [prompt_indices[r] for r in todo], max_new_tokens - L, seed, batch_size,
                               desc=f"student after L={L}")
            continuation = dict(zip(todo, outs))
        mine = []
        for r, (i, j) in enumerate(rows):
            tail = continuation.get(r)
            response_ids = prefix[r] + (tail.completion_ids if tail else [])
            text = tokenizer.decode(response_ids, skip_special_tokens=True)
            mine.append({"L": L, "id": problems[i]["id"], "index": i, "sample": j, "prompt_index": prompt_indices[r],
                         "teacher_tokens": len(prefix[r]), "teacher_done": teacher_done[r],
                         "response_tokens": len(response_ids),
                         "truncated": tail.truncated if tail else teacher_rollouts[r].truncated,
                         "correct": grade(problems[i], text), "response": text, "response_ids": response_ids})
        records += mine
        seconds = time.time() - t0 + (teacher_seconds if L == max_new_tokens else 0.0)
        summaries[L] = summarize(mine, L, seconds)
        print(f"L={L:>6}: acc {summaries[L]['acc']:.3f} ± {summaries[L]['stderr']:.3f}  ({seconds:.0f}s)")
    if student_sampler is not student:
        release(student_sampler)
    return {"teacher_seed": teacher_seed, "prefixes": [summaries[L] for L in prefixes],
            "student_alone": summaries[0], "teacher_alone": summaries[max_new_tokens], "records": records}


# ----------------------------------------------------------------------------- reports


def results_table(result: dict, settings: dict) -> str:
    """Markdown: one row per L, then the teacher alone."""
    s = settings
    lines = ["## Teacher-prefix probe (paper §3, Fig. 3)", "",
             f"Student `{display_path(s['student'])}`, teacher `{display_path(s['teacher'])}`. Benchmark {s['benchmark']}: {s['n']} problems x "
             f"{s['k']} sample{'s' * (s['k'] != 1)} at temperature {TEMPERATURE}, drawn by "
             f"{'vLLM' if s['backend'] == 'vllm' else 'transformers'}; response budget "
             f"B = {s['max_new_tokens']} tokens, teacher prefix included; seed {s['seed']} "
             f"(teacher {result['teacher_seed']}).", "",
             "| teacher prefix L (tokens) | accuracy | ± s.e. | teacher ended within L | mean response tokens "
             "| truncated |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["prefixes"] + [result["teacher_alone"]]:
        label = {0: "0 (student alone)", s["max_new_tokens"]: f"{row['L']} = B (teacher alone)"}.get(row["L"], row["L"])
        lines.append(f"| {label} | {row['acc']:.3f} | {row['stderr']:.3f} | {row['teacher_done_rate']:.1%} "
                     f"| {row['mean_response_tokens']:.1f} | {row['truncation_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, settings: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["prefixes"]
    Ls = [r["L"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.errorbar(Ls, [r["acc"] for r in rows], yerr=[r["stderr"] for r in rows], marker="o", capsize=3,
                label="teacher's first L tokens, then the student")
    ax.axhline(result["teacher_alone"]["acc"], color="C2", ls=":", label="teacher alone")
    ax.axhline(result["student_alone"]["acc"], color="C3", ls="--", label="student alone")
    ax.set_xscale("symlog", linthresh=min([L for L in Ls if L > 0], default=1))  # L = 0 on a log axis
    ax.set_xticks(Ls, [str(L) for L in Ls])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("teacher prefix L (tokens)")
    ax.set_ylabel(f"accuracy ({settings['k']} sample{'s' * (settings['k'] != 1)} per problem)")
    ax.set_title(f"{settings['benchmark']}: {settings['n']} problems, budget {settings['max_new_tokens']} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, settings: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = settings | {key: result[key] for key in ("teacher_seed", "prefixes", "student_alone", "teacher_alone")}
    (out_dir / "probe.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "probe.md").write_text(results_table(result, settings))
    plot(result, settings, out_dir / "probe.png")
    with open(out_dir / "records.jsonl", "w") as f:  # the text only: token ids stay in memory
        for r in result["records"]:
            f.write(json.dumps({key: v for key, v in r.items() if key != "response_ids"}) + "\n")


# ----------------------------------------------------------------------------- command line


def prefix_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Teacher-prefix probe (paper §3, Fig. 3): accuracy when the teacher "
                                            "writes the first L tokens and the student the rest.")
    g = p.add_argument_group("models")
    g.add_argument("--student", help="student checkpoint dir or hub name (toy default: toy/student, built if missing)")
    g.add_argument("--teacher", help="teacher checkpoint dir or hub name, same vocabulary (toy default: toy/teacher)")
    g = p.add_argument_group("data")
    g.add_argument("--benchmark", default="toy", help=f"toy, one of eval.py's ({','.join(K_DEFAULT)}), or NAME "
                                                      "for DATA_DIR/NAME.jsonl")
    g.add_argument("--data-dir", help="read BENCHMARK.jsonl (id, problem, answer[, choices]) here instead of the hub")
    g.add_argument("--limit", type=int, help="only the first N problems")
    g = p.add_argument_group("prefix")
    g.add_argument("--prefixes", type=prefix_list,
                   help="comma-separated teacher prefix lengths L in tokens, 0 <= L < budget; 0 (the student alone) "
                        f"is always added (default: toy {','.join(map(str, PREFIXES['toy']))}, "
                        f"else {','.join(map(str, PAPER_PREFIXES))})")
    g = p.add_argument_group("sampling")
    g.add_argument("--k", type=int, help="samples per problem (default: eval.py's for the benchmark, else 1)")
    g.add_argument("--max-new-tokens", type=int, help="response budget B in tokens, teacher prefix included "
                                                      "(default: toy.MAX_NEW_TOKENS for the toy, else 16384)")
    g.add_argument("--seed", type=int, default=0, help=f"the student's sampling seed; the teacher samples with "
                                                       f"seed + {TEACHER_SEED_OFFSET}")
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="sampler for both models: transformers (sample.py) or vLLM (one engine per model, in turn)")
    g.add_argument("--vllm-kv-cache-gb", type=float, help=f"vLLM KV cache per engine in GiB (needed on CPU; default: "
                                                          f"{VLLM_GPU_FRACTION * 100:.0f}%% of GPU memory per engine)")
    g.add_argument("--batch-size", type=int, help=f"rollouts per generate call (default: {BATCH_SIZE})")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/probe", help="directory for probe.json, probe.md, probe.png, records.jsonl")
    args = p.parse_args(argv)

    args.max_new_tokens = max_new_tokens_for(args.benchmark, args)
    args.prefixes = args.prefixes if args.prefixes is not None else PREFIXES.get(args.benchmark, PAPER_PREFIXES)
    args.k = args.k if args.k is not None else K_DEFAULT.get(args.benchmark, 1)
    if args.k < 1 or min(v for v in (args.limit, args.batch_size, 1) if v is not None) < 1:
        p.error("--k, --limit and --batch-size must be >= 1")
    try:
        check_prefixes(args.prefixes, args.max_new_tokens)
    except ValueError as e:
        p.error(str(e))
    if args.student is None or args.teacher is None:
        if args.benchmark not in TOY_TASKS:
            p.error("--student and --teacher are needed (only the toy tasks have default checkpoints)")
        import toy
        teacher, student = toy.ensure_built(task=TOY_TASKS[args.benchmark])
        args.student, args.teacher = args.student or str(student), args.teacher or str(teacher)
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # bad paths end in one line, before any model is loaded
        args.student = check_model_path(args.student, "--student")
        args.teacher = check_model_path(args.teacher, "--teacher")
        if args.data_dir is not None:
            check_data_dir(args.data_dir, [args.benchmark])
        print(describe_backend(args.backend))
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    teacher_tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    try:
        check_same_vocabulary(tokenizer, teacher_tokenizer)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    problems = load_benchmark(args.benchmark, args.data_dir, args.limit)
    prefixes = sorted(set(args.prefixes) | {0})
    N = len(problems)
    print(f"{args.benchmark}: {N} problems x k={args.k}, budget B={args.max_new_tokens} tokens, L in {prefixes}; "
          f"rollouts: {N * args.k} teacher (whole) + {N * args.k} student per L; seeds: student {args.seed}, "
          f"teacher {args.seed + TEACHER_SEED_OFFSET}")

    t0 = time.time()
    student, teacher = args.student, args.teacher  # vLLM engines load their checkpoints themselves, in turn
    if args.backend == "hf":
        student, teacher = load_hf_model(args.student), load_hf_model(args.teacher)
        try:
            check_same_vocabulary(tokenizer, teacher_tokenizer, student, teacher)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
    result = probe(student, teacher, tokenizer, problems, prefixes, args.k, args.max_new_tokens, args.seed,
                   teacher_tokenizer=teacher_tokenizer, backend=args.backend, batch_size=args.batch_size,
                   vllm_kv_cache_gb=args.vllm_kv_cache_gb)
    settings = {"student": args.student, "teacher": args.teacher, "backend": args.backend, "benchmark": args.benchmark,
                "n": N, "k": args.k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "temperature": TEMPERATURE, "top_p": TOP_P, "wall_seconds": time.time() - t0}
    out_dir = Path(args.out)
    write_outputs(result, settings, out_dir)
    print(results_table(result, settings))
    print(f"wrote {out_dir}/probe.json, probe.md, probe.png, records.jsonl in {settings['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
