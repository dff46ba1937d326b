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
