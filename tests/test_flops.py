"""flops.py against hand counts, a parameter count of the real model, and torch's FLOP counter."""

from fractions import Fraction

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config, Qwen3Config, Qwen3ForCausalLM

import flops

torch.set_num_threads(1)

# Model cards (huggingface.co/Qwen/Qwen3-*): total and non-embedding parameters, in billions, with
# the precision the card prints. Independent of the shapes in flops.QWEN3_SHAPES.
MODEL_CARDS = {
    "Qwen/Qwen3-0.6B": ("0.6", "0.44"),
    "Qwen/Qwen3-1.7B": ("1.7", "1.4"),
    "Qwen/Qwen3-4B": ("4.0", "3.6"),
    "Qwen/Qwen3-8B": ("8.2", "6.95"),
    "Qwen/Qwen3-14B": ("14.8", "13.2"),
    "Qwen/Qwen3-32B": ("32.8", "31.2"),
}


def meta_model(shape):
    with torch.device("meta"):  # shapes only, no memory
        return Qwen3ForCausalLM(Qwen3Config(**shape))


@pytest.mark.parametrize("name", MODEL_CARDS)
def test_shapes_reproduce_model_card_parameter_counts(name):
    model = meta_model(flops.QWEN3_SHAPES[name])
    total = sum(p.numel() for p in model.parameters())  # a tied matrix is listed once
    embedding_matrices = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    non_embedding = total - len(embedding_matrices) * model.model.embed_tokens.weight.numel()
    card_total, card_non_embedding = MODEL_CARDS[name]
    for count, card in ((total, card_total), (non_embedding, card_non_embedding)):
        decimals = len(card.split(".")[1])
        assert round(count / 1e9, decimals) == float(card), (name, count, card)
    if name != "Qwen/Qwen3-32B":
        assert flops.QWEN3_SHAPES[name + "-Base"] == flops.QWEN3_SHAPES[name]


@pytest.mark.parametrize("name", ["Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B"])
def test_dense_params_is_every_matmul_weight_plus_the_tied_double_count(name):
    shape = flops.QWEN3_SHAPES[name]
    model = meta_model(shape)
    params = list(model.parameters())
    matrices = sum(p.numel() for p in params if p.ndim == 2)  # linears and the embedding
    tied_again = shape["hidden_size"] * shape["vocab_size"] if shape["tie_word_embeddings"] else 0
    assert flops.dense_params(shape) == matrices + tied_again
    # what VERL leaves out: two RMSNorms and q_norm/k_norm per layer, and the final norm
    h, d, L = shape["hidden_size"], shape["head_dim"], shape["num_hidden_layers"]
    assert sum(p.numel() for p in params if p.ndim == 1) == L * (2 * h + 2 * d) + h


# Per-token cost worked by hand from the architecture, written out here rather than read from
# flops.QWEN3_SHAPES: (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, N_dense).
#   1.7B: 28 * (3*2048*6144 + 2048*(2048 + 1024 + 1024 + 2048)) + 2*151936*2048
#       = 28 * (37_748_736 + 12_582_912) + 622_329_856 = 2_031_616_000
#   8B:   36 * (3*4096*12288 + 4096*(4096 + 1024 + 1024 + 4096)) + 2*151936*4096
#       = 36 * (150_994_944 + 41_943_040) + 1_244_659_712 = 8_190_427_136
BY_HAND = {
    "Qwen/Qwen3-1.7B": (2048, 6144, 28, 16, 8, 128, 151936, 2_031_616_000),
    "Qwen/Qwen3-8B": (4096, 12288, 36, 32, 8, 128, 151936, 8_190_427_136),
}


@pytest.mark.parametrize("name", BY_HAND)
def test_per_token_cost_by_hand(name):
    h, I, L, H, KV, d, V, N_dense = BY_HAND[name]
    per_layer = (h * H * d          # q_proj
                 + 2 * h * KV * d   # k_proj, v_proj
                 + H * d * h        # o_proj
                 + 3 * h * I)       # gate_proj, up_proj, down_proj
    assert L * per_layer + 2 * V * h == N_dense
    assert flops.dense_params(name) == N_dense
    for s in (1, 200, 4096):  # one sequence: 6 N s + 12 s^2 d H L
        assert flops.train_flops(name, [s]) == 6 * N_dense * s + 12 * s * s * d * H * L
        assert flops.forward_flops(name, [s]) == 2 * N_dense * s + 4 * s * s * d * H * L


def test_train_flops_is_torch_flop_count_plus_the_embedding_gather():
    # A tiny Qwen3 with GQA and head_dim != hidden / heads, eager attention (it materialises the
    # full s x s scores, as VERL counts). torch counts every matmul, forward and backward; VERL in
    # addition counts the embedding lookup as a V x h matmul: 6 V h FLOP per token.
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=24, vocab_size=128, tie_word_embeddings=True)
    config = Qwen3Config(**shape)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    seqlens = [7, 13]
    with FlopCounterMode(display=False) as counter:
        for s in seqlens:  # one sequence per pass: no padding in the count
            ids = torch.randint(0, shape["vocab_size"], (1, s))
            model(ids, labels=ids).loss.backward()
    embedding_gather = 6 * shape["vocab_size"] * shape["hidden_size"] * sum(seqlens)
    assert flops.train_flops(config, seqlens) == counter.get_total_flops() + embedding_gather


def test_attention_term_is_quadratic_per_sequence():
    name = "Qwen/Qwen3-8B"
    shape = flops.QWEN3_SHAPES[name]
    d, H, L = shape["head_dim"], shape["num_attention_heads"], shape["num_hidden_layers"]
    F = lambda seqlens: flops.train_flops(name, seqlens)  # noqa: E731
    for s in (1, 300, 8192):
        # the linear term cancels; 12 ((2s)^2 - 2 s^2) d H L is left
        assert F([2 * s]) - 2 * F([s]) == 24 * s * s * d * H * L
        # two sequences of s are not one of 2s: attention does not cross sequences
        assert F([s, s]) == 2 * F([s])
    assert F([100, 3000, 7]) == F([100]) + F([3000]) + F([7])


def test_forward_is_exactly_a_third_of_train():
    for name in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-14B"):
        for seqlens in ([1], [5, 17, 4096], [0, 1000]):
            assert 3 * flops.forward_flops(name, seqlens) == flops.train_flops(name, seqlens)


def test_opd_flops_is_the_appendix_b_sum():
    student, teacher = "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B"
    seqlens = [456, 1224, 16584]
    F_train_S = Fraction(flops.train_flops(student, seqlens))
    F_train_T = Fraction(flops.train_flops(teacher, seqlens))
    # F_train(S) + 2 F_fwd(S) + F_fwd(T), with F_fwd = F_train / 3
    F_OPD = flops.opd_flops(student, teacher, seqlens)
    assert F_OPD == F_train_S + 2 * F_train_S / 3 + F_train_T / 3
    # with the student as its own teacher: 1 + 2/3 + 1/3 = 2 updates' worth
    assert flops.opd_flops(student, student, seqlens) == 2 * F_train_S
    # a prefix rollout costs less than the full one it was cut from
    prefix, full = (flops.opd_flops(student, teacher, [200 + L]) for L in (256, 4096))
    assert prefix < full


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B", "Qwen/Qwen3-32B"])
def test_dict_name_and_config_agree(name):
    # the sizes whose head_dim (128) differs from hidden / heads, so the field must be read
    shape = flops.QWEN3_SHAPES[name]
    assert shape["head_dim"] != shape["hidden_size"] // shape["num_attention_heads"]
    seqlens = [300, 2000]
    expected = flops.train_flops(shape, seqlens)
    assert flops.train_flops(Qwen3Config(**shape), seqlens) == expected
    assert flops.train_flops(name, seqlens) == expected
    without_tie = {k: v for k, v in shape.items() if k != "tie_word_embeddings"}
    assert flops.train_flops(without_tie, seqlens) == expected  # tying does not enter VERL's count


def test_head_dim_defaults_to_hidden_over_heads():
    shape = dict(flops.QWEN3_SHAPES["Qwen/Qwen3-4B"])
    del shape["head_dim"], shape["tie_word_embeddings"]
    as_if_80 = dict(shape, head_dim=2560 // 32)
    assert flops.dense_params(shape) == flops.dense_params(as_if_80)
    assert flops.dense_params(dict(shape, head_dim=None)) == flops.dense_params(as_if_80)
    qwen2 = Qwen2Config(**shape)  # Qwen2Config has no head_dim attribute
    assert not hasattr(qwen2, "head_dim")
    assert flops.train_flops(qwen2, [1000]) == flops.train_flops(as_if_80, [1000])


def test_config_for(tmp_path):
    shape = flops.config_for("Qwen/Qwen3-8B-Base")
    assert shape == flops.QWEN3_SHAPES["Qwen/Qwen3-8B"]
    shape["hidden_size"] = 1  # a copy: the table is not changed
    assert flops.QWEN3_SHAPES["Qwen/Qwen3-8B"]["hidden_size"] == 4096
    config = Qwen3Config(**flops.QWEN3_SHAPES["Qwen/Qwen3-1.7B"])
    assert flops.config_for(config) is config
    config.save_pretrained(tmp_path)  # an unknown name goes through AutoConfig (offline: a path)
    loaded = flops.config_for(str(tmp_path))
    assert isinstance(loaded, Qwen3Config)
    assert flops.train_flops(loaded, [500]) == flops.train_flops("Qwen/Qwen3-1.7B", [500])


@pytest.mark.parametrize("seqlens, message", [
    ([], "empty"),
    ([100, -1], ">= 0"),
    ([10.5], "integer"),
    (100, "integer"),
])
def test_bad_seqlens_raise(seqlens, message):
    with pytest.raises(ValueError, match=message):
        flops.train_flops("Qwen/Qwen3-1.7B", seqlens)
    with pytest.raises(ValueError, match=message):
        flops.opd_flops("Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", seqlens)


def test_bad_config_raises():
    shape = dict(flops.QWEN3_SHAPES["Qwen/Qwen3-1.7B"])
    del shape["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        flops.train_flops(shape, [10])
    with pytest.raises(ValueError, match="dense"):
        flops.train_flops(dict(flops.QWEN3_SHAPES["Qwen/Qwen3-1.7B"], num_experts=128), [10])


def test_seqlens_from_tensors():
    lengths = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).sum(-1)  # attention_mask row sums
    name = "Qwen/Qwen3-1.7B"
    assert flops.train_flops(name, lengths) == flops.train_flops(name, [3, 4])


def test_cli_prints_one_row_per_L_train(capsys):
    flops.main(["--L_train", "256", "16384", "--full_len", "16384"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["256", "16384"]
    assert float(rows[0][3].rstrip("x")) > 1.0
    assert rows[1][3] == "1.0x"  # at L_train = full length prefix OPD is full OPD


# ----------------------------------------------------------------------------- per objective

S, T = "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B"
SEQLENS = [456, 1200, 16584]
# (loss, rollouts from) -> who runs what: (student forwards, teacher forwards) besides the update
PASSES = {
    ("opd", "student"): (2, 1),  # sample, old log-probs (App. B); teacher_logp
    ("gkd", "student"): (1, 1),  # sample; teacher logits
    ("gkd", "teacher"): (0, 2),  # teacher samples, teacher logits
    ("gkd", "dataset"): (0, 1),  # teacher logits
    ("sft", "student"): (1, 0),  # sample
    ("sft", "teacher"): (0, 1),  # SeqKD: teacher samples
    ("sft", "dataset"): (0, 0),  # nothing sampled
}


@pytest.mark.parametrize("loss, rollouts_from", PASSES)
def test_step_flops_counts_each_objective_passes(loss, rollouts_from):
    student_fwd, teacher_fwd = PASSES[loss, rollouts_from]
    want = (flops.train_flops(S, SEQLENS) + student_fwd * flops.forward_flops(S, SEQLENS)
            + teacher_fwd * flops.forward_flops(T, SEQLENS))
    assert flops.step_flops(S, T, SEQLENS, loss=loss, rollouts_from=rollouts_from) == want
    if (loss, rollouts_from) == ("opd", "student"):
        assert want == flops.opd_flops(S, T, SEQLENS)  # the default is Appendix B's formula
        assert flops.step_flops(S, T, SEQLENS) == want


def test_step_flops_by_hand_on_a_tiny_config():
    student = dict(hidden_size=4, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=2, vocab_size=10)
    teacher = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=4, vocab_size=10)
    # N_dense(S) = 1 * (3*4*6 + 4*(4 + 2 + 2 + 4)) + 2*10*4 = 72 + 48 + 80 = 200
    # N_dense(T) = 2 * (3*8*16 + 8*(8 + 8 + 8 + 8)) + 2*10*8 = 2 * (384 + 256) + 160 = 1440
    # seqlens [3, 5]: sum s = 8, sum s^2 = 34
    # F_train(S) = 6*200*8 + 12*34*2*2*1 = 9600 + 1632 = 11232,    F_fwd(S) = 3744
    # F_train(T) = 6*1440*8 + 12*34*4*2*2 = 69120 + 6528 = 75648,  F_fwd(T) = 25216
    by_hand = {("opd", "student"): 11232 + 2 * 3744 + 25216,  # 43936
               ("gkd", "student"): 11232 + 3744 + 25216,  # 40192
               ("gkd", "teacher"): 11232 + 2 * 25216,  # 61664
               ("gkd", "dataset"): 11232 + 25216,  # 36448
               ("sft", "student"): 11232 + 3744,  # 14976
               ("sft", "teacher"): 11232 + 25216,  # 36448
               ("sft", "dataset"): 11232}
    assert flops.dense_params(student) == 200 and flops.dense_params(teacher) == 1440
    for (loss, rollouts_from), want in by_hand.items():
        got = flops.step_flops(student, teacher, [3, 5], loss=loss, rollouts_from=rollouts_from)
        assert got == want and isinstance(got, int), (loss, rollouts_from, got, want)
    assert by_hand["opd", "student"] == 43936 and by_hand["gkd", "teacher"] == 61664


def test_step_flops_needs_the_teacher_only_where_it_runs():
    assert flops.step_flops(S, None, SEQLENS, loss="sft", rollouts_from="dataset") == flops.train_flops(S, SEQLENS)
    assert flops.step_flops(S, None, SEQLENS, loss="sft", rollouts_from="student") \
        == flops.train_flops(S, SEQLENS) + flops.forward_flops(S, SEQLENS)
    for loss, rollouts_from in [("gkd", "dataset"), ("sft", "teacher"), ("gkd", "student")]:
        with pytest.raises(ValueError, match="runs the teacher"):
            flops.step_flops(S, None, SEQLENS, loss=loss, rollouts_from=rollouts_from)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="opd", rollouts_from="teacher"), "student's own rollouts"),
    (dict(loss="opd", rollouts_from="dataset"), "student's own rollouts"),
    (dict(loss="ppo"), "loss must be one of"),
    (dict(rollouts_from="web"), "rollouts_from must be one of"),
])
def test_step_flops_refuses_what_has_no_count(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flops.step_flops(S, T, SEQLENS, **kwargs)


def test_peak_flops_matches_the_longest_name_and_knows_no_cpu():
    from flops import peak_flops
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops(None) is None and peak_flops("cpu") is None and peak_flops("NVIDIA T4") is None
