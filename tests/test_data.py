"""data.py: the hub loaders on fixture files in each dataset's real schema, read through the same
`datasets` calls as on the hub; local JSONL errors; reference rollouts cut at L_train; the lambda mix.

How the hub path runs offline: `route_hub` replaces datasets.load_dataset by a function that
receives the loader's call unchanged (hub name, config, split=, streaming=) and answers it with the
real datasets.load_dataset on local files: the parquet / CSV / JSON builder the hub itself uses for
that dataset, `data_files={split: files}` so that a wrong split fails, and every other keyword
passed on as the loader gave it. So the streamed path really streams (an IterableDataset reading
the parquet shards lazily), and the test sees the arguments the hub would have seen.
"""

import json
import math
import types

import datasets
import pytest
from datasets import Dataset, Features, List, Value

import toy
from data import (END_OF_TURN, HUB_BENCHMARKS, TOY_TRAIN_PROBLEMS, Example, end_of_turn_id, gpqa_problem,
                  load_benchmark_hub, load_examples, load_jsonl, mmlu_pro_sample, on_policy_prompts,
                  reference_rollouts, response_ids)
from sample import build_prompt

OPENTHOUGHTS3 = "open-thoughts/OpenThoughts3-1.2M"
REAL_LOAD_DATASET = datasets.load_dataset


def route_hub(monkeypatch, tmp_path, routes: dict, rows_read: list | None = None) -> list:
    """routes: (hub name, config) -> (builder, split, files). Returns the list of calls the loader made;
    a streamed dataset appends one item to `rows_read` for each row the loader takes from it."""
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append({"path": path, "name": name, **kwargs})
        builder, split, files = routes[(path, name)]
        rows = REAL_LOAD_DATASET(builder, data_files={split: [str(f) for f in files]},
                                 cache_dir=str(tmp_path / "hf_cache"), **kwargs)
        if rows_read is not None:  # IterableDataset.map runs lazily, once per row produced
            rows = rows.map(lambda row: rows_read.append(1) or row)
        return rows

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)  # data.py imports it at call time
    return calls


# ----------------------------------------------------------------------------- OpenThoughts3, streamed

# OpenThoughts3-1.2M's schema, from the dataset_info of the cards of its subsets on the hub
# (DedeProGames/OpenThoughts3-20k, xszheng2020/OpenThoughts3-1.2M-8k): difficulty int64, source
# string, domain string, conversations: list of {from: string, value: string}. The turns are
# "human" then "gpt", and the gpt turn opens with "<think>" (code that reads the dataset, e.g. the
# tinker cookbook's openthoughts_row_to_datum). The hub stores it as parquet shards data/train-*.
OT3_FEATURES = Features({"difficulty": Value("int64"), "source": Value("string"), "domain": Value("string"),
                         "conversations": List({"from": Value("string"), "value": Value("string")})})


def ot3_row(i):
    return {"difficulty": i % 10, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
            "conversations": [{"from": "human", "value": f"Question {i}: what is {i} + {i}?"},
                              {"from": "gpt", "value": f"<think>\nOkay, {i} + {i}.\n</think>\n\n\\boxed{{{2 * i}}}"}]}


def write_ot3_shards(tmp_path, rows_per_shard=4, good_shards=2):
    """good_shards parquet shards, then one shard that is not parquet at all: reading it fails."""
    shards = []
    for s in range(good_shards):
        rows = [ot3_row(s * rows_per_shard + i) for i in range(rows_per_shard)]
        path = tmp_path / f"train-{s:05d}-of-{good_shards + 1:05d}.parquet"
        Dataset.from_list(rows, features=OT3_FEATURES).to_parquet(str(path))
        shards.append(path)
    broken = tmp_path / f"train-{good_shards:05d}-of-{good_shards + 1:05d}.parquet"
    broken.write_bytes(b"the rest of the 1.2M rows, never to be read")
    return shards + [broken]


@pytest.mark.parametrize("num_questions", [1, 6, 8])
def test_openthoughts3_streams_only_the_first_num_questions_rows(monkeypatch, tmp_path, num_questions):
    shards = write_ot3_shards(tmp_path)
    rows_read = []
    calls = route_hub(monkeypatch, tmp_path, {(OPENTHOUGHTS3, None): ("parquet", "train", shards)}, rows_read)
    examples = load_examples(OPENTHOUGHTS3, num_questions=num_questions)
    assert calls == [{"path": OPENTHOUGHTS3, "name": None, "split": "train", "streaming": True}]
    assert len(examples) == num_questions and len(rows_read) == num_questions
    for i, e in enumerate(examples):
        assert e.problem == f"Question {i}: what is {i} + {i}?"
        assert e.response == f"Okay, {i} + {i}.\n</think>\n\n\\boxed{{{2 * i}}}"  # after the prompt's <think>\n
    # The broken last shard was never opened: a stream that reaches it fails there.
    whole = REAL_LOAD_DATASET("parquet", data_files={"train": [str(f) for f in shards]}, split="train", streaming=True)
    with pytest.raises(Exception, match="Parquet magic bytes not found"):
        list(whole)


def test_openthoughts3_rows_without_a_question_are_named(monkeypatch, tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    bad = {**ot3_row(0), "conversations": [{"from": "gpt", "value": "an answer to nothing"}]}
    Dataset.from_list([ot3_row(0), bad], features=OT3_FEATURES).to_parquet(str(path))
    route_hub(monkeypatch, tmp_path, {(OPENTHOUGHTS3, None): ("parquet", "train", [path])})
    assert len(load_examples(OPENTHOUGHTS3, num_questions=1)) == 1  # row 1 not read: no error
    with pytest.raises(ValueError, match="row 1 has no question"):
        load_examples(OPENTHOUGHTS3, num_questions=2)


def test_a_hub_dataset_with_a_problem_column_streams_its_problems_and_solutions(monkeypatch, tmp_path):
    """A generic dataset (JSON lines, e.g. a NuminaMath-style `problem`, `solution`): all rows when
    num_questions is None; a row without the response column has no response."""
    path = tmp_path / "train.jsonl"
    rows = [{"problem": f"P{i}", "solution": f"S{i}"} for i in range(5)] + [{"problem": "P5", "solution": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = route_hub(monkeypatch, tmp_path, {("someone/maths", None): ("json", "train", [path])})
    examples = load_examples("someone/maths")
    assert calls[0]["streaming"] is True
    assert examples == [Example(f"P{i}", f"S{i}") for i in range(5)] + [Example("P5", None)]


def test_a_hub_dataset_without_known_columns_is_refused(monkeypatch, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    route_hub(monkeypatch, tmp_path, {("someone/text", None): ("json", "train", [path])})
    with pytest.raises(ValueError, match="neither a 'problem' nor a 'conversations' column.*'text'"):
        load_examples("someone/text")
    path.write_text(json.dumps({"problem": "P0"}) + "\n" + json.dumps({"problem": " "}) + "\n")
    with pytest.raises(ValueError, match="row 1 has no non-empty string 'problem'"):
        load_examples("someone/text")


# ----------------------------------------------------------------------------- toy and local JSONL


def test_toy_examples_are_the_train_problems_with_their_worked_solutions():
    examples = load_examples("toy", seed=3, num_questions=40)
    problems = toy.make_problems(40, seed=3, split="train")
    assert [(e.problem, e.response) for e in examples] == [(p["problem"], p["solution"]) for p in problems]
    assert all(e.response.endswith(f"\\boxed{{{p['answer']}}}") for e, p in zip(examples, problems))
    assert len(load_examples("toy")) == TOY_TRAIN_PROBLEMS


def write_lines(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_local_jsonl_problems_and_optional_responses(tmp_path):
    path = write_lines(tmp_path, [json.dumps({"problem": "1+1?", "response": "<think>\nTwo.\n</think>\n\\boxed{2}"}),
                                  "", json.dumps({"problem": "2+2?", "id": 7})])
    assert load_examples(str(path)) == [Example("1+1?", "Two.\n</think>\n\\boxed{2}"), Example("2+2?", None)]


@pytest.mark.parametrize("lines, message", [
    (['{"problem": "ok"}', '{"problem": '], "line 2 is not valid JSON"),
    (['{"problem": "ok"}', '{"problem": "ok"}', '{"question": "x"}'], "line 3 has no non-empty string field 'problem'"),
    (['{"problem": "   "}'], "line 1 has no non-empty string field 'problem'"),
    (['["problem"]'], "line 1 has no non-empty string field 'problem'"),
    (['{"problem": "ok", "response": 3}'], "line 1 has a 'response' that is not a string"),
    (["", "  "], "holds no problems"),
])
def test_local_jsonl_errors_name_the_file_and_line(tmp_path, lines, message):
    path = write_lines(tmp_path, lines)
    with pytest.raises(ValueError, match=f"{path} {message}" if "line" in message else message):
        load_jsonl(path)


def test_local_jsonl_stops_reading_at_num_questions_and_missing_files_are_named(tmp_path):
    path = write_lines(tmp_path, ['{"problem": "a"}', '{"problem": "b"}', "not json at all"])
    assert [e.problem for e in load_examples(str(path), num_questions=2)] == ["a", "b"]
    with pytest.raises(ValueError, match="line 3"):
        load_examples(str(path), num_questions=3)
    with pytest.raises(ValueError, match="missing.jsonl does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="num_questions"):
        load_examples("toy", num_questions=0)


# ----------------------------------------------------------------------------- reference rollouts


def test_reference_rollouts_are_cut_at_exactly_L_train_and_end_their_turn_when_whole(tokenizer):
    response = "Two plus two is four.\n\\boxed{4}"
    ids = response_ids(tokenizer, response)
    end = end_of_turn_id(tokenizer)
    assert end == tokenizer.convert_tokens_to_ids(END_OF_TURN) and len(ids) == len(response)  # one token a char
    prompt = build_prompt(tokenizer, "2+2?")
    for L in range(1, len(ids) + 4):
        out = reference_rollouts([prompt, prompt[:5]], [ids, ids[:3]], 3, L, end, [10, 11])
        assert [r.prompt_index for r in out] == [10, 10, 10, 11, 11, 11]  # prompt-major, n copies
        for r, full in zip(out, [ids] * 3 + [ids[:3]] * 3):
            assert r.truncated == (len(full) + 1 > L)  # the whole response and its end do not fit
            assert len(r.completion_ids) == (L if r.truncated else len(full) + 1)
            assert r.completion_ids == (full + [end])[:L]
            assert (r.completion_ids[-1] == end) == (not r.truncated)
            assert len(r.sampler_logp) == len(r.completion_ids) and all(math.isnan(x) for x in r.sampler_logp)
        assert tokenizer.decode(out[0].completion_ids, skip_special_tokens=True) == response[:L]


def test_toy_reference_rollouts_are_exactly_the_toys_sft_rows():
    """Uncut, a toy reference rollout is prompt + solution + EOS: what toy.sft_batch trains on."""
    tok = toy.make_tokenizer()
    examples = load_examples("toy", num_questions=8)
    prompts = [build_prompt(tok, e.problem) for e in examples]
    out = reference_rollouts(prompts, [response_ids(tok, e.response) for e in examples], 1, toy.MAX_NEW_TOKENS,
                             end_of_turn_id(tok), list(range(8)))
    input_ids, attention_mask, labels = toy.sft_batch(tok, [{"problem": e.problem, "solution": e.response}
                                                            for e in examples])
    for b, r in enumerate(out):
        n = int(attention_mask[b].sum())
        assert r.prompt_ids + r.completion_ids == input_ids[b, :n].tolist() and not r.truncated
        assert r.completion_ids == labels[b, len(r.prompt_ids):n].tolist()  # the tokens SFT trains on


def test_end_of_turn_falls_back_to_eos_and_missing_responses_are_refused():
    plain = types.SimpleNamespace(get_vocab=lambda: {"a": 0, "</s>": 1}, eos_token_id=1, chat_template=None)
    assert end_of_turn_id(plain) == 1
    assert response_ids(plain, None) is None
    with pytest.raises(ValueError, match="prompt 5 has no reference response"):
        reference_rollouts([[1, 2]], [None], 1, 8, 1, [5])


# ----------------------------------------------------------------------------- the lambda mix


@pytest.mark.parametrize("lmbda", [0.1, 0.5, 0.9])
def test_on_policy_fraction_is_lambda_within_a_few_standard_errors(lmbda):
    n = 20_000
    picks = on_policy_prompts(range(n), lmbda, seed=0, step=3)
    standard_error = math.sqrt(lmbda * (1 - lmbda) / n)
    assert abs(sum(picks) / n - lmbda) < 4 * standard_error
    # a fresh draw every step and seed: two steps agree on about lmbda^2 + (1 - lmbda)^2 of the prompts
    other = on_policy_prompts(range(n), lmbda, seed=0, step=4)
    agree = lmbda ** 2 + (1 - lmbda) ** 2
    assert abs(sum(a == b for a, b in zip(picks, other)) / n - agree) < 4 * math.sqrt(agree * (1 - agree) / n)
    assert on_policy_prompts(range(n), lmbda, seed=1, step=3) != picks


def test_lambda_zero_and_one_are_pure_and_invalid_lambdas_are_refused():
    assert on_policy_prompts(range(1000), 0.0, seed=0, step=0) == [False] * 1000
    assert on_policy_prompts(range(1000), 1.0, seed=0, step=0) == [True] * 1000
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lambda"):
            on_policy_prompts([0], bad, seed=0, step=0)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_lambda_mix_is_the_same_whatever_the_rank_split(world_size):
    global_ids = list(range(100, 164))  # one step's global prompt indices
    whole = dict(zip(global_ids, on_policy_prompts(global_ids, 0.5, seed=7, step=2)))
    for rank in range(world_size):
        mine = global_ids[rank::world_size]
        assert on_policy_prompts(mine, 0.5, seed=7, step=2) == [whole[i] for i in mine]
    assert 0 < sum(whole.values()) < len(whole)


# ----------------------------------------------------------------------------- evaluation benchmarks
# Each fixture holds the columns and types of the dataset on the hub, from its card's dataset_info:
#   MATH-500 (HuggingFaceH4/MATH-500, test): problem, solution, answer, subject (string), level (int64),
#     unique_id (string);
#   AIME 2024 (HuggingFaceH4/aime_2024, train): id (int64), problem, solution, answer, url, year (string);
#   AIME 2025 (yentinglin/aime_2025, train): problem and answer (string), the columns code that loads it
#     reads; the card's full schema was not checked, so the fixture has no `id` and the loader numbers rows;
#   GPQA-Diamond (Idavidrein/gpqa, config gpqa_diamond, train): a CSV file with the columns below;
#   MMLU-Pro (TIGER-Lab/MMLU-Pro, test): question_id (int64), question (string), options (list of
#     string), answer (string, a letter), answer_index (int64), cot_content, category, src (string);
#   GSM8K (openai/gsm8k, config main, test): question, answer (string, the gold after "####").

GPQA_COLUMNS = ["Pre-Revision Question", "Pre-Revision Correct Answer", "Pre-Revision Incorrect Answer 1",
                "Pre-Revision Incorrect Answer 2", "Pre-Revision Incorrect Answer 3", "Pre-Revision Explanation",
                "Self-reported question-writing time (minutes)", "Question", "Correct Answer",
                "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3", "Explanation",
                "Revision Comments (from Question Writer)", "Subdomain", "Writer's Difficulty Estimate",
                "Extra Revised Question", "Extra Revised Explanation", "Extra Revised Correct Answer",
                "Extra Revised Incorrect Answer 1", "Extra Revised Incorrect Answer 2",
                "Extra Revised Incorrect Answer 3", "Non-Expert Validator Accuracy",
                "Majority Non-Expert Vals Incorrect", "Expert Validator Accuracy", "Record ID", "High-level domain"]


def write_parquet(path, rows, features):
    Dataset.from_list(rows, features=Features(features)).to_parquet(str(path))
    return path


def benchmark_fixtures(tmp_path):
    s, i64 = Value("string"), Value("int64")
    math500 = [{"problem": f"Compute ${k}+\\frac12$.", "solution": "…", "answer": f"{k}\\frac{{1}}{{2}}",
                "subject": "Algebra", "level": 1 + k % 5, "unique_id": f"test/algebra/{k}.json"} for k in range(3)]
    aime24 = [{"id": 60 + k, "problem": f"Find N{k}.", "solution": "…", "answer": f"{k:03d}",
               "url": "https://artofproblemsolving.com/", "year": "2024"} for k in range(3)]
    aime25 = [{"problem": f"Find M{k}.", "answer": str(100 + k)} for k in range(2)]
    mmlu = [{"question_id": 70 + k, "question": f"Which {k}?", "options": [f"opt{j}" for j in range(3 + k)],
             "answer": "ABCDEFGHIJ"[k], "answer_index": k, "cot_content": "", "category": "law", "src": "ori_mmlu-law"}
            for k in range(3)]
    gsm8k = [{"question": "Janet has 1,000 ducks and buys 125 more. How many?",
              "answer": "1000 + 125 = <<1000+125=1125>>1125\n#### 1,125"},
             {"question": "Tom has 3 apples and eats 1. How many left?", "answer": "3 - 1 = 2\n#### 2"}]
    gpqa_rows = [{c: "" for c in GPQA_COLUMNS} | {
        "Question": f" What, in a line,\nis gas {k}? ", "Correct Answer": f"right {k}", "Incorrect Answer 1": "w1",
        "Incorrect Answer 2": "w2, with a comma", "Incorrect Answer 3": '"w3"', "Record ID": f"rec{k}",
        "Self-reported question-writing time (minutes)": 12.0} for k in range(4)]
    gpqa = tmp_path / "gpqa_diamond.csv"
    Dataset.from_list(gpqa_rows).to_csv(str(gpqa), index=False)  # quoted fields: commas, newlines, quotes
    routes = {
        ("HuggingFaceH4/MATH-500", None): ("parquet", "test", [write_parquet(tmp_path / "math500.parquet", math500, {
            "problem": s, "solution": s, "answer": s, "subject": s, "level": i64, "unique_id": s})]),
        ("HuggingFaceH4/aime_2024", None): ("parquet", "train", [write_parquet(tmp_path / "aime24.parquet", aime24, {
            "id": i64, "problem": s, "solution": s, "answer": s, "url": s, "year": s})]),
        ("yentinglin/aime_2025", None): ("parquet", "train", [write_parquet(tmp_path / "aime25.parquet", aime25, {
            "problem": s, "answer": s})]),
        ("Idavidrein/gpqa", "gpqa_diamond"): ("csv", "train", [gpqa]),
        ("TIGER-Lab/MMLU-Pro", None): ("parquet", "test", [write_parquet(tmp_path / "mmlu_pro.parquet", mmlu, {
            "question_id": i64, "question": s, "options": List(s), "answer": s, "answer_index": i64,
            "cot_content": s, "category": s, "src": s})]),
        ("openai/gsm8k", "main"): ("parquet", "test", [write_parquet(tmp_path / "gsm8k.parquet", gsm8k, {
            "question": s, "answer": s})]),
    }
    return routes, {"math500": math500, "aime24": aime24, "aime25": aime25, "gpqa": gpqa_rows, "mmlu_pro": mmlu,
                    "gsm8k": gsm8k}


def test_benchmark_hub_loaders_on_fixtures_in_the_hub_schema(monkeypatch, tmp_path):
    routes, rows = benchmark_fixtures(tmp_path)
    calls = route_hub(monkeypatch, tmp_path, routes)
    got = {name: load_benchmark_hub(name) for name in HUB_BENCHMARKS}
    assert [(c["path"], c["name"], c["split"], c.get("streaming")) for c in calls] == \
        [(path, config, split, None) for path, config, split in HUB_BENCHMARKS.values()]  # whole, not streamed
    assert got["math500"] == [{"id": r["unique_id"], "problem": r["problem"], "answer": r["answer"]}
                              for r in rows["math500"]]
    assert got["aime24"] == [{"id": str(r["id"]), "problem": r["problem"], "answer": r["answer"]}
                             for r in rows["aime24"]]
    assert got["aime24"][0]["answer"] == "000"  # a string column: leading zeros kept
    assert got["aime25"] == [{"id": str(k), "problem": r["problem"], "answer": r["answer"]}
                             for k, r in enumerate(rows["aime25"])]
    for r, p in zip(rows["gpqa"], got["gpqa"]):  # read back from CSV: commas, newlines and quotes intact
        assert p["id"] == r["Record ID"] and p["problem"] == r["Question"].strip()
        options = [r["Correct Answer"], r["Incorrect Answer 1"], r["Incorrect Answer 2"], r["Incorrect Answer 3"]]
        assert sorted(p["choices"]) == sorted(options)
        assert p["choices"]["ABCD".index(p["answer"])] == r["Correct Answer"]
    assert got["mmlu_pro"] == [{"id": str(r["question_id"]), "problem": r["question"], "choices": r["options"],
                                "answer": r["answer"]} for r in rows["mmlu_pro"]]
    assert [p["answer"] for p in got["gsm8k"]] == ["1125", "2"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark_hub("toy")


def test_eval_reads_hub_benchmarks_through_data(monkeypatch, tmp_path):
    from eval import load_benchmark

    routes, rows = benchmark_fixtures(tmp_path)
    route_hub(monkeypatch, tmp_path, routes)
    assert [p["problem"] for p in load_benchmark("math500", limit=2)] == [r["problem"] for r in rows["math500"][:2]]


def test_gpqa_choices_shuffled_by_question_and_answer_letter_follows():
    rows = [{"Record ID": f"rec{i}", "Question": f" Q{i}? ", "Correct Answer": f"right{i}",
             "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(200)]
    problems = [gpqa_problem(r) for r in rows]
    for r, p in zip(rows, problems):
        assert sorted(p["choices"]) == sorted([r["Correct Answer"], "w1", "w2", "w3"])
        assert p["choices"]["ABCD".index(p["answer"])] == r["Correct Answer"]
        assert p == gpqa_problem(r) and p["problem"] == r["Question"].strip()
    counts = {letter: sum(p["answer"] == letter for p in problems) for letter in "ABCD"}
    assert all(25 <= c <= 75 for c in counts.values()), counts  # about 50 each, not always A


def test_mmlu_pro_sample_is_fixed():
    problems = [{"id": str(i)} for i in range(12_000)]
    a, b = mmlu_pro_sample(problems), mmlu_pro_sample(list(problems))
    assert a == b and len(a) == 500 and len({p["id"] for p in a}) == 500
    assert [int(p["id"]) for p in a] == sorted(int(p["id"]) for p in a)  # dataset order kept
