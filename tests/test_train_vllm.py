"""train.py with the vLLM sampler under torchrun: 2 CPU ranks (gloo), one vLLM engine per rank.

Runs in the environment built by .ci/vllm_env.sh:
    .venv-vllm/bin/python -m pytest -q tests/test_train_vllm.py
The same tiny run is trained twice, once with the transformers sampler and once with vLLM (engine
start ~15 s per rank on 2 cores); the tests read their metrics. Then the toy preset runs two steps
of 256 rollouts with vLLM, on one rank and on two: sizes at which vLLM's scheduler would split
prompts (sample.scheduler_kwargs).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

try:
    import vllm  # noqa: F401
except Exception:  # ImportError, or a broken torch/torchvision pairing that fails at import
    pytest.skip("vllm is not importable in this environment", allow_module_level=True)

from conftest import ROOT, write_tiny_run

# VLLM_CPU_KVCACHE_SPACE: GiB of KV cache per engine; by default each of the two claims most of the RAM.
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
STEPS = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny student and a teacher it can learn from in a few steps (same vocabulary), 40 problems.

    Both models get one shared vector added to every token embedding, so their last hidden state
    carries a component that does not depend on the context. The teacher's output rows of the ten
    digits are pushed along that component: whatever the context, it puts ~99% of its mass on
    digits, and the reverse KL of a random student starts near 3 nats. The student lowers it by
    moving its own digit rows the same way, a direction every sampled token agrees on, so the
    trend shows through the sampling noise of 16 rollouts a step."""
    def shift(name, model, tok):
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.1)
            if name == "teacher":
                model.lm_head.weight[tok.convert_tokens_to_ids(list("0123456789"))] += 0.1  # +~6 nats each

    return write_tiny_run(tmp_path_factory.mktemp("models"), edit=shift)


def train(models, out, sampler, *extra):
    """torchrun --standalone --nproc_per_node=2 train.py --sampler SAMPLER ... -> (metrics rows, process, out)."""
    flags = ["--student", models / "student", "--teacher", models / "teacher", "--dataset", models / "data.jsonl",
             "--prefix", 8, "--prefix-step", 4, "--max-new-tokens", 24,  # L_train 8, 12, 16, 20, 24, 24
             "--prompts-per-step", 8, "--samples-per-prompt", 2, "--lr", 1e-2, "--steps", STEPS,
             "--micro-batch-tokens", 2000, "--kl-bin", 8, "--save-every", STEPS, "--out", out,
             "--sampler", sampler, *extra]
    if sampler == "vllm":
        flags += ["--vllm-kv-cache-gb", 1]  # the push is checked every step
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(launcher + [str(ROOT / "train.py")] + [str(f) for f in flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"train.py --sampler {sampler} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc, out


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    runs = {sampler: train(models, out / sampler, sampler) for sampler in ("hf", "vllm")}
    runs["vllm_fsdp"] = train(models, out / "vllm_fsdp", "vllm", "--fsdp")
    return runs


def test_vllm_run_under_torchrun_trains_checkpoints_and_exits_cleanly(runs):
    rows, proc, out = runs["vllm"]  # exit code 0 is checked in train()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(not r["skipped"] and r["rollouts"] == 16 and r["response_tokens"] > 0 for r in rows)
    # The engines tear down before the process group they joined (VLLMSampler.close): no error at exit.
    assert "Invalid process group" not in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoints" / f"step_{STEPS:06d}" / "meta.json").exists()
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def test_every_weight_push_reaches_the_engine(runs):
    rows, _, _ = runs["vllm"]
    # After each push, vLLM's prompt log-probs of a fixed sequence equal the updated student's (float32).
    assert all(r["push_logp_max_diff"] is not None and r["push_logp_max_diff"] < 1e-4 for r in rows), \
        [r["push_logp_max_diff"] for r in rows]
    # And the rollouts are on-policy: the trainer's pi_theta equals the engine's q on every sampled token.
    assert all(abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_max"] < 1 + 1e-3 for r in rows)


def test_fsdp_streams_its_sharded_weights_into_the_engine(runs):
    """Under FSDP2 no rank holds the whole student: each push gathers one tensor at a time and streams it
    into the engine (train.student_weights). The engine must still score exactly as the trainer."""
    rows, proc, out = runs["vllm_fsdp"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["push_logp_max_diff"] < 1e-4 for r in rows), [r["push_logp_max_diff"] for r in rows]
    assert all(abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_max"] < 1 + 1e-3 for r in rows)
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / f"step_{STEPS:06d}" / "trainer").is_dir()  # sharded trainer state (DCP)


def test_no_rollout_is_longer_than_L_train(runs):
    for sampler in ("hf", "vllm"):
        rows, _, _ = runs[sampler]
        assert [r["L_train"] for r in rows] == [8, 12, 16, 20, 24, 24]
        assert all(r["response_tokens"] <= r["rollouts"] * r["L_train"] for r in rows)


def test_loss_falls_as_with_the_transformers_sampler(runs):
    # The two samplers draw different random numbers, so the values differ; the trend must not.
    # "loss" sums over the tokens of a sequence and L_train grows, so compare it per response token
    # (with on-policy ratios of 1 and gamma 0 that is the sampled reverse KL again, by Eq. 1).
    def fall(rows, key):  # mean of the first two steps over the mean of the last two
        return (rows[0][key] + rows[1][key]) / (rows[-2][key] + rows[-1][key])

    hf, vllm_rows = runs["hf"][0], runs["vllm"][0]
    for r in hf + vllm_rows:
        r["loss_per_token"] = r["loss"] * r["rollouts"] / r["response_tokens"]
    for key in ("reverse_kl", "loss_per_token"):
        assert fall(hf, key) > 1.5 and fall(vllm_rows, key) > 1.5, (key, fall(hf, key), fall(vllm_rows, key))
        assert 0.5 < fall(vllm_rows, key) / fall(hf, key) < 2, (key, fall(hf, key), fall(vllm_rows, key))


# ----------------------------------------------------------------------------- 256 rollouts a step
# The toy preset with 64 prompts x 4 samples of ~100 prompt tokens: 25,600 prompt tokens a step, far
# more than the 4096 that vLLM's CPU build schedules at once (12,800 per rank on two ranks).
TOY_STEPS = 2


def train_toy(out, ranks):
    """python train.py (ranks = 1) or torchrun --nproc_per_node=RANKS train.py -> (metrics rows, out)."""
    flags = ["--sampler", "vllm", "--vllm-kv-cache-gb", 1, "--prompts-per-step", 64,
             "--steps", TOY_STEPS, "--eval-problems", 0, "--out", out]
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    proc = subprocess.run(launcher + [str(ROOT / "train.py")] + [str(f) for f in flags], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"train.py on {ranks} rank(s) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], out


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_runs")
    return {ranks: train_toy(out / f"ranks_{ranks}", ranks) for ranks in (1, 2)}


def test_256_rollouts_a_step_on_one_and_two_ranks_stay_on_policy(toy_runs):
    for ranks, (rows, out) in toy_runs.items():
        assert [r["step"] for r in rows] == list(range(1, TOY_STEPS + 1))
        assert all(r["rollouts"] == 256 and not r["skipped"] for r in rows)
        # the engine's q is the trainer's pi on every sampled token, and every push landed
        assert all(abs(r["ratio_mean"] - 1) < 1e-4 and r["ratio_max"] < 1 + 1e-3 for r in rows)
        assert all(r["push_logp_max_diff"] < 1e-4 for r in rows)
        assert json.loads((out / "summary.json").read_text())["world_size"] == ranks


def test_two_ranks_draw_the_rollouts_of_one(toy_runs):
    # Rollouts are seeded per prompt, not per rank (sample.py): the two runs sample the same tokens,
    # so their losses agree up to the order of float sums (DDP averages two halves of the batch).
    one, two = toy_runs[1][0], toy_runs[2][0]
    for a, b in zip(one, two):
        assert (a["response_tokens"], a["truncated"]) == (b["response_tokens"], b["truncated"])
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
