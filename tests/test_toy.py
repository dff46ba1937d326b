"""The toy task and its committed checkpoints: generator, tokenizer, chat prompt, grading, teacher."""

import pytest
import torch

import toy
from sample import build_prompt


def test_make_problems_is_deterministic():
    assert toy.make_problems(20, seed=3, split="train") == toy.make_problems(20, seed=3, split="train")
    assert toy.make_problems(20, seed=3, split="train") != toy.make_problems(20, seed=4, split="train")


def test_train_and_test_splits_are_disjoint():
    train = {p["problem"] for p in toy.make_problems(2000, seed=0, split="train")}
    test = {p["problem"] for p in toy.make_problems(500, seed=0, split="test")}
    assert len(train) == 2000 and len(test) == 500
    assert not train & test
    assert all(toy.split_of(p) == "test" for p in test)


def test_solution_is_correct_and_ends_in_the_boxed_answer():
    for p in toy.make_problems(50, seed=0, split="test"):
        assert p["solution"].endswith(f"</think>\n\\boxed{{{p['answer']}}}")
        assert toy.is_correct(p["solution"], p["answer"])


def test_slips_change_the_answer_of_some_solutions():
    clean = toy.make_problems(200, seed=0, split="train")
    sloppy = toy.make_problems(200, seed=0, split="train", slip=toy.SLIP)
    assert [p["problem"] for p in clean] == [p["problem"] for p in sloppy]
    wrong = sum(not toy.is_correct(p["solution"], p["answer"]) for p in sloppy)
    assert 0.4 * 200 < wrong < 0.95 * 200  # slips propagate to the answer, but not always happen


def test_solutions_are_100_to_400_tokens():
    tokenizer = toy.make_tokenizer()
    for p in toy.make_problems(300, seed=0, split="test"):
        ids = tokenizer(p["solution"], add_special_tokens=False)["input_ids"]
        assert 100 <= len(ids) <= 400
        assert tokenizer.decode(ids) == p["solution"]  # character-level: decoding is lossless


def test_chat_template_and_think_are_applied():
    tokenizer = toy.make_tokenizer()
    problem = toy.make_problems(1, seed=0, split="test")[0]["problem"]
    ids = build_prompt(tokenizer, problem)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n" + problem + "\n\nPlease reason step by step")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<think>\n")  # `<think>` and its newline: one token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_the_prompts_fixed_pieces_are_one_token_each():
    tokenizer = toy.make_tokenizer()
    problem = toy.make_problems(1, seed=0, split="test")[0]["problem"]
    ids = build_prompt(tokenizer, problem)
    pieces = [tokenizer.convert_tokens_to_ids(piece) for piece in toy.PROMPT_PIECES]
    assert tokenizer.unk_token_id not in pieces and set(pieces) <= set(ids)
    definitions = problem.removeprefix(toy.PROBLEM_HEAD).split(toy.PROBLEM_ASK)[0]
    assert len(ids) == len(toy.PROMPT_PIECES) + len(definitions) + 2  # + the asked letter and "?"
    # a completion that writes EOS then the next turn's opening gets the bare EOS id back
    assert tokenizer("\\boxed{4}<|im_end|>", add_special_tokens=False)["input_ids"][-1] == tokenizer.eos_token_id


def test_full_opd_costs_over_5x_a_prefix_of_8_tokens():
    """The FLOP axis of a prefix sweep: prompt + full response against prompt + 8 tokens,
    App. B FLOP of the toy's own model shapes, over the held-out problems' worked solutions."""
    import flops

    tokenizer = toy.make_tokenizer()
    config = toy.make_model(tokenizer).config
    prompts, responses = [], []
    for p in toy.make_problems(256, seed=0, split="test"):
        prompts.append(len(build_prompt(tokenizer, p["problem"])))
        responses.append(len(tokenizer(p["solution"], add_special_tokens=False)["input_ids"]) + 1)  # + EOS
    full = flops.opd_flops(config, config, [x + y for x, y in zip(prompts, responses)])
    prefix = flops.opd_flops(config, config, [x + min(y, 8) for x, y in zip(prompts, responses)])
    assert full / prefix > 5


@pytest.mark.parametrize("text, expected", [
    ("</think>\n\\boxed{7}", "7"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("no box here", None),
    ("\\boxed{3", None),
])
def test_extract_boxed(text, expected):
    assert toy.extract_boxed(text) == expected


@pytest.fixture(scope="module")
def checkpoints():
    paths = toy.TOY_DIR / "teacher", toy.TOY_DIR / "student"
    for path in paths:  # committed to git, so never missing in a checkout
        assert (path / "model.safetensors").exists(), f"{path} is missing: rebuild with `python toy.py`"
    return paths


def test_checkpoints_have_the_chat_tokens(checkpoints):
    from transformers import AutoConfig, AutoTokenizer

    for path in checkpoints:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        assert config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.head_dim == 32
        assert tokenizer.decode(build_prompt(tokenizer, "x")).endswith("<think>\n")


def test_committed_teacher_solves_held_out_problems_at_temperature_1(checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[0])
    teacher = AutoModelForCausalLM.from_pretrained(checkpoints[0]).eval()
    problems = toy.make_problems(64, seed=123, split="test")
    assert toy.accuracy(teacher, tokenizer, problems, seed=0) >= 0.9


# ----------------------------------------------------------------------------- the plan task


def test_tasks_and_their_checkpoint_dirs():
    assert toy.TASKS == ("slips", "plan")
    assert toy.task_dir("slips") == toy.TOY_DIR and toy.task_dir("plan") == toy.TOY_DIR / "plan"
    with pytest.raises(ValueError):
        toy.task_dir("nope")
    with pytest.raises(ValueError):
        toy.make_problems(1, task="nope")


def test_plan_problems_are_deterministic_and_not_slips_problems():
    a = toy.make_problems(50, seed=3, split="train", task="plan")
    assert a == toy.make_problems(50, seed=3, split="train", task="plan")
    assert a != toy.make_problems(50, seed=4, split="train", task="plan")
    assert not {p["problem"] for p in a} & {p["problem"] for p in toy.make_problems(50, seed=3, split="train")}


def test_plan_train_and_test_splits_are_disjoint():
    train = {p["problem"] for p in toy.make_problems(4000, seed=0, split="train", task="plan")}
    test = {p["problem"] for p in toy.make_problems(500, seed=0, split="test", task="plan")}
    assert len(train) == 4000 and len(test) == 500
    assert not train & test
    assert all(toy.split_of(p) == "test" for p in test) and all(toy.split_of(p) == "train" for p in train)


def reference_chain(problem: str, plan: str) -> list[int]:
    """Every letter's value under `plan`, by the recurrence itself: x_i = x_(i-1) + x_j mod 10."""
    right = toy.plan_of(problem)
    defs, asked = problem.removeprefix(toy.PROBLEM_HEAD).removesuffix("?").split(toy.PLAN_CUES[right] + toy.PROBLEM_ASK)
    values = [int(d.split("=")[1]) for d in defs.split(",")]
    while len(values) <= toy.LETTERS.index(asked):
        i = len(values)
        j = {"n-1": i - 1, "n-2": i - 2, "n-3": i - 3, "a": 0}[plan]
        values.append((values[i - 1] + values[j]) % 10)
    return values


def test_the_plan_decides_the_solution_and_its_answer():
    """Under any of the four plans a problem's solution opens with that plan and works that plan's
    chain; the right plan's is graded right, a wrong plan's wrong unless the two chains end alike."""
    problems = toy.make_problems(500, seed=0, split="test", task="plan")
    coincide = 0
    for p in problems:
        right = toy.plan_of(p["problem"])
        assert p["solution"] == toy.plan_solution(p["problem"], right)[0] == toy.plan_solution(p["problem"])[0]
        assert toy.is_correct(p["solution"], p["answer"])
        for plan in toy.PLAN_CUES:
            solution, answer = toy.plan_solution(p["problem"], plan)
            values = reference_chain(p["problem"], plan)
            assert solution.startswith(f"add {plan}\n") and solution.endswith(f"</think>\n\\boxed{{{values[-1]}}}")
            assert answer == str(values[-1])
            lines = solution.split("\n")[1:-2]  # the constants, then one line per step
            assert [line.split(",")[-1] for line in lines] == [f"{toy.LETTERS[i]}={v}" for i, v in enumerate(values)]
            if plan != right:
                same = reference_chain(p["problem"], right)[-1] == values[-1]
                assert toy.is_correct(solution, p["answer"]) == same
                coincide += same
    assert 0.08 < coincide / (3 * len(problems)) < 0.14  # measured: 11% of wrong plans end on the right digit


def test_student_data_writes_another_plan_with_probability_plan_slip():
    clean = toy.make_problems(1000, seed=0, split="train", task="plan")
    sloppy = toy.make_problems(1000, seed=0, split="train", task="plan", slip=toy.PLAN_SLIP)
    assert [p["problem"] for p in clean] == [p["problem"] for p in sloppy]
    wrong_plan = 0
    for p in sloppy:
        written = p["solution"].split("\n")[0].removeprefix("add ")
        assert p["solution"] == toy.plan_solution(p["problem"], written)[0]  # worked right for the plan written
        wrong_plan += written != toy.plan_of(p["problem"])
    assert abs(wrong_plan / 1000 - toy.PLAN_SLIP) < 0.05
    wrong = sum(not toy.is_correct(p["solution"], p["answer"]) for p in sloppy)
    assert 0.5 * 1000 < wrong < toy.PLAN_SLIP * 1000  # coinciding chains make some wrong plans right


def plan_lengths(n=500):
    tokenizer = toy.make_tokenizer("plan")
    prompts, responses = [], []
    for p in toy.make_problems(n, seed=0, split="test", task="plan"):
        ids = tokenizer(p["solution"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == p["solution"]
        prompts.append(len(build_prompt(tokenizer, p["problem"])))
        responses.append(len(ids) + 1)  # + EOS
    return tokenizer, prompts, responses


def test_plan_prompts_are_short_and_responses_long():
    tokenizer, prompts, responses = plan_lengths()
    assert (min(prompts), max(prompts)) == (20, 24)  # 9 pieces and letters + the 3-4 constants (4 tokens each)
    assert (min(responses), max(responses)) == (170, 256)
    problem = toy.make_problems(1, seed=0, split="test", task="plan")[0]["problem"]
    ids = build_prompt(tokenizer, problem)
    assert tokenizer.convert_tokens_to_ids(toy.PLAN_CUES[toy.plan_of(problem)]) in ids  # the cue: one token
    assert tokenizer.unk_token_id not in [tokenizer.convert_tokens_to_ids(t) for t in toy.TASK_PIECES["plan"]]
    for plan in toy.PLAN_CUES:  # the plan, its newline included, fits in a prefix of 8 tokens
        assert len(tokenizer(f"add {plan}\n", add_special_tokens=False)["input_ids"]) <= 8


def test_plan_full_opd_costs_over_5x_a_prefix_of_16_tokens():
    import flops

    tokenizer, prompts, responses = plan_lengths(256)
    config = toy.make_model(tokenizer).config
    full = flops.opd_flops(config, config, [x + y for x, y in zip(prompts, responses)])
    for L, ratio in ((8, 9.0), (16, 7.0)):
        assert full / flops.opd_flops(config, config, [x + min(y, L) for x, y in zip(prompts, responses)]) > ratio


@pytest.fixture(scope="module")
def plan_checkpoints():
    paths = toy.task_dir("plan") / "teacher", toy.task_dir("plan") / "student"
    for path in paths:  # committed to git, so never missing in a checkout
        assert (path / "model.safetensors").exists(), f"{path} is missing: rebuild with `python toy.py --task plan`"
    return paths


def test_plan_checkpoints_tokenize_as_the_plan_tokenizer(plan_checkpoints):
    from transformers import AutoTokenizer

    problem = toy.make_problems(1, seed=0, split="test", task="plan")[0]["problem"]
    for path in plan_checkpoints:
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert tokenizer.get_vocab() == toy.make_tokenizer("plan").get_vocab()
        assert len(build_prompt(tokenizer, problem)) <= 24


def test_committed_plan_teacher_plans_right_and_student_mostly_wrong(plan_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(plan_checkpoints[0])
    problems = toy.make_problems(64, seed=123, split="test", task="plan")
    teacher, student = (AutoModelForCausalLM.from_pretrained(path).eval() for path in plan_checkpoints)
    assert toy.accuracy(teacher, tokenizer, problems, seed=0) >= 0.9
    assert toy.accuracy(student, tokenizer, problems, seed=0) <= 0.5


def test_committed_plan_student_works_whatever_plan_it_is_given(plan_checkpoints):
    """The student after the plan line: the right plan in half the prompts, a wrong one in the other
    half. Either way it works the plan it was given, so a plan of 8 tokens or less decides its answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sample import sample_hf

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(plan_checkpoints[1])
    student = AutoModelForCausalLM.from_pretrained(plan_checkpoints[1]).eval()
    problems = toy.make_problems(64, seed=123, split="test", task="plan")
    plans = []
    for i, p in enumerate(problems):
        right = toy.plan_of(p["problem"])
        wrong = [q for q in toy.PLAN_CUES if q != right]
        plans.append(right if i % 2 == 0 else wrong[i % 3])
    heads = [tokenizer(f"add {q}\n", add_special_tokens=False)["input_ids"] for q in plans]
    prompts = [build_prompt(tokenizer, p["problem"]) + h for p, h in zip(problems, heads)]
    rollouts = sample_hf(student, prompts, 1, toy.MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, seed=0)
    worked = [toy.is_correct(tokenizer.decode(r.completion_ids, skip_special_tokens=True),
                             toy.plan_solution(p["problem"], q)[1]) for r, p, q in zip(rollouts, problems, plans)]
    assert sum(worked[0::2]) >= 0.9 * 32 and sum(worked[1::2]) >= 0.9 * 32
