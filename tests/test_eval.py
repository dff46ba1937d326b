"""eval.py: the grader against gold answers nobody here wrote, hand-picked equivalences, malformed
outputs, and the script end to end on tiny models (outputs, resume, checkpoint selection)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ONE_THREAD_ENV, ROOT, tiny_qwen3, tiny_tokenizer
from eval import (GRADE_TIMEOUT_S, equivalent, evaluate, extract_choice, grade, grade_choice, grade_math,
                  load_benchmark, main)
from sample import build_prompt

DATA_DIR = Path(os.environ.get("OPD_DATA_DIR", ROOT.parent / "shared" / "data"))


def shared_rows(name):
    path = DATA_DIR / name
    if not path.exists():
        pytest.skip(f"{path} not found: the offline benchmark JSONL lives outside the repo; "
                    f"set OPD_DATA_DIR to the folder that holds it")
    return [json.loads(line) for line in path.read_text().splitlines()]


def respond(answer):
    return f"Let me think.\n</think>\nSo the final answer is $\\boxed{{{answer}}}$."


def perturb_first_digit(answer):
    """The same answer with its first digit d replaced by d+1 mod 10, or None without digits."""
    m = re.search(r"\d", answer)
    return None if m is None else answer[:m.start()] + str((int(m.group()) + 1) % 10) + answer[m.end():]


# ----------------------------------------------------------------------------- gold data


def test_grader_agrees_with_math500_gold():
    """All 500 rows (about 15 s): the gold answer boxed is right, a different answer is wrong."""
    rows = shared_rows("math500.jsonl")
    t0 = time.time()
    accept = [grade_math(respond(r["answer"]), r["answer"]) for r in rows]
    # without the string fast path: math-verify itself must parse every gold form and match it
    accept_verify = [equivalent(r["answer"], r["answer"]) for r in rows]
    # wrong 1: the first digit changed (489 rows have a digit); wrong 2: the next row's different answer
    perturbed = [(r["answer"], perturb_first_digit(r["answer"])) for r in rows if perturb_first_digit(r["answer"])]
    reject_digit = [not grade_math(respond(w), gold) for gold, w in perturbed]
    def next_different(i):  # the first later answer that differs from row i's beyond spacing
        squeeze = lambda s: s.replace(" ", "")  # noqa: E731
        return next(o["answer"] for o in rows[i + 1:] + rows if squeeze(o["answer"]) != squeeze(rows[i]["answer"]))
    others = [(r["answer"], next_different(i)) for i, r in enumerate(rows)]
    reject_other = [not grade_math(respond(w), gold) for gold, w in others]
    rates = {name: sum(v) / len(v) for name, v in [("accept", accept), ("accept_verify_only", accept_verify),
                                                   ("reject_digit", reject_digit), ("reject_other", reject_other)]}
    print(f"MATH500 grader rates over {len(rows)} rows ({time.time() - t0:.1f}s): {rates}")
    assert len(rows) == 500 and len(perturbed) > 450
    assert all(rate >= 0.99 for rate in rates.values()), rates


@pytest.mark.parametrize("name", ["aime24.jsonl", "aime25.jsonl", "gsm8k_test.jsonl"])
def test_grader_agrees_with_integer_gold(name):
    """AIME and GSM8K: the answer as the source wrote it (AIME `025`, GSM8K `2,125`) is right, n+1 wrong."""
    rows = shared_rows(name)
    accept = [grade_math(respond(r["answer_raw"]), r["answer"]) for r in rows]
    reject = [not grade_math(respond(str(int(r["answer"].replace(",", "")) + 1)), r["answer"]) for r in rows]
    print(f"{name}: accept {sum(accept) / len(rows):.4f}, reject {sum(reject) / len(rows):.4f} over {len(rows)} rows")
    assert sum(accept) / len(rows) >= 0.99 and sum(reject) / len(rows) >= 0.99
    assert any("," in r["answer_raw"] for r in rows) or "gsm8k" not in name  # the separators were exercised


# ----------------------------------------------------------------------------- handwritten cases


@pytest.mark.parametrize("answer, gold, right", [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{3}{4}", "\\frac34", True),
    ("0.75", "\\dfrac{3}{4}", True),
    ("0.7", "\\frac{3}{4}", False),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\left(3,\\dfrac{\\pi}{2}\\right)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(\\frac{\\pi}{2}, 3)", "\\left( 3, \\frac{\\pi}{2} \\right)", False),  # a tuple's order matters
    ("(3, \\frac{\\pi}{3})", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("5", "5\\text{ cm}", True),
    ("5\\text{ cm}", "5", True),
    ("5 \\text{cm}", "5\\text{ cm}", True),
    ("6\\text{ cm}", "5\\text{ cm}", False),
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("[2, 5)", "[2,5)", True),
    ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("(2, 5]", "[2,5)", False),
    ("1,000", "1000", True),  # thousands separator
    ("1000", "1,000", True),
    ("\\$1,080", "1080", True),
    ("1,000,000", "1000000", True),
    ("1,001", "1000", False),
    ("2, 1", "1, 2", True),  # a list of solutions is a set
    ("x^2+1", "x^2+1", True),
    ("x^2+2", "x^2+1", False),
])
def test_math_equivalences(answer, gold, right):
    assert grade_math(respond(answer), gold) is right


def test_last_boxed_counts():
    assert grade_math("first \\boxed{3}, then \\boxed{4}", "4")
    assert not grade_math("first \\boxed{4}, then \\boxed{3}", "4")
    assert grade_math("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}")  # nested braces


@pytest.mark.parametrize("response, letter", [
    ("\\boxed{B}", "B"), ("\\boxed{(B)}", "B"), ("\\boxed{\\text{B}}", "B"), ("\\boxed{\\textbf{(B)}}", "B"),
    ("\\boxed{B. 42 kg}", "B"), ("\\boxed{B) 42 kg}", "B"), ("\\boxed{b}", "B"),
    ("I pick A. \\boxed{J}", "J"), ("\\boxed{Bob}", None), ("\\boxed{AB}", None), ("the answer is B", None),
    ("\\boxed{B:}", "B"), ("\\boxed{(B).}", "B"), ("\\boxed{\\mathrm{B}}", "B"),
    # a choice's own text may hold articles, letters in formulas and connectives after its start
    ("\\boxed{(B) A triangle}", "B"), ("\\boxed{B) Andrew}", "B"), ("\\boxed{B. f(a) = 2}", "B"),
    ("\\boxed{B) 5 or 6 kg}", "B"),
])
def test_choice_letter(response, letter):
    assert extract_choice(response) == letter
    assert grade_choice(response, "B") is (letter == "B")


@pytest.mark.parametrize("boxed", [
    "B or C", "B/C", "B, C", "B and C", "B & C", "B;C", "B \\lor C", "B \\text{ or } C", "\\text{B or C}",
    "(B) or (C)", "(B)/(C)", "(B), (C)", "B) or C)", "B. C.", "(B) C", "B) 42 kg, C) 50 kg", "B) 42 kg or (C) 50 kg",
    "I think it is C", "I think it is B", "It is B", "B is correct", "B 42 kg",
])
def test_an_answer_naming_more_than_one_choice_or_a_sentence_is_wrong(boxed):
    response = f"Hmm.\n</think>\nThe answer is $\\boxed{{{boxed}}}$."
    assert extract_choice(response) is None
    for gold in "BCI":  # never right, whichever letter it names or starts with (MMLU-Pro has a choice I)
        assert grade_choice(response, gold) is False


def test_hedged_answers_are_wrong_and_single_answers_right_when_the_gold_is_b():
    wrong = ["B or C", "B/C", "B, C", "B and C", "I think it is C"]
    right = ["B", "(B)", "\\text{B}", "B) text"]
    assert [grade_choice(f"\\boxed{{{a}}}", "B") for a in wrong] == [False] * len(wrong)
    assert [grade_choice(f"\\boxed{{{a}}}", "B") for a in right] == [True] * len(right)
    assert grade(dict(problem="?", choices=list("abcdefghij"), answer="B"), "\\boxed{B or C}") is False


# ----------------------------------------------------------------------------- malformed outputs

MALFORMED = {
    "empty": "",
    "no boxed": "The answer is 5.",
    "unclosed boxed": "\\boxed{5",
    "unbalanced braces": "\\boxed{\\frac{1}{2}}}}{{",
    "empty boxed": "\\boxed{}",
    "10,000 digits": "\\boxed{" + "9" * 10_000 + "}",
    "999 digits": "\\boxed{" + "9" * 999 + "}",
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "garbage latex": "\\boxed{\\frac{\\frac{\\frac{}{}}{\\sqrt[}{\\left( \\begin{matrix} & \\\\ \\end{pmatrix}}",
    "deep parentheses": "\\boxed{" + "(" * 500 + "}",
    "huge response": "x" * 2_000_000 + "\\boxed{6}",
    "control characters": "\\boxed{\x00\x07\\\x1b}",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_output_is_wrong_not_a_crash_or_hang(name):
    t0 = time.time()
    assert grade_math(MALFORMED[name], "5") is False
    assert grade_choice(MALFORMED[name], "B") is False
    # two parses and at most a couple of comparisons, each stopped after GRADE_TIMEOUT_S
    assert time.time() - t0 < 4 * GRADE_TIMEOUT_S + 2, f"{name}: {time.time() - t0:.1f}s"


# ----------------------------------------------------------------------------- benchmark rows


def test_toy_grading_agrees_with_toy_is_correct():
    """On the toy's own worked solutions, with and without slips, eval's grade and toy.is_correct agree."""
    import toy

    problems = load_benchmark("toy", toy_n=64) + toy.make_problems(64, seed=1, split="test", slip=0.3)
    verdicts = [(grade(p, p["solution"]), toy.is_correct(p["solution"], p["answer"])) for p in problems]
    assert all(ours == theirs for ours, theirs in verdicts)
    assert 0 < sum(ours for ours, _ in verdicts) < len(problems)  # both right and wrong answers were seen


def test_local_math500_loads_with_ids_and_answers():
    shared_rows("math500.jsonl")
    problems = load_benchmark("math500", DATA_DIR)
    assert len(problems) == 500 and problems[0]["id"] == "test/precalculus/807.json"
    assert problems[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert len(load_benchmark("gsm8k", DATA_DIR, limit=7)) == 7


# ----------------------------------------------------------------------------- end to end

PROBLEMS = [{"id": "p0", "problem": "What is 3+4?", "answer": "7"},
            {"id": "p1", "problem": "What is 10-3?", "answer": "7"},
            {"id": "p2", "problem": "What is 14/2?", "answer": "7"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random tiny Qwen3 checkpoint, a 3-problem data dir, and one eval.py run over them."""
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    tiny_qwen3(vocab_size=len(tok)).save_pretrained(root / "ckpt")
    tok.save_pretrained(root / "ckpt")
    (root / "data").mkdir()
    write_jsonl(root / "data" / "math500.jsonl", PROBLEMS)
    cmd = [sys.executable, str(ROOT / "eval.py"), "--model", str(root / "ckpt"), "--benchmarks", "math500",
           "--data-dir", str(root / "data"), "--k", "2", "--max-new-tokens", "8", "--out", str(root / "out")]
    t0 = time.time()
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD_ENV)
    first_s = time.time() - t0
    assert first.returncode == 0, first.stderr[-3000:]
    return root, cmd, first, first_s


def test_script_writes_records_summary_and_table(tiny_run):
    root, _, _, _ = tiny_run
    records = [json.loads(line) for line in (root / "out" / "math500.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    for r in records:
        assert len(r["responses"]) == len(r["correct"]) == len(r["extracted"]) == len(r["truncated"]) == 2
        assert all(n <= 8 for n in r["response_tokens"])
        assert r["correct"] == [grade_math(y, "7") for y in r["responses"]]  # the flags are the grader's
        assert r["prompt"].endswith("<think>\n") and "What is" in r["prompt"]
    summary = json.loads((root / "out" / "summary.json").read_text())["math500"]
    flags = [c for r in records for c in r["correct"]]
    assert summary["acc"] == sum(flags) / 6 and summary["k"] == 2 and summary["n"] == 3
    lengths = [n for r in records for n in r["response_tokens"]]
    assert summary["mean_response_tokens"] == sum(lengths) / 6
    assert summary["truncation_rate"] == sum(t for r in records for t in r["truncated"]) / 6
    table = (root / "out" / "results.md").read_text()
    assert "| model | MATH500 | train FLOP | train hours |" in table and f"{100 * summary['acc']:.1f}" in table


def test_rerun_resumes_without_sampling_again(tiny_run):
    root, cmd, _, first_s = tiny_run
    before = (root / "out" / "math500.jsonl").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD_ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "math500: resumed 3 of 3 problems" in again.stdout
    assert (root / "out" / "math500.jsonl").read_text() == before  # nothing appended, no duplicate ids


def test_partial_resume_draws_the_same_responses_and_matches_in_process_evaluate(tiny_run):
    """A run stopped mid-write resumes to exactly the uninterrupted result; train.py's in-process call
    (a model object, no output file) gives the same accuracy as the script."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, _, _ = tiny_run
    lines = (root / "out" / "math500.jsonl").read_text().splitlines(keepends=True)
    partial = root / "partial.jsonl"
    partial.write_text(lines[0] + lines[2][:25])  # p0 finished, p2 cut off mid-line, p1 never written
    model = AutoModelForCausalLM.from_pretrained(root / "ckpt").eval()
    tok = AutoTokenizer.from_pretrained(root / "ckpt")
    resumed = evaluate(model, tok, PROBLEMS, 2, 8, 0, out_path=partial)
    assert resumed["n_resumed"] == 1
    assert sorted(partial.read_text().splitlines()) == sorted(line.rstrip("\n") for line in lines)
    fresh = evaluate(model, tok, PROBLEMS, 2, 8, 0)
    summary = json.loads((root / "out" / "summary.json").read_text())["math500"]
    assert fresh["acc"] == resumed["acc"] == summary["acc"]
    assert [r["responses"] for r in fresh["records"]] == [json.loads(line)["responses"] for line in lines]
    with pytest.raises(ValueError, match="another --out"):  # other settings never mix into one file
        evaluate(model, tok, PROBLEMS, 2, 9, 0, out_path=partial)


def train_to_answer_seven(tok, steps=40):
    """A tiny model fine-tuned to reply `\\boxed{7}` to any prompt: a checkpoint that scores 100%."""
    model = tiny_qwen3(vocab_size=len(tok), seed=1).train()
    target = tok("\\boxed{7}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompts = [build_prompt(tok, f"What is {a}+{7 - a}?") for a in range(4)]
    rows = [p + target for p in prompts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    labels = torch.tensor([[-100] * len(p) + target + [-100] * (T - len(p) - len(target)) for p in prompts])
    mask = (torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


@pytest.fixture(scope="module")
def seven_checkpoint(tmp_path_factory):
    """A saved checkpoint of train_to_answer_seven, with its tokenizer."""
    tok = tiny_tokenizer()
    model, loss = train_to_answer_seven(tok)
    assert loss < 0.05, loss
    path = tmp_path_factory.mktemp("seven") / "ckpt"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_select_picks_the_best_dev_checkpoint_and_tests_only_it(tmp_path, seven_checkpoint):
    tok = tiny_tokenizer()
    run = tmp_path / "runs" / "toyrun"
    tiny_qwen3(vocab_size=len(tok)).save_pretrained(run / "checkpoints" / "step_000010")  # random: scores ~0
    tok.save_pretrained(run / "checkpoints" / "step_000010")
    shutil.copytree(seven_checkpoint, run / "checkpoints" / "step_000020")  # scores ~100%
    for name, flops, seconds in [("step_000010", 1e12, 3600.0), ("step_000020", 2e12, 7200.0)]:
        (run / "checkpoints" / name / "meta.json").write_text(json.dumps(
            {"step": int(name[5:]), "L_train": 8, "total_flops": flops, "wall_seconds": seconds}))
    (run / "checkpoints" / "step_000030.tmp").mkdir()  # an unfinished save: never evaluated
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "math500.jsonl", PROBLEMS)
    write_jsonl(tmp_path / "data" / "gsm8k_test.jsonl", PROBLEMS[:2])

    main(["--select", str(run), "--dev", "math500", "--test", "gsm8k", "--data-dir", str(tmp_path / "data"),
          "--k", "2", "--max-new-tokens", "12"])

    out = run / "eval"
    chosen = json.loads((out / "select.json").read_text())
    assert set(chosen["dev_acc"]) == {"step_000010", "step_000020"}
    assert chosen["best"] == "step_000020" and chosen["dev_acc"]["step_000020"] > chosen["dev_acc"]["step_000010"]
    assert [p.name for p in (out / "test").iterdir()] == ["step_000020"]
    test_summary = json.loads((out / "test" / "step_000020" / "summary.json").read_text())
    assert set(test_summary) == {"gsm8k"} and test_summary["gsm8k"]["acc"] >= 0.75
    table = (out / "test" / "step_000020" / "results.md").read_text()
    assert "| toyrun/step_000020 |" in table and "| 2.00e+12 | 2.00 |" in table


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed here: run under the .venv-vllm of .ci/vllm_env.sh")
def test_vllm_backend_writes_the_same_records(tmp_path, seven_checkpoint):
    """--backend vllm goes through sample.VLLMSampler and is graded like the transformers backend."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "math500.jsonl", PROBLEMS)
    cmd = [sys.executable, str(ROOT / "eval.py"), "--model", str(seven_checkpoint), "--benchmarks", "math500",
           "--data-dir", str(tmp_path / "data"), "--k", "2", "--max-new-tokens", "12", "--out", str(tmp_path / "out"),
           "--backend", "vllm", "--vllm-kv-cache-gb", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "math500.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2"]
    for r in records:
        assert r["correct"] == [grade_math(y, "7") for y in r["responses"]] and len(r["responses"]) == 2
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["math500"]["acc"] >= 0.75


@pytest.mark.parametrize("flags, message", [
    (["--model", "./no/such/ckpt"], "error: --model ./no/such/ckpt: no such checkpoint directory"),
    (["--model", "{tmp}/gone/step_000010"], "error: --model {tmp}/gone/step_000010: no such checkpoint directory"),
    (["--model", "{tmp}/ckpt", "--data-dir", "{tmp}/nowhere"], "error: --data-dir {tmp}/nowhere: no such directory"),
    (["--model", "{tmp}/ckpt", "--data-dir", "{tmp}/data"], "error: --data-dir: no math500 data in {tmp}/data"),
    (["--select", "{tmp}/no_run", "--dev", "math500"], "error: no checkpoints under {tmp}/no_run/checkpoints"),
])
def test_bad_paths_end_in_one_line_errors(tmp_path, flags, message):
    """The script itself: exit status 1 and one `error: ...` line, no traceback, nothing written."""
    (tmp_path / "ckpt").mkdir()  # only its existence is checked before the error
    (tmp_path / "data").mkdir()  # exists, but holds no math500.jsonl
    cmd = [sys.executable, str(ROOT / "eval.py"), "--benchmarks", "math500", "--out", str(tmp_path / "out"),
           *[f.format(tmp=tmp_path) for f in flags]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD_ENV)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), lines
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_not_taken_for_a_missing_path():
    from eval import check_model_path
    assert check_model_path("Qwen/Qwen3-1.7B-Base") == "Qwen/Qwen3-1.7B-Base"
    assert check_model_path("gpt2") == "gpt2"
    assert check_model_path("~") == str(Path.home())  # `~` is expanded: transformers would not
    for local in ("./Qwen3", "../Qwen/Qwen3-8B", "/ckpts/Qwen3", "~/no_such_ckpt_here", "runs/x/checkpoints/step_1"):
        with pytest.raises(ValueError, match="no such checkpoint directory"):
            check_model_path(local)


def test_select_evaluates_again_a_checkpoint_overwritten_at_the_same_path(tmp_path, seven_checkpoint):
    tok = tiny_tokenizer()
    run = tmp_path / "runs" / "reused"
    step = run / "checkpoints" / "step_000010"
    tiny_qwen3(vocab_size=len(tok)).save_pretrained(step)  # random: scores ~0
    tok.save_pretrained(step)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "math500.jsonl", PROBLEMS)
    argv = ["--select", str(run), "--dev", "math500", "--data-dir", str(tmp_path / "data"), "--k", "2",
            "--max-new-tokens", "12"]
    dev_records = run / "eval" / "dev" / "step_000010" / "math500.jsonl"

    main(argv)
    before = json.loads((run / "eval" / "select.json").read_text())["dev_acc"]["step_000010"]
    first_records = dev_records.read_text()
    main(argv)  # unchanged: the cached results are reused, nothing is sampled again
    assert dev_records.read_text() == first_records

    shutil.rmtree(step)  # a new run writes its own step_000010 into the same directory
    shutil.copytree(seven_checkpoint, step)
    main(argv)
    after = json.loads((run / "eval" / "select.json").read_text())["dev_acc"]["step_000010"]
    print(f"dev accuracy of step_000010: {before:.3f} before, {after:.3f} after it was overwritten")
    assert before < 0.5 <= after  # the new weights were evaluated, not the old results reused
    assert len(dev_records.read_text().splitlines()) == len(PROBLEMS)  # the old records are gone

    (step / "meta.json").write_text(json.dumps({"step": 10, "wall_seconds": 1.5}))  # contents changed again
    with pytest.raises(SystemExit, match="as it was before its files changed: use another --out"):
        main(["--model", str(step), "--benchmarks", "math500", "--data-dir", str(tmp_path / "data"), "--k", "2",
              "--max-new-tokens", "12", "--out", str(run / "eval" / "dev" / "step_000010")])


def test_checkpoint_fingerprint_reads_contents_not_timestamps(tmp_path):
    from eval import FINGERPRINT_SPAN, checkpoint_fingerprint
    a = tmp_path / "a"
    a.mkdir()
    weights = bytearray(5 * FINGERPRINT_SPAN)
    (a / "model.safetensors").write_bytes(weights)
    (a / "meta.json").write_text('{"step": 10}')
    first = checkpoint_fingerprint(a)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", (0, 0))  # other timestamps, same contents
    assert checkpoint_fingerprint(b) == first
    weights[-1] = 1  # the last bytes of the last tensor: what an optimizer step changes
    (a / "model.safetensors").write_bytes(weights)
    assert checkpoint_fingerprint(a) != first
    (a / "model.safetensors").write_bytes(bytes(5 * FINGERPRINT_SPAN))
    assert checkpoint_fingerprint(a) == first
    (a / "meta.json").write_text('{"step": 20}')
    assert checkpoint_fingerprint(a) != first
    assert checkpoint_fingerprint("Qwen/Qwen3-8B") is None  # a hub id: its name is the key


@pytest.mark.parametrize("task", ["toy-slips", "toy-plan"])
def test_toy_dev_set_follows_the_test_set_and_never_shares_a_problem(task):
    from eval import TOY_DEV_N, load_benchmark
    import toy
    test = load_benchmark(task, toy_n=128, toy_seed=3)
    dev = load_benchmark(f"{task}-dev", toy_n=128, toy_seed=3)
    assert len(dev) == TOY_DEV_N and not {p["problem"] for p in dev} & {p["problem"] for p in test}
    assert dev == toy.make_problems(128 + TOY_DEV_N, 3, split="test", task=task.split("-")[1])[128:]
    assert all(toy.split_of(p["problem"]) == "test" for p in dev)  # never a training problem either


def test_select_over_several_runs_writes_each_runs_choice(tmp_path, seven_checkpoint):
    tok = tiny_tokenizer()
    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    for run, good in zip(runs, ("step_000002", "step_000001")):  # run a improves, run b gets worse
        for name in ("step_000001", "step_000002"):
            ckpt = run / "checkpoints" / name
            if name == good:
                shutil.copytree(seven_checkpoint, ckpt)
            else:
                tiny_qwen3(vocab_size=len(tok)).save_pretrained(ckpt)
                tok.save_pretrained(ckpt)
            (ckpt / "meta.json").write_text(json.dumps({"step": int(name[5:]), "total_flops": 1e9, "wall_seconds": 1}))
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "math500.jsonl", PROBLEMS)
    main(["--select", *map(str, runs), "--dev", "math500", "--data-dir", str(tmp_path / "data"), "--k", "2",
          "--max-new-tokens", "12"])
    assert [json.loads((r / "eval" / "select.json").read_text())["best"] for r in runs] == ["step_000002",
                                                                                            "step_000001"]
    with pytest.raises(SystemExit):  # one --out cannot hold two runs' results
        main(["--select", *map(str, runs), "--dev", "math500", "--out", str(tmp_path / "x")])
