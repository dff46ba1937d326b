"""probe.py: L = 0 is the student alone; every response is the teacher's own first L tokens and then the
student's own continuation of them, within the budget; a Markov-chain model whose accuracy is known in
closed form hands the answer over exactly at the decisive token, and with student = teacher the
accuracy does not move with L; the script end to end; bad input."""

import importlib.util
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ONE_THREAD_ENV, ROOT, tiny_qwen3, tiny_tokenizer
from eval import evaluate, user_turn
from probe import main, probe
from sample import build_prompt, sample_hf
from score import check_same_vocabulary

PROBLEMS = [{"id": f"p{i}", "problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(8)]
BUDGET, PREFIXES, SEED = 32, [0, 3, 10, 30], 5


@pytest.fixture(scope="module")
def models():
    """(tokenizer, student, teacher): two different random tiny Qwen3s; the teacher often ends early."""
    tok = tiny_tokenizer()
    student, teacher = tiny_qwen3(vocab_size=len(tok), seed=0), tiny_qwen3(vocab_size=len(tok), seed=1)
    with torch.no_grad():  # EOS likely enough that some teacher responses end within a prefix
        teacher.lm_head.weight[tok.eos_token_id] = 0.25 * teacher.lm_head.weight[20] + 0.02
    return tok, student, teacher


@pytest.fixture(scope="module")
def two_samples(models):
    tok, student, teacher = models
    return probe(student, teacher, tok, PROBLEMS, PREFIXES, 2, BUDGET, SEED)


def own_rollouts(model, tok, prompts, max_new_tokens, seed, prompt_indices=None):
    return sample_hf(model, prompts, 1, max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     seed=seed, prompt_indices=prompt_indices)


def at(result, L):
    return [r for r in result["records"] if r["L"] == L]


# ----------------------------------------------------------------------------- (1) L = 0


def test_prefix_zero_is_the_student_alone_and_eval_py_for_one_sample(models):
    tok, student, teacher = models
    result = probe(student, teacher, tok, PROBLEMS, [0], 1, BUDGET, SEED)
    prompts = [build_prompt(tok, *user_turn(p)) for p in PROBLEMS]
    alone = own_rollouts(student, tok, prompts, BUDGET, SEED)  # eval.py's seeding: prompt index i, sample 0
    assert [r["response_ids"] for r in at(result, 0)] == [r.completion_ids for r in alone]
    assert all(r["teacher_tokens"] == 0 for r in at(result, 0))
    assert [r["truncated"] for r in at(result, 0)] == [r.truncated for r in alone]
    # ... so acc(0) is the accuracy eval.py reports for the student with the same seed, response for response
    evaluated = evaluate(student, tok, PROBLEMS, 1, BUDGET, SEED)
    assert [r["responses"][0] for r in evaluated["records"]] == [r["response"] for r in at(result, 0)]
    assert result["student_alone"]["acc"] == evaluated["acc"]



def test_prefix_zero_stops_where_eval_py_stops_the_student(models):
    """A model whose generation config ends on a second token too (Qwen3: <|im_end|> and <|endoftext|>)."""
    tok, _, teacher = models
    student = tiny_qwen3(vocab_size=len(tok), seed=0)
    prompts = [build_prompt(tok, *user_turn(p)) for p in PROBLEMS]
    plain = own_rollouts(student, tok, prompts, BUDGET, SEED)  # stopped at the tokenizer's EOS only
    second_eos = next(r.completion_ids[0] for r in plain  # a character the model starts a long response with
                      if r.truncated and r.completion_ids[0] not in tok.all_special_ids)
    student.generation_config.eos_token_id = [tok.eos_token_id, second_eos]
    result = probe(student, teacher, tok, PROBLEMS, [0], 1, BUDGET, SEED)
    evaluated = evaluate(student, tok, PROBLEMS, 1, BUDGET, SEED)
    assert [r["responses"][0] for r in evaluated["records"]] == [r["response"] for r in at(result, 0)]
    assert any(r["response_ids"][-1] == second_eos and not r["truncated"] for r in at(result, 0))

def test_prefix_zero_with_k_samples_is_the_students_rollouts_seeded_per_row(models, two_samples):
    tok, student, _ = models
    prompts = [build_prompt(tok, *user_turn(p)) for p in PROBLEMS for _ in range(2)]
    alone = own_rollouts(student, tok, prompts, BUDGET, SEED, prompt_indices=range(len(prompts)))  # i*k + j
    assert [r["response_ids"] for r in at(two_samples, 0)] == [r.completion_ids for r in alone]
    assert two_samples["prefixes"][0] == two_samples["student_alone"]


# ----------------------------------------------------------------------------- (2) the teacher's prefix


def test_responses_are_the_teachers_first_L_tokens_then_the_students_continuation(models, two_samples):
    tok, student, teacher = models
    assert two_samples["teacher_seed"] != SEED  # its own streams
    prompts = [build_prompt(tok, *user_turn(p)) for p in PROBLEMS for _ in range(2)]
    rows = range(len(prompts))
    cut, ended = 0, 0
    for L in PREFIXES[1:]:
        records = at(two_samples, L)
        # what the teacher samples for this seed when asked for L tokens only
        teacher_L = own_rollouts(teacher, tok, prompts, L, two_samples["teacher_seed"], prompt_indices=rows)
        todo = [r for r in rows if teacher_L[r].truncated]  # no EOS within L: the student continues
        student_tail = own_rollouts(student, tok, [prompts[r] + teacher_L[r].completion_ids for r in todo],
                                    BUDGET - L, SEED, prompt_indices=todo)
        tails = dict(zip(todo, student_tail))
        for r, record in enumerate(records):
            assert record["response_tokens"] == len(record["response_ids"]) <= BUDGET
            if r in tails:  # exactly L teacher tokens, then the student's own rollout from prompt + prefix
                assert len(teacher_L[r].completion_ids) == L
                assert record["response_ids"][:L] == teacher_L[r].completion_ids
                assert record["response_ids"][L:] == tails[r].completion_ids
                assert not record["teacher_done"] and record["truncated"] == tails[r].truncated
                cut += 1
            else:  # the teacher ended before L: its whole response, ending in EOS
                assert record["response_ids"] == teacher_L[r].completion_ids
                assert record["response_ids"][-1] == tok.eos_token_id and record["teacher_done"]
                ended += 1
    assert cut > 0 and ended > 0, "the fixture should exercise both cases"
    # the teacher-alone row: its whole responses, sampled at the full budget
    whole = own_rollouts(teacher, tok, prompts, BUDGET, two_samples["teacher_seed"], prompt_indices=rows)
    assert [r["response_ids"] for r in at(two_samples, BUDGET)] == [t.completion_ids for t in whole]
    assert two_samples["teacher_alone"]["L"] == BUDGET


# ----------------------------------------------------------------------------- (3) a model with known accuracy


class ChainLM(torch.nn.Module):
    """A Markov chain over characters posing as a causal LM for sample_hf: the next token depends on the last
    one only. After the prompt (which ends in a newline) it writes \\boxed{d} and EOS, 10 tokens, with d = 7
    (the gold answer) with probability p_correct and d = 3 otherwise. The digit is response token 7; its
    accuracy is p_correct, whoever wrote the tokens before it."""

    def __init__(self, tokenizer, p_correct):
        super().__init__()
        V, tid = len(tokenizer), tokenizer.convert_tokens_to_ids
        logp = torch.full((V, V), -math.inf)
        logp[:, tokenizer.eos_token_id] = 0.0  # off the path: stop
        path = ["\n", "\\", "b", "o", "x", "e", "d", "{"]
        nexts = {a: {b: 1.0} for a, b in zip(path, path[1:])}
        nexts |= {"{": {"7": p_correct, "3": 1 - p_correct}, "7": {"}": 1.0}, "3": {"}": 1.0}}
        for a, probs in nexts.items():
            logp[tid(a)] = torch.tensor([probs.get(tokenizer.convert_ids_to_tokens(v), 0.0) for v in range(V)]).log()
        self.register_buffer("logp", logp)  # (V, V): row = last token

    @property
    def device(self):
        return self.logp.device

    def forward(self, input_ids, **kwargs):  # (B, T) -> logits (B, T, V); no cache needed
        return SimpleNamespace(logits=self.logp[input_ids], past_key_values=None)


SEVENS = [{"id": f"s{i}", "problem": f"Say seven ({i}).", "answer": "7"} for i in range(50)]
CHAIN_PREFIXES, CHAIN_BUDGET = [0, 4, 7, 8, 9, 12], 16  # the digit is token 7; the response ends at 10


def test_a_prefix_hands_over_the_answer_exactly_when_it_contains_the_decisive_token():
    tok = tiny_tokenizer()
    right, wrong = ChainLM(tok, 1.0), ChainLM(tok, 0.0)
    result = probe(wrong, right, tok, SEVENS[:4], CHAIN_PREFIXES, 2, CHAIN_BUDGET, SEED)
    for r in result["records"]:
        assert r["response"] in ("\\boxed{7}", "\\boxed{3}")  # the student continued the prefix, not restarted
    accs = {row["L"]: row["acc"] for row in result["prefixes"]}
    assert accs == {0: 0.0, 4: 0.0, 7: 0.0, 8: 1.0, 9: 1.0, 12: 1.0}
    assert result["teacher_alone"]["acc"] == 1.0 and result["student_alone"]["acc"] == 0.0
    done = {row["L"]: row["teacher_done_rate"] for row in result["prefixes"]}
    assert done == {0: 0.0, 4: 0.0, 7: 0.0, 8: 0.0, 9: 0.0, 12: 1.0}  # 10 tokens, EOS included


def test_with_student_equal_to_teacher_accuracy_does_not_depend_on_L():
    tok = tiny_tokenizer()
    p = 0.5
    model = ChainLM(tok, p)
    k = 4
    result = probe(model, model, tok, SEVENS, CHAIN_PREFIXES, k, CHAIN_BUDGET, SEED)
    bound = 4 * math.sqrt(p * (1 - p) / (len(SEVENS) * k))  # 4 standard errors of a mean of 200 coin flips
    for row in result["prefixes"] + [result["teacher_alone"]]:
        assert abs(row["acc"] - p) < bound, row
    # and who draws the digit changes with L: the student's streams for L <= 7, the teacher's after
    digits = {L: [r["response"] for r in at(result, L)] for L in CHAIN_PREFIXES}
    assert digits[8] == digits[9] == digits[12] == [r["response"] for r in at(result, CHAIN_BUDGET)]
    assert digits[0] != digits[8]


def test_a_better_teacher_lifts_the_student_only_from_the_decisive_token_on():
    tok = tiny_tokenizer()
    student, teacher = ChainLM(tok, 0.2), ChainLM(tok, 0.9)
    result = probe(student, teacher, tok, SEVENS, CHAIN_PREFIXES, 4, CHAIN_BUDGET, SEED)
    n = len(SEVENS) * 4
    for row in result["prefixes"]:
        p = 0.2 if row["L"] <= 7 else 0.9
        assert abs(row["acc"] - p) < 4 * math.sqrt(p * (1 - p) / n), row


# ----------------------------------------------------------------------------- (4) the script


def write_checkpoint(path, seed, with_think=True):
    tok = tiny_tokenizer(with_think=with_think)
    tiny_qwen3(vocab_size=len(tok), seed=seed).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    write_checkpoint(root / "student", 0)
    write_checkpoint(root / "teacher", 1)
    write_checkpoint(root / "other_vocab", 1, with_think=False)
    (root / "data").mkdir()
    (root / "data" / "tiny.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:3]))
    return root


def script_args(root, *extra):
    return ["--student", str(root / "student"), "--teacher", str(root / "teacher"), "--benchmark", "tiny",
            "--data-dir", str(root / "data"), "--max-new-tokens", "12", "--k", "2", *extra]


def test_script_writes_json_markdown_png_and_records(checkpoints):
    out = checkpoints / "out"
    cmd = [sys.executable, str(ROOT / "probe.py"), *script_args(checkpoints, "--prefixes", "4,8", "--out", str(out))]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("sampler: transformers ")  # the start-up line names the sampler
    summary = json.loads((out / "probe.json").read_text())
    assert [row["L"] for row in summary["prefixes"]] == [0, 4, 8]  # 0, the student alone, always added
    assert (summary["n"], summary["k"], summary["max_new_tokens"]) == (3, 2, 12)
    assert summary["student_alone"] == summary["prefixes"][0] and summary["teacher_alone"]["L"] == 12
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 2 * 4
    for row in summary["prefixes"] + [summary["teacher_alone"]]:
        mine = [r for r in records if r["L"] == row["L"]]
        assert row["acc"] == sum(r["correct"] for r in mine) / len(mine)
        assert all(r["response_tokens"] <= 12 and r["teacher_tokens"] <= min(row["L"], 12) for r in mine)
    table = (out / "probe.md").read_text()
    assert "| 0 (student alone) |" in table and "| 12 = B (teacher alone) |" in table and "\n| 4 |" in table
    assert table in done.stdout
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the script's responses are the function's for the same checkpoints and seed
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(checkpoints / "student")
    student, teacher = (AutoModelForCausalLM.from_pretrained(checkpoints / name).eval()
                        for name in ("student", "teacher"))
    again = probe(student, teacher, tok, PROBLEMS[:3], [4, 8], 2, 12, 0)
    assert [r["response"] for r in again["records"]] == [r["response"] for r in records]


# ----------------------------------------------------------------------------- (5) bad input


@pytest.mark.parametrize("prefixes, match", [([0, BUDGET], "< the response budget"), ([-1, 4], ">= 0"),
                                             ([], "no prefix lengths")])
def test_bad_prefix_lengths_are_rejected(models, prefixes, match):
    tok, student, teacher = models
    with pytest.raises(ValueError, match=match):
        probe(student, teacher, tok, PROBLEMS, prefixes, 1, BUDGET, SEED)


def test_no_problems_or_samples_are_rejected(models):
    tok, student, teacher = models
    with pytest.raises(ValueError, match="no problems"):
        probe(student, teacher, tok, [], [0], 1, BUDGET, SEED)
    with pytest.raises(ValueError, match="samples per problem"):
        probe(student, teacher, tok, PROBLEMS, [0], 0, BUDGET, SEED)


@pytest.mark.parametrize("extra, match", [(["--prefixes", "0,12"], "< the response budget 12"),
                                          (["--prefixes", "0,-3"], ">= 0"),
                                          (["--prefixes", "0,abc"], "comma-separated integers"),
                                          (["--k", "0"], "must be >= 1")])
def test_script_rejects_bad_flags(checkpoints, capsys, extra, match):
    with pytest.raises(SystemExit):
        main(script_args(checkpoints, *extra, "--out", str(checkpoints / "never")))
    assert match in capsys.readouterr().err
    assert not (checkpoints / "never").exists()


def test_help_lists_the_vllm_backend(capsys):
    with pytest.raises(SystemExit):
        main(["--backend", "vllm", "--help"])
    assert "--backend {hf,vllm}" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm_is_a_one_line_error(checkpoints):
    with pytest.raises(SystemExit, match=r"^error: the vllm backend needs vLLM .*pip install -e '\.\[vllm\]'"):
        main(script_args(checkpoints, "--prefixes", "4", "--backend", "vllm", "--out", str(checkpoints / "never")))
    assert not (checkpoints / "never").exists()


def test_script_needs_checkpoints_outside_the_toy(capsys):
    with pytest.raises(SystemExit):
        main(["--benchmark", "math500", "--prefixes", "0,16"])
    assert "--student and --teacher are needed" in capsys.readouterr().err


def test_different_vocabularies_are_an_error(checkpoints):
    argv = script_args(checkpoints, "--prefixes", "4", "--out", str(checkpoints / "never"))
    argv[argv.index("--teacher") + 1] = str(checkpoints / "other_vocab")
    with pytest.raises(SystemExit, match="different vocabularies"):
        main(argv)
    tok = tiny_tokenizer()  # same tokenizer, output layers of different sizes
    with pytest.raises(ValueError, match="output layers have different vocabulary sizes"):
        check_same_vocabulary(tok, tok, tiny_qwen3(vocab_size=len(tok)), tiny_qwen3(vocab_size=len(tok) + 8))



@pytest.mark.parametrize("flag, value, message", [
    ("--student", "./no/such/student", "error: --student ./no/such/student: no such checkpoint directory"),
    ("--teacher", "{tmp}/gone", "error: --teacher {tmp}/gone: no such checkpoint directory"),
    ("--data-dir", "{tmp}/nowhere", "error: --data-dir {tmp}/nowhere: no such directory"),
    (None, None, "error: --data-dir: no math500 data in {tmp}/data"),  # the directory lacks the benchmark
])
def test_missing_paths_end_in_one_line_errors(tmp_path, flag, value, message):
    """The script itself: exit status 1 and one `error: ...` line naming the flag, no traceback."""
    (tmp_path / "ckpt").mkdir()  # only its existence is checked before the error
    (tmp_path / "data").mkdir()
    ckpt = str(tmp_path / "ckpt")
    flags = {"--student": ckpt, "--teacher": ckpt, "--data-dir": str(tmp_path / "data")}
    if flag is not None:
        flags[flag] = value.format(tmp=tmp_path)
    cmd = [sys.executable, str(ROOT / "probe.py"), "--benchmark", "math500", "--prefixes", "0,16",
           "--out", str(tmp_path / "out"), *[x for item in flags.items() for x in item]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=ONE_THREAD_ENV)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message.format(tmp=tmp_path)), lines
    assert not (tmp_path / "out").exists()
