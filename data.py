"""
Prompts and reference responses: what the student is asked, and the dataset's own answer to it.

What it computes:
- Training examples x_i with an optional reference response y*_i (`Example`), from
  1. 'toy': toy.make_problems' train split; y* = its worked solution (clean, no slips);
  2. a local JSONL: one {"problem": ..., "response": ...} object a line, `response` optional;
  3. a Hugging Face dataset, STREAMED, first `num_questions` rows only (the paper's 60 steps of 512
     prompts see 30.7k questions of OpenThoughts3-1.2M, whose 1.2M rows with their long responses
     fill ~28 GB of parquet shards: the stream reads the shards that hold the first rows and stops).
     OpenThoughts3 rows hold `conversations`, a list of {"from", "value"} turns: x = the first
     "human" turn, y* = the "gpt" turn after it (QwQ-32B's answer). Any other dataset needs a
     `problem` column, and y* is its `response` or `solution` column when it has one.
- Off-policy rollouts from y* (`reference_rollouts`): the response's tokens cut at L_train, in the
  `sample.Rollout` layout, so SeqKD (SFT on y*, paper App. C) and off-policy GKD (lambda = 0, §5.3)
  train on them like on sampled rollouts: y* and its end-of-turn token, cut after L_train tokens.
- The lambda mix of GKD (Agarwal et al. 2024; TRL's `lmbda`), `on_policy_prompts`: each prompt's
  rollouts come from the student with probability lambda, else from y*, decided by a hash of
  (seed, step, global prompt index): the same on every rank and for every split of a batch.
- The evaluation benchmarks (MATH-500, AIME 2024/2025, GPQA-Diamond, MMLU-Pro, GSM8K) from the hub
  or from local JSONL files, as problems {id, problem, answer} (multiple choice adds `choices`, a
  list, and `answer` is then a letter). eval.py grades them (its departure 1: the MMLU-Pro subset and
  the GPQA choice order).

Departures from the paper, and choices it leaves open:
1. y* is the text that follows the prompt's `<think>\\n` (sample.build_prompt ends every prompt there):
   a leading `<think>` in the dataset's response (OpenThoughts3's start with it) is dropped, so the
   tokens the student trains on continue its prompt rather than open a second think block.
2. A reference rollout ends with the end-of-turn token (`<|im_end|>` when the vocabulary has it, else
   EOS) when it is not truncated, as a sampled rollout ends with the EOS it stopped on. Truncated means
   more than L_train tokens, that token included: a response of exactly L_train tokens loses its
   end-of-turn, as a rollout sampled with max_new_tokens = L_train would.
3. The reference rollout's sampler log-probs are NaN: the dataset does not hold the log-probs of the
   model that wrote y* (QwQ-32B). SFT uses only the tokens and GKD the student's and teacher's
   logits; the OPD estimator needs log q and must not run on them, and NaN makes any such use show.
4. The dataset's one response stands for all n samples of its prompt (n copies): the global batch
   keeps n rollouts per prompt whichever source the lambda mix picks, so the loss normalisation
   (loss.py: per sequence of the global batch) does not depend on lambda.
"""

import json
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from sample import Rollout, build_prompt, hash64
from sample import end_of_turn_id as sample_end_of_turn_id

TOY_TASKS = {"toy": "slips", "toy-slips": "slips", "toy-plan": "plan"}  # dataset/benchmark name: toy.py task
TOY_TRAIN_PROBLEMS = 20000  # toy train problems when num_questions is not given (a toy run sees a few hundred)
END_OF_TURN = "<|im_end|>"  # Qwen3's chat turn terminator: how the teacher ends an answer
THINK = "<think>"
# speaker names of ShareGPT-style `conversations` (OpenThoughts3 writes "human" and "gpt")
USER_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")


@dataclass
class Example:
    problem: str  # the question: the user turn of the chat prompt (sample.build_prompt)
    response: str | None  # the dataset's answer, as the text after the prompt's `<think>\n`; None: none given


# ----------------------------------------------------------------------------- training examples


def load_examples(name: str, *, seed: int = 0, num_questions: int | None = None) -> list[Example]:
    """The first `num_questions` examples (all when None) of a toy task (TOY_TASKS), a local JSONL or a hub dataset."""
    if num_questions is not None and num_questions < 1:
        raise ValueError(f"num_questions must be >= 1, got {num_questions}")
    if name in TOY_TASKS:
        import toy
        problems = toy.make_problems(num_questions or TOY_TRAIN_PROBLEMS, seed=seed, split="train",
                                     task=TOY_TASKS[name])
        return [Example(p["problem"], p["solution"]) for p in problems]
    path = Path(name)
    if path.suffix in (".jsonl", ".json") or path.exists():
        return load_jsonl(path, num_questions)
    return load_hub(name, num_questions)


def load_jsonl(path: Path, num_questions: int | None = None) -> list[Example]:
    """One JSON object a line with a non-empty string `problem` and an optional string `response`.
    Errors (ValueError) name the file and the line."""
    if not path.is_file():
        raise ValueError(f"dataset file {path} does not exist")
    examples = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if num_questions is not None and len(examples) == num_questions:
                break  # the rest of the file is never read
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no} is not valid JSON ({e.msg})")
            if not isinstance(row, dict) or not isinstance(row.get("problem"), str) or not row["problem"].strip():
                raise ValueError(f"{path} line {line_no} has no non-empty string field 'problem'")
            response = row.get("response")
            if response is not None and not isinstance(response, str):
                raise ValueError(f"{path} line {line_no} has a 'response' that is not a string")
            examples.append(Example(row["problem"], after_think(response)))
    if not examples:
        raise ValueError(f"{path} holds no problems")
    return examples


def load_hub(name: str, num_questions: int | None = None) -> list[Example]:
    """The first `num_questions` rows of a hub dataset's train split, streamed: only the shards that
    hold them are opened. Rows with `conversations` (OpenThoughts3) or with a `problem` column."""
    from datasets import load_dataset  # only the hub path needs it

    rows = load_dataset(name, split="train", streaming=True)  # an IterableDataset: rows arrive as read
    examples = [hub_example(row, name, i) for i, row in enumerate(islice(rows, num_questions))]
    if not examples:
        raise ValueError(f"dataset {name} has no rows in its train split")
    return examples


def hub_example(row: dict, name: str, index: int) -> Example:
    if "conversations" in row:
        return conversation_example(row["conversations"], name, index)
    if "problem" in row:
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise ValueError(f"dataset {name} row {index} has no non-empty string 'problem'")
        response = row.get("response", row.get("solution"))
        return Example(row["problem"], after_think(response if isinstance(response, str) else None))
    raise ValueError(f"dataset {name} row {index} has neither a 'problem' nor a 'conversations' column "
                     f"(columns: {sorted(row)})")


def conversation_example(turns: list[dict], name: str, index: int) -> Example:
    """ShareGPT turns: the first user turn is the problem, the assistant turn after it the response."""
    first = next((i for i, turn in enumerate(turns) if turn["from"] in USER_ROLES), None)
    if first is None or not turns[first]["value"].strip():
        raise ValueError(f"dataset {name} row {index} has no question (no non-empty 'human' turn)")
    response = next((turn["value"] for turn in turns[first + 1:] if turn["from"] in ASSISTANT_ROLES), None)
    return Example(turns[first]["value"], after_think(response))


def after_think(response: str | None) -> str | None:
    """The response without a leading `<think>` and its newline: the prompt already ends there (departure 1)."""
    if response is None or not response.lstrip().startswith(THINK):
        return response
    rest = response.lstrip()[len(THINK):]
    return rest[1:] if rest.startswith("\n") else rest


# ----------------------------------------------------------------------------- reference rollouts


def training_prompts(examples: list[Example], tokenizer, max_context: int, max_new_tokens: int,
                     prompts_per_step: int, with_responses: bool = False, name: str = "the dataset"):
    """(prompt ids, reference response ids or None, prompts skipped): the chat prompts (sample.build_prompt)
    that leave room for max_new_tokens in the model's context; the others are never sampled, and
    counted. ValueError, one line, with fewer than a step's prompts or, with_responses, a problem
    without a reference response."""
    prompts = [build_prompt(tokenizer, e.problem) for e in examples]
    fits = [len(p) + max_new_tokens <= max_context for p in prompts]
    examples, prompts = [e for e, ok in zip(examples, fits) if ok], [p for p, ok in zip(prompts, fits) if ok]
    if len(prompts) < prompts_per_step:
        raise ValueError(f"{len(prompts)} usable prompts, fewer than --prompts-per-step {prompts_per_step}")
    responses = [response_ids(tokenizer, e.response) for e in examples] if with_responses else None
    if responses is not None and None in responses:
        raise ValueError(f"--rollouts-from dataset needs a reference response for every problem; {name} has none "
                         f"for problem {responses.index(None)}")
    return prompts, responses, fits.count(False)


def step_prompts(n_prompts: int, prompts_per_step: int, seed: int, step: int) -> list[int]:
    """Global prompt indices of a step: epochs of a seeded permutation, the same on every rank."""
    epoch, k = divmod(step, n_prompts // prompts_per_step)
    order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
    return order[k * prompts_per_step:(k + 1) * prompts_per_step].tolist()


def end_of_turn_id(tokenizer) -> int:
    """The token a whole reference response ends with: the chat template's end of turn, as a sampled
    response stops there (sample.end_of_turn_id), else EOS."""
    end = sample_end_of_turn_id(tokenizer)
    return tokenizer.eos_token_id if end is None else end


def response_ids(tokenizer, response: str | None) -> list[int] | None:
    """Token ids of a reference response, without special tokens and without its end (added later)."""
    return None if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]


def reference_rollouts(prompts: list[list[int]], responses: list[list[int] | None], n: int, L_train: int,
                       end_id: int, prompt_indices: list[int]) -> list[Rollout]:
    """What sampler.generate returns, from the dataset: n copies (prompt-major, departure 4) of each
    response's first L_train tokens, followed by `end_id` when the whole response fits."""
    if len(prompts) != len(responses) or len(prompts) != len(prompt_indices):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses, {len(prompt_indices)} indices")
    if L_train < 1:
        raise ValueError(f"L_train must be >= 1, got {L_train}")
    rollouts = []
    for prompt, ids, index in zip(prompts, responses, prompt_indices):
        if ids is None:
            raise ValueError(f"prompt {index} has no reference response to train on")
        completion = ids + [end_id]  # the full response ends its turn
        truncated = len(completion) > L_train
        completion = completion[:L_train]
        for _ in range(n):
            rollouts.append(Rollout(prompt_ids=list(prompt), completion_ids=list(completion),
                                    sampler_logp=[float("nan")] * len(completion),  # unknown q (departure 3)
                                    truncated=truncated, prompt_index=index))
    return rollouts


# ----------------------------------------------------------------------------- the lambda mix


def on_policy_prompts(prompt_indices: list[int], lmbda: float, seed: int, step: int) -> list[bool]:
    """Per prompt: True = the student samples its rollouts (probability lmbda), False = the dataset's.

    A uniform u from sha256 of (seed, step, global prompt index) decides, u < lmbda: the same answer
    on every rank, whichever rank holds the prompt; lmbda = 0 is all False, lmbda = 1 all True."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lambda (the on-policy fraction) must be in [0, 1], got {lmbda}")
    picks = []
    for index in prompt_indices:
        u = hash64("lmbda", seed, step, index) / 2**64  # in [0, 1)
        picks.append(u < lmbda)
    return picks


# ----------------------------------------------------------------------------- evaluation benchmarks

# name -> (hub dataset, config, split)
HUB_BENCHMARKS = {"math500": ("HuggingFaceH4/MATH-500", None, "test"),
                  "aime24": ("HuggingFaceH4/aime_2024", None, "train"),
                  "aime25": ("yentinglin/aime_2025", None, "train"),
                  "gpqa": ("Idavidrein/gpqa", "gpqa_diamond", "train"),  # gated: accept its terms, set HF_TOKEN
                  "mmlu_pro": ("TIGER-Lab/MMLU-Pro", None, "test"),
                  "gsm8k": ("openai/gsm8k", "main", "test")}
LOCAL_FILES = {"math500": "math500.jsonl", "aime24": "aime24.jsonl", "aime25": "aime25.jsonl",
               "gpqa": "gpqa_diamond.jsonl", "mmlu_pro": "mmlu_pro.jsonl", "gsm8k": "gsm8k_test.jsonl"}
MMLU_PRO_N, MMLU_PRO_SEED = 500, 0


def gpqa_problem(row: dict) -> dict:
    """A GPQA row (correct answer stored first) as a problem with its choices shuffled by question id."""
    options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
    order = list(range(4))
    random.Random(f"gpqa/{row['Record ID']}").shuffle(order)  # str seeds are hashed with sha512: stable across runs
    return {"id": row["Record ID"], "problem": row["Question"].strip(),
            "choices": [options[i].strip() for i in order], "answer": "ABCD"[order.index(0)]}


def mmlu_pro_sample(problems: list[dict]) -> list[dict]:
    """The fixed 500-question subset of MMLU-Pro's test split (eval.py departure 1), in dataset order."""
    if len(problems) <= MMLU_PRO_N:
        return problems
    keep = sorted(random.Random(MMLU_PRO_SEED).sample(range(len(problems)), MMLU_PRO_N))
    return [problems[i] for i in keep]


def load_benchmark_hub(name: str) -> list[dict]:
    """The benchmark from the Hugging Face hub (needs network and the `datasets` package)."""
    from datasets import load_dataset  # only the online path needs it

    if name not in HUB_BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(HUB_BENCHMARKS)}")
    path, config, split = HUB_BENCHMARKS[name]
    rows = load_dataset(path, config, split=split)
    if name == "math500":
        return [{"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"]} for r in rows]
    if name in ("aime24", "aime25"):
        return [{"id": str(r.get("id", i)), "problem": r["problem"], "answer": str(r["answer"])}
                for i, r in enumerate(rows)]
    if name == "gpqa":
        return [gpqa_problem(r) for r in rows]
    if name == "mmlu_pro":
        return mmlu_pro_sample([{"id": str(r["question_id"]), "problem": r["question"],
                                 "choices": list(r["options"]), "answer": r["answer"]} for r in rows])
    # gsm8k: the gold answer follows "####"; thousands separators dropped
    return [{"id": f"gsm8k-test-{i}", "problem": r["question"],
             "answer": r["answer"].split("####")[-1].strip().replace(",", "")} for i, r in enumerate(rows)]


def load_benchmark_local(name: str, data_dir: Path) -> list[dict]:
    """The benchmark from DATA_DIR/NAME.jsonl (or its LOCAL_FILES name): fields id, problem, answer[, choices]."""
    candidates = [data_dir / LOCAL_FILES.get(name, f"{name}.jsonl"), data_dir / f"{name}.jsonl"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"no {name} data in {data_dir}: looked for {', '.join(p.name for p in candidates)}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    problems = [{key: r[key] for key in ("id", "problem", "answer", "choices") if key in r} for r in rows]
    for p in problems:
        p["id"], p["answer"] = str(p["id"]), str(p["answer"])
    return mmlu_pro_sample(problems) if name == "mmlu_pro" else problems
