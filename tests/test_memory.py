"""memory.py against reality: exact bytes of the real tensors for the static parts, measured CPU peaks
for the activation and logit estimates, and train.py --dry-run for the paper's setups."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import memory
from conftest import ROOT, tiny_qwen3, tiny_tokenizer

SHAPES = {  # scaled-down Qwen3 shapes: tied and untied, dims that do not divide by the world size
    "tiny": dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
    "mid-tied": dict(vocab_size=4099, hidden_size=384, intermediate_size=1029, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}


def build(shape):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**shape))


@pytest.mark.parametrize("name", SHAPES)
def test_parameter_shapes_are_those_of_the_transformers_model(name):
    model = build(SHAPES[name])
    assert [tuple(p.shape) for p in model.parameters()] == memory.param_shapes(memory.model_shape(SHAPES[name]))
    assert memory.num_params(memory.model_shape(SHAPES[name])) == sum(p.numel() for p in model.parameters())


def cpu_plan(shape, **kw):
    args = dict(world_size=1, fsdp=False, sampler="hf", loss="opd", rollouts_from="student", micro_batch_tokens=64,
                activation_checkpointing=False, prompt_tokens=8, L_longest=8, vllm_kv_cache_gb=None,
                gpu_memory_gb=24, on_gpu=False) | kw
    plan = memory.plan(shape, shape, **args)
    return {part: nbytes for part, _, nbytes, _ in plan.rows}


@pytest.mark.parametrize("name", SHAPES)
def test_ddp_weights_gradients_and_adamw_state_are_the_real_bytes(name):
    model = build(SHAPES[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
    optimizer.step()
    rows = cpu_plan(SHAPES[name])
    params = list(model.parameters())
    assert rows["student weights (fp32 master)"] == sum(p.nbytes for p in params)
    assert rows["gradients (fp32)"] == sum(p.grad.nbytes for p in params)
    assert rows["AdamW moments (fp32, 2x) and steps"] == sum(t.nbytes for s in optimizer.state.values()
                                                             for t in s.values())
    assert rows["teacher weights (inference)"] == sum(p.nbytes for p in params)  # fp32 on CPU


def _fsdp_worker(rank, world_size, init_file, shape, out):
    """One rank of train.py's FSDP2 layout: each decoder layer, then the root; then one AdamW step."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    model = build(shape)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (1, 8))).logits.sum().backward()
    optimizer.step()
    local = [p.to_local() for p in model.parameters()]
    state = [t.to_local() if hasattr(t, "to_local") else t for s in optimizer.state.values() for t in s.values()]
    grads = [p.grad.to_local() for p in model.parameters()]
    result = {"weights": sum(t.nbytes for t in local), "grads": sum(t.nbytes for t in grads),
              "adamw": sum(t.nbytes for t in state)}
    if rank == 0:  # rank 0 holds the largest shard (ceil of every dim 0): the per-GPU peak
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", SHAPES)
def test_fsdp2_shards_are_the_real_bytes_on_two_ranks(name, tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "rank0.json"
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init"), SHAPES[name], str(out)), nprocs=2)
    real = json.loads(out.read_text())
    rows = cpu_plan(SHAPES[name], world_size=2, fsdp=True, sampler="vllm")
    assert rows["student weights (fp32 master)"] == real["weights"]
    assert rows["gradients (fp32)"] == real["grads"]
    assert rows["AdamW moments (fp32, 2x) and steps"] == real["adamw"]


MEASURE = """
import json, sys, threading, time, torch
sys.path.insert(0, {root!r})
import memory
from loss import gkd_loss
from score import token_logprobs
from transformers import Qwen3Config, Qwen3ForCausalLM
torch.set_num_threads(1)
what, tokens, ckpt = {what!r}, {tokens}, {ckpt}
shape = {shape!r}
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
if what == "student":
    model = Qwen3ForCausalLM(Qwen3Config(**shape)).train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # gradients are counted apart
    ids = torch.randint(0, shape["vocab_size"], (2, tokens // 2))
    token_logprobs(model, ids[:, :32]).sum().backward()  # warm up: lazy allocations happen here
    step = lambda: token_logprobs(model, ids).sum().backward()
    estimate = memory.activation_bytes(memory.model_shape(shape), tokens, ckpt, on_gpu=False)
else:
    s = torch.randn(1, tokens, shape["vocab_size"], requires_grad=True)
    t = torch.randn(1, tokens, shape["vocab_size"])
    step = lambda: gkd_loss(s, t, torch.ones(1, tokens), 1, beta={beta}).backward()
    estimate = memory.gkd_logits_bytes(memory.model_shape(shape), tokens, {beta}, on_gpu=False)
peak, done = [0], [False]
def poll():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0002)
base = rss() - (0 if what == "student" else 2 * s.nbytes)  # the GKD estimate includes both logits
thread = threading.Thread(target=poll)
thread.start()
step()
done[0] = True
thread.join()
print(json.dumps({{"measured": peak[0] - base, "estimate": estimate}}))
"""

MID = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)


def measure(what, tokens, ckpt=False, beta=0.5):
    """Peak resident memory of one forward + backward above what was there before, polled every 0.2 ms in
    a fresh process. MALLOC_MMAP_THRESHOLD_ makes glibc map large blocks and unmap them when freed, so
    the resident set follows what torch holds."""
    code = MEASURE.format(root=str(ROOT), what=what, tokens=tokens, ckpt=ckpt, shape=MID, beta=beta)
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tokens, ckpt", [(1024, False), (4096, False), (1024, True), (4096, True)])
def test_activation_estimate_is_within_25_percent_of_the_measured_peak(tokens, ckpt):
    m = measure("student", tokens, ckpt)
    assert 0.75 <= m["estimate"] / m["measured"] <= 1.25, m


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_logits_estimate_is_within_25_percent_of_the_measured_peak(beta):
    m = measure("gkd", 512, beta=beta)
    assert 0.75 <= m["estimate"] / m["measured"] <= 1.25, m


def test_kv_budgeted_batch_holds_what_the_budget_allows():
    shape = memory.model_shape(SHAPES["tiny"])
    per_token = 2 * 2 * 1 * 32 * 4  # K and V x layers x kv heads x head_dim x float32
    per_row = 100 * per_token + 3 * 4 * 64 * 2
    assert memory.hf_batch_size(shape, 100, 10 * per_row, 4) == 10
    assert memory.hf_batch_size(shape, 100, 10 * per_row - 1, 4) == 9
    assert memory.hf_batch_size(shape, 100, per_row - 1, 4) == 0


def test_transformers_sampler_sizes_its_batches_from_the_kv_budget(monkeypatch):
    import sample
    tok = tiny_tokenizer()
    model = tiny_qwen3(vocab_size=len(tok))
    prompts = [sample.build_prompt(tok, f"What is {i} + {i}?") for i in range(5)]
    reference = sample.HFSampler(model, tok, batch_size=64).generate(prompts, 2, 8, seed=0)
    rows_seen = []
    decode = sample._decode
    monkeypatch.setattr(sample, "_decode", lambda m, rows, *a: rows_seen.append(len(rows)) or decode(m, rows, *a))
    longest = max(map(len, prompts)) + 8
    per_row = longest * memory.kv_bytes_per_token(memory.model_shape(model.config), 4) + 3 * 4 * len(tok) * 2
    budgeted = sample.HFSampler(model, tok, kv_cache_bytes=3 * per_row)
    rollouts = budgeted.generate(prompts, 2, 8, seed=0)
    assert rows_seen == [3, 3, 3, 1]  # 10 rollouts, 3 rows at a time
    assert [r.completion_ids for r in rollouts] == [r.completion_ids for r in reference]  # the same draws
    for r, ref in zip(rollouts, reference):
        assert r.sampler_logp == pytest.approx(ref.sampler_logp, abs=1e-5)
    with pytest.raises(ValueError, match="needs more KV cache"):
        sample.HFSampler(model, tok, kv_cache_bytes=per_row - 1).generate(prompts, 2, 8, seed=0)


def test_default_sampler_is_vllm_only_on_a_gpu_with_vllm_installed():
    from sample import default_backend
    assert default_backend(cuda=True, vllm_installed=True) == "vllm"
    assert default_backend(cuda=True, vllm_installed=False) == "hf"
    assert default_backend(cuda=False, vllm_installed=True) == "hf"
    assert default_backend(cuda=False, vllm_installed=False) == "hf"


def dry_run(*flags):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dry-run", *flags], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


@pytest.mark.parametrize("flags", [
    "--prefix 1024", "--prefix 1 --prefix-step 256", "--prefix 0", "--loss gkd --prefix 256 --samples-per-prompt 1",
    "--preset qwen3-8b --fsdp --sampler vllm --prefix 1024", "--preset qwen3-8b --fsdp --sampler vllm --prefix 0",
])
def test_dry_run_of_the_papers_setups_fits_80_gb(flags):
    rc, result, text = dry_run(*flags.split())
    assert rc == 0 and result["fits"] and result["peak_gb"] <= result["budget_gb"] == 80, text
    assert "| **peak**" in text and result["flops_total"] > result["flops_step_1"] > 0


def test_dry_run_of_the_8b_student_without_fsdp_does_not_fit_and_names_the_flag():
    rc, result, text = dry_run("--preset", "qwen3-8b", "--prefix", "1024")
    assert rc == 1 and not result["fits"] and result["fit_hint"] == "--fsdp", text
    assert result["peak_gb"] > 80


def test_dry_run_flop_is_the_app_b_count_of_the_schedule():
    from flops import opd_flops
    _, result, _ = dry_run("--prefix", "1", "--prefix-step", "256", "--steps", "3", "--prompts-per-step", "8",
                           "--samples-per-prompt", "2")
    expected = [opd_flops("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", [512 + L] * 16) for L in (1, 257, 513)]  # prompts <= 512
    assert result["flops_step_1"] == expected[0] and result["flops_total"] == sum(expected)
    hours = sum(expected) / (8 * memory.GPU_PEAK_FLOPS * memory.UTILISATION) / 3600
    assert result["hours"] == round(hours, 2)


def test_plan_phases_add_up_to_the_peak():
    plan = memory.plan("Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", world_size=8, fsdp=False, sampler="vllm", loss="opd",
                       rollouts_from="student", micro_batch_tokens=4096, activation_checkpointing=True,
                       prompt_tokens=512, L_longest=1024, vllm_kv_cache_gb=10, gpu_memory_gb=80)
    phases = [plan.phase_bytes(p) for p in ("sample", "score", "update", "push/save")]
    assert plan.peak_bytes == plan.phase_bytes("resident") + max(phases)
    assert plan.phase_bytes("resident") + sum(phases) == sum(b for _, _, b, _ in plan.rows)
    assert math.isclose(plan.peak_gb, plan.peak_bytes / 1e9)


def test_readme_memory_table_is_the_output_of_reproduce_memory_table():
    import reproduce
    assert reproduce.memory_table(sys.executable) in (ROOT / "README.md").read_text()


def test_dry_run_plans_for_the_gpus_it_is_given():
    _, eight, _ = dry_run("--prefix", "1024")
    _, two, _ = dry_run("2", "--prefix", "1024")  # --dry-run GPUS
    assert eight["gpus"] == 8 and two["gpus"] == 2 and abs(two["hours"] - 4 * eight["hours"]) < 0.05
