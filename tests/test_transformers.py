"""Transformers of papers 002 and 003: sizes, masks, both residual rules, and curvature.

References, all independent of the modules' code: parameter counts written out from the
layers' shapes; a float64 forward pass written here from the pre-LN and post-LN formulas
(explicit softmax attention, LayerNorm from mean and variance, the tanh GELU and the
sinusoids from their definitions); the float64 dense Hessian of that hand-written loss
(``torch.autograd.functional.hessian``, ``eigvalsh``); and a float64 central difference of
gradients through the default (fused) attention kernel.

Hessian-vector products by double backward run under
``sdpa_kernel(SDPBackend.MATH)``: the fused CPU kernel has no double backward
(:func:`test_double_backward_needs_the_math_kernel`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import n_params
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_eos.models.transformer import (
    CharTransformerLM,
    EncoderDecoderTransformer,
    MultiHeadAttention,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- parameter counts


def char_lm_count(V, d=128, H=8, k=32, L=6, T=64, d_ff=None, pre=True):
    d_ff = 4 * d if d_ff is None else d_ff
    embeddings = V * d + T * d  # tokens + learned positions
    attention = 3 * (d * H * k + H * k) + (H * k * d + d)  # q, k, v: d -> Hk; out: Hk -> d
    mlp = (d * d_ff + d_ff) + (d_ff * d + d)
    layer_norms = 2 * (2 * d)  # scale and offset, before/after each of the two sub-layers
    final_norm = 2 * d if pre else 0
    logits = d * V + V  # untied, with bias
    return embeddings + L * (attention + mlp + layer_norms) + final_norm + logits


def seq2seq_count(Vs, Vt, d=512, d_ff=2048, Le=6, Ld=6, pre=True, shared=False):
    attention = 4 * (d * d + d)  # q, k, v, out: d -> d with bias (H * d/H = d)
    ffn = (d * d_ff + d_ff) + (d_ff * d + d)
    ln = 2 * d
    encoder_layer = attention + ffn + 2 * ln
    decoder_layer = 2 * attention + ffn + 3 * ln  # self- and cross-attention
    embeddings = Vs * d if shared else Vs * d + Vt * d + d * Vt  # output matrix, no bias
    final_norms = 2 * ln if pre else 0
    return embeddings + Le * encoder_layer + Ld * decoder_layer + final_norms


# (id, build, formula, exact count pinned as a regression)
COUNTS = [
    ("char-65-pre", lambda: CharTransformerLM(65), char_lm_count(65), 1_610_305),
    (
        "char-65-post",
        lambda: CharTransformerLM(65, norm="post"),
        char_lm_count(65, pre=False),
        1_610_049,
    ),
    ("char-128-haiku-ascii", lambda: CharTransformerLM(128), char_lm_count(128), 1_626_496),
    (
        "char-small",
        lambda: CharTransformerLM(7, 8, 2, 3, 2, 5, 12),
        char_lm_count(7, 8, 2, 3, 2, 5, 12),
        None,
    ),
    (
        "wmt-37k-shared-pre",
        lambda: EncoderDecoderTransformer(37000, 37000, share_embeddings=True),
        seq2seq_count(37000, 37000, shared=True),
        63_084_544,
    ),
    (
        "wmt-37k-shared-post",
        lambda: EncoderDecoderTransformer(37000, 37000, norm="post", share_embeddings=True),
        seq2seq_count(37000, 37000, shared=True, pre=False),
        63_082_496,
    ),
    (
        "wmt-37k-unshared",
        lambda: EncoderDecoderTransformer(37000, 37000),
        seq2seq_count(37000, 37000),
        100_972_544,
    ),
    (
        "wmt-8k-shared",
        lambda: EncoderDecoderTransformer(8000, 8000, share_embeddings=True),
        seq2seq_count(8000, 8000, shared=True),
        48_236_544,
    ),
    (
        "wmt-8k-unshared",
        lambda: EncoderDecoderTransformer(8000, 8000),
        seq2seq_count(8000, 8000),
        56_428_544,
    ),
    (
        "seq2seq-small-asym",
        lambda: EncoderDecoderTransformer(11, 13, 16, 4, 24, 2, 3, "post"),
        seq2seq_count(11, 13, 16, 24, 2, 3, pre=False),
        None,
    ),
]


@pytest.mark.parametrize(
    ("build", "formula", "exact"), [c[1:] for c in COUNTS], ids=[c[0] for c in COUNTS]
)
def test_parameter_count(build, formula, exact):
    with torch.device("meta"):  # sizes only: no memory, no initialization cost
        count = n_params(build())
    assert count == formula
    if exact is not None:
        assert count == exact


def test_transformer_base_is_vaswani_size():
    """Vaswani et al. (2017), Table 3: base has 65M parameters (shared 37k BPE vocabulary)."""
    assert abs(seq2seq_count(37000, 37000, shared=True) - 65e6) <= 0.03 * 65e6


def test_char_lm_attention_shapes_are_paper_003():
    """Paper 003, §3.1: 8 heads of key size 32 on "model size" 128, i.e. 128 -> 256 -> 128."""
    with torch.device("meta"):
        model = CharTransformerLM(65)
    assert len(model.layers) == 6 and model.positions.shape == (64, 128)
    attn = model.layers[0].self_attn
    for proj in (attn.query, attn.key, attn.value):
        assert proj.weight.shape == (256, 128)
    assert attn.out.weight.shape == (128, 256)
    assert model.layers[0].ff.fc1.weight.shape == (512, 128)


# ---------------------------------------------------------------- hand-written reference


def ref_layer_norm(x: Tensor, p: dict[str, Tensor], name: str, eps: float = 1e-5) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def ref_linear(x: Tensor, p: dict[str, Tensor], name: str) -> Tensor:
    y = x @ p[f"{name}.weight"].T
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def ref_attention(x, memory, p, name, H, keep):
    """softmax(q k^T / sqrt(k) masked) v per head; ``keep`` broadcasts to (B, T, S)."""
    B, T, _ = x.shape
    S = memory.shape[1]
    q = ref_linear(x, p, f"{name}.query").reshape(B, T, H, -1)
    k = ref_linear(memory, p, f"{name}.key").reshape(B, S, H, -1)
    v = ref_linear(memory, p, f"{name}.value").reshape(B, S, H, -1)
    scores = torch.einsum("bthe,bshe->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None], float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    heads = torch.einsum("bhts,bshe->bthe", weights, v).reshape(B, T, -1)
    return ref_linear(heads, p, f"{name}.out")


def ref_gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_sublayer(x, p, ln_name, branch, pre):
    if pre:
        return x + branch(ref_layer_norm(x, p, ln_name))
    return ref_layer_norm(x + branch(x), p, ln_name)


def attend(p, name, H, keep, memory=None):
    def branch(z):
        return ref_attention(z, z if memory is None else memory, p, name, H, keep)

    return branch


def feed_forward(p, pfx, activation):
    def branch(z):
        return ref_linear(activation(ref_linear(z, p, f"{pfx}.ff.fc1")), p, f"{pfx}.ff.fc2")

    return branch


def num_layers(p, stack):
    return len({n.split(".")[1] for n in p if n.startswith(f"{stack}.")})


def ref_char_lm(p, x, H, pre):
    T = x.shape[1]
    h = p["embed.weight"][x] + p["positions"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    for i in range(num_layers(p, "layers")):
        pfx = f"layers.{i}"
        h = ref_sublayer(h, p, f"{pfx}.norm1", attend(p, f"{pfx}.self_attn", H, causal), pre)
        h = ref_sublayer(h, p, f"{pfx}.norm2", feed_forward(p, pfx, ref_gelu_tanh), pre)
    if pre:
        h = ref_layer_norm(h, p, "final_norm")
    return ref_linear(h, p, "output")


def ref_sinusoids(T: int, d: int) -> Tensor:
    def pe(t, j):
        return (
            math.sin(t / 10000 ** (j / d)) if j % 2 == 0 else math.cos(t / 10000 ** ((j - 1) / d))
        )

    return torch.tensor([[pe(t, j) for j in range(d)] for t in range(T)], dtype=torch.float64)


def ref_seq2seq(p, src, tgt_in, H, pre, pad_id=0):
    src_table = p["src_embed.weight"]
    tgt_table = p.get("tgt_embed.weight", src_table)  # shared: one matrix
    d = src_table.shape[1]
    S, T = src.shape[1], tgt_in.shape[1]

    x = src_table[src] * math.sqrt(d) + ref_sinusoids(S, d)
    keep = (src != pad_id)[:, None, :]  # keys that are not padding, for every query
    for i in range(num_layers(p, "encoder")):
        pfx = f"encoder.{i}"
        x = ref_sublayer(x, p, f"{pfx}.norm1", attend(p, f"{pfx}.self_attn", H, keep), pre)
        x = ref_sublayer(x, p, f"{pfx}.norm2", feed_forward(p, pfx, torch.relu), pre)
    memory = ref_layer_norm(x, p, "encoder_norm") if pre else x

    y = tgt_table[tgt_in] * math.sqrt(d) + ref_sinusoids(T, d)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    for i in range(num_layers(p, "decoder")):
        pfx = f"decoder.{i}"
        cross = attend(p, f"{pfx}.cross_attn", H, keep, memory)
        y = ref_sublayer(y, p, f"{pfx}.norm1", attend(p, f"{pfx}.self_attn", H, causal), pre)
        y = ref_sublayer(y, p, f"{pfx}.norm2", cross, pre)
        y = ref_sublayer(y, p, f"{pfx}.norm3", feed_forward(p, pfx, torch.relu), pre)
    if pre:
        y = ref_layer_norm(y, p, "decoder_norm")
    return y @ (p["output.weight"] if "output.weight" in p else tgt_table).T


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval, and every parameter moved off its init (zero biases, unit LN scales)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(0.3 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return model


def tiny_char_lm(norm="pre", num_layers=1, d_ff=12, key_size=3):
    torch.manual_seed(0)  # key_size * heads = 6 != d_model = 8
    return CharTransformerLM(7, 8, 2, key_size, num_layers, 6, d_ff, norm=norm)


def tiny_seq2seq(norm="pre", shared=False, d_ff=12, layers=1):
    torch.manual_seed(0)
    vocab_tgt = 7 if shared else 9
    return EncoderDecoderTransformer(
        7, vocab_tgt, 8, 2, d_ff, layers, layers, norm, 0.1, 16, 0, shared
    )


def src_and_tgt(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, 7, (3, 6), generator=g)
    src[0, 4:] = 0  # padding at the end
    src[1, 2] = 0  # and in the middle
    tgt_in = torch.randint(1, 7, (3, 5), generator=g)
    return src, tgt_in


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_char_lm_matches_hand_written_formulas(norm, num_layers):
    model = perturbed(tiny_char_lm(norm, num_layers))
    x = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))  # T < seq_len
    p = dict(model.named_parameters())
    torch.testing.assert_close(
        model(x), ref_char_lm(p, x, 2, norm == "pre"), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_seq2seq_matches_hand_written_formulas(norm, shared):
    model = perturbed(tiny_seq2seq(norm, shared, layers=2))
    src, tgt_in = src_and_tgt()
    p = dict(model.named_parameters())
    assert ("tgt_embed.weight" in p) != shared and ("output.weight" in p) != shared
    expected = ref_seq2seq(p, src, tgt_in, 2, norm == "pre")
    torch.testing.assert_close(model(src, tgt_in), expected, rtol=1e-12, atol=1e-12)


def test_pre_and_post_ln_differ():
    """Same weights, other rule: the two references (and models) disagree, so both are tested."""
    pre = perturbed(tiny_char_lm("pre"))
    post = tiny_char_lm("post").double().eval()
    post.load_state_dict(pre.state_dict(), strict=False)  # post has no final_norm
    x = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(1))
    assert (pre(x) - post(x)).abs().max() > 1e-2


# ---------------------------------------------------------------- masks


def test_char_lm_is_causal():
    model = perturbed(CharTransformerLM(65, seq_len=16))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (2, 16), generator=g)
    logits = model(x)
    for t in (0, 5, 14):
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, 65, (2, 15 - t), generator=g)
        changed = model(y)
        torch.testing.assert_close(changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        assert (changed[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-3


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_is_causal_and_reads_the_source(norm):
    model = perturbed(tiny_seq2seq(norm, layers=2))
    src, tgt_in = src_and_tgt()
    logits = model(src, tgt_in)
    for t in (0, 2):
        changed_tgt = tgt_in.clone()
        changed_tgt[:, t + 1 :] = (changed_tgt[:, t + 1 :] + 1 + t) % 9
        changed = model(src, changed_tgt)
        torch.testing.assert_close(changed[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-12)
        assert (changed[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-3
    # every target position sees the source (column 0 is never padding)
    other_src = src.clone()
    other_src[:, 0] = src[:, 0] % 6 + 1
    assert ((model(other_src, tgt_in) - logits).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_appending_source_padding_leaves_logits_unchanged(norm):
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(20, 20, 32, 4, 64, 2, 2, norm, max_len=32).eval()
    g = torch.Generator().manual_seed(0)
    src = torch.randint(1, 20, (3, 7), generator=g)
    src[0, 5:] = 0
    src[2, 3] = 0
    tgt_in = torch.randint(1, 20, (3, 6), generator=g)
    padded = F.pad(src, (0, 9), value=0)
    logits = model(src, tgt_in)
    # float32: summing over more (masked, zero-weight) keys changes only the rounding
    torch.testing.assert_close(model(padded, tgt_in), logits, rtol=0, atol=5e-6)
    # float64: equal to rounding
    exact = model.double()(src, tgt_in)
    torch.testing.assert_close(model(padded, tgt_in), exact, rtol=0, atol=1e-12)
    # sensitivity: a real token appended instead does change the logits
    assert (model(F.pad(src, (0, 1), value=5), tgt_in) - exact).abs().max() > 1e-3
    # and the pad id matters: the same tokens with another pad_id are attended to
    model.pad_id = 19
    assert (model(padded, tgt_in) - exact).abs().max() > 1e-3


def test_all_padding_source_is_finite_under_every_kernel():
    model = perturbed(tiny_seq2seq("pre"))
    src, tgt_in = src_and_tgt()
    src[1] = 0
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            logits = model(src, tgt_in)
            assert torch.isfinite(logits).all()
            F.cross_entropy(logits.flatten(0, 1), tgt_in.flatten()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.zero_grad()


def test_multi_head_attention_padding_and_causal_together():
    """Both masks at once: the mask is their conjunction (reference: explicit softmax)."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, 2, 3).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[False, False, True, False, True], [False] * 5])
    keep = ~padding[:, None, :] & torch.ones(5, 5, dtype=torch.bool).tril()
    expected = ref_attention(x, x, dict(attn.named_parameters(prefix="a")), "a", 2, keep)
    out = attn(x, key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- dropout, init, errors


@pytest.mark.parametrize(
    "build",
    [
        lambda p: CharTransformerLM(7, 8, 2, 3, 2, 6, 12, dropout=p),
        lambda p: EncoderDecoderTransformer(7, 9, 8, 2, 12, 1, 1, dropout=p),
    ],
    ids=["char", "seq2seq"],
)
def test_dropout_lives_in_dropout_modules(build):
    """eval() (or p = 0) removes all randomness: none hides inside the attention kernel."""
    torch.manual_seed(0)
    noisy = build(0.5)
    torch.manual_seed(0)
    clean = build(0.0)
    src, tgt_in = src_and_tgt()
    args = (tgt_in,) if isinstance(noisy, CharTransformerLM) else (src, tgt_in)
    assert not torch.equal(noisy.train()(*args), noisy(*args))
    torch.testing.assert_close(noisy.eval()(*args), clean.train()(*args), rtol=0, atol=0)
    for m in clean.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    torch.manual_seed(1)
    a = clean(*args)
    torch.manual_seed(1)
    assert torch.equal(a, noisy.train()(*args))


def test_char_lm_init_is_haiku():
    """Haiku: embeddings TruncatedNormal(0.02); layers VarianceScaling(2/L); output 1/sqrt(d)."""
    torch.manual_seed(0)
    model = CharTransformerLM(65)
    cut = 0.87962566103423978  # std of a standard normal cut at +-2
    assert model.embed.weight.abs().max() <= 0.04
    assert abs(model.embed.weight.std().item() / (0.02 * cut) - 1) < 0.05
    for layer in model.layers:
        for lin in (layer.self_attn.query, layer.self_attn.out, layer.ff.fc1, layer.ff.fc2):
            std = math.sqrt(2 / 6 / lin.in_features)  # fan_in
            assert abs(lin.weight.std().item() / std - 1) < 0.05
            assert lin.weight.abs().max() <= 2 * std / cut + 1e-7
            assert lin.bias.abs().max() == 0
    assert abs(model.output.weight.std().item() / (128**-0.5 * cut) - 1) < 0.05
    assert model.output.bias.abs().max() == 0


def test_seq2seq_init_is_xavier():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(1000, 1000, share_embeddings=True, num_encoder_layers=1)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound
            assert abs(m.weight.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
            assert m.bias.abs().max() == 0
    assert abs(model.src_embed.weight.std().item() * math.sqrt(512) - 1) < 0.02
    assert model.tgt_embed.weight is model.src_embed.weight


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: EncoderDecoderTransformer(10, 12, share_embeddings=True), "share_embeddings"),
        (lambda: EncoderDecoderTransformer(10, 10, d_model=30, num_heads=4), "multiple"),
        (lambda: CharTransformerLM(10, norm="sandwich"), "'pre'"),
        (lambda: EncoderDecoderTransformer(10, 10, norm="middle"), "'post'"),
        (lambda: CharTransformerLM(10, seq_len=4)(torch.zeros(1, 5, dtype=torch.long)), "seq_len"),
        (
            lambda: EncoderDecoderTransformer(10, 10, 8, 2, 8, 1, 1, max_len=4)(
                torch.ones(1, 5, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
            ),
            "max_len",
        ),
    ],
    ids=["share-vocab", "heads", "char-norm", "seq2seq-norm", "seq-len", "max-len"],
)
def test_errors_name_the_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# ---------------------------------------------------------------- Hessian-vector products


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hvp(model: nn.Module, loss_fn, v: Tensor) -> Tensor:
    """Double backward, in the math attention kernel; ``v`` of shape (n,), or (k, n) batched."""
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(model), params, create_graph=True)
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        if v.dim() == 1:
            hv = torch.autograd.grad(flat_grad @ v, params)
            return torch.cat([h.reshape(-1) for h in hv])
        hv = torch.autograd.grad(flat_grad, params, grad_outputs=v, is_grads_batched=True)
    return torch.cat([h.reshape(len(v), -1) for h in hv], dim=1)


def unflatten(model: nn.Module, flat: Tensor) -> dict[str, Tensor]:
    out, i = {}, 0
    for name, prm in model.named_parameters():
        out[name] = flat[i : i + prm.numel()].view_as(prm)
        i += prm.numel()
    return out


# Dense float64 Hessians, so at most 600 parameters. The character LM is d_model 8, 2 heads
# of key size 4, one layer, vocabulary 7 (571 parameters); the encoder-decoder at d_model 8
# has 1184, so it is d_model 4, 2 heads of key size 2, one layer each (404).
TINY = [
    ("char-pre", lambda: CharTransformerLM(7, 8, 2, 4, 1, 5, 4, norm="pre"), "char", True),
    ("char-post", lambda: CharTransformerLM(7, 8, 2, 4, 1, 5, 4, norm="post"), "char", False),
    (
        "seq2seq-pre",
        lambda: EncoderDecoderTransformer(7, 7, 4, 2, 4, 1, 1, "pre", 0.0, 8, 0, True),
        "seq2seq",
        True,
    ),
    (
        "seq2seq-post",
        lambda: EncoderDecoderTransformer(7, 7, 4, 2, 4, 1, 1, "post", 0.0, 8, 0, True),
        "seq2seq",
        False,
    ),
]


@pytest.mark.parametrize(("build", "kind", "pre"), [c[1:] for c in TINY], ids=[c[0] for c in TINY])
def test_hvp_matches_dense_hessian_of_the_reference(build, kind, pre):
    torch.manual_seed(0)
    model = perturbed(build())
    g = torch.Generator().manual_seed(2)
    if kind == "char":
        x = torch.randint(0, 7, (3, 5), generator=g)
        targets = torch.randint(0, 7, (3, 5), generator=g)

        def loss(m):
            return cross_entropy(m(x), targets)

        def ref_loss(flat):
            return cross_entropy(ref_char_lm(unflatten(model, flat), x, 2, pre), targets)
    else:
        src, tgt_in = src_and_tgt()
        targets = torch.randint(0, 7, tgt_in.shape, generator=g)

        def loss(m):
            return cross_entropy(m(src, tgt_in), targets)

        def ref_loss(flat):
            return cross_entropy(ref_seq2seq(unflatten(model, flat), src, tgt_in, 2, pre), targets)

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n = theta.numel()
    assert n < 600
    # the reference: the hand-written loss, no SDPA anywhere (vmap over its backward)
    dense = torch.autograd.functional.hessian(ref_loss, theta, vectorize=True)
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=1e-12)

    # single HVPs, as a Lanczos iteration makes them
    v = torch.randn(3, n, generator=g, dtype=torch.float64)
    for row in v:
        torch.testing.assert_close(hvp(model, loss, row), dense @ row, rtol=1e-10, atol=1e-12)

    # the whole matrix, one double-backward HVP per basis vector (batched)
    from_hvps = hvp(model, loss, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(from_hvps, dense, rtol=1e-9, atol=1e-12)

    top, top_ref = torch.linalg.eigvalsh(from_hvps)[-1], torch.linalg.eigvalsh(dense)[-1]
    assert top_ref > 1e-2  # a real curvature, not a zero matrix
    assert torch.isclose(top, top_ref, rtol=1e-10, atol=0)


def test_hvp_default_char_lm_matches_finite_differences():
    """Paper 003's full-size model (1.6M parameters), float64: central difference of gradients.

    The gradients of the difference run in the default (fused) attention kernel, the HVP
    in the math kernel, so the two share no attention code. GELU is smooth, so the error
    is truncation eps^2 * (third derivative) plus rounding ~1e-16/eps: about 1e-9 here.
    """
    torch.manual_seed(0)
    model = CharTransformerLM(65).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 65, (2, 64), generator=g)
    targets = torch.randint(0, 65, (2, 64), generator=g)

    def loss(m):
        return cross_entropy(m(x), targets)

    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=g, dtype=torch.float64)
    v /= v.norm()
    hv = hvp(model, loss, v)

    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def grad_at(shift: float) -> Tensor:
        flat = (theta + shift * v).requires_grad_()
        out = torch.func.functional_call(model, unflatten(model, flat), (x,))
        (grad,) = torch.autograd.grad(cross_entropy(out, targets), flat)
        return grad

    eps = 1e-5
    fd = (grad_at(eps) - grad_at(-eps)) / (2 * eps)
    assert fd.norm() > 0
    assert (hv - fd).norm() <= 1e-6 * fd.norm()
    assert torch.isclose(hv @ v, fd @ v, rtol=1e-6, atol=0)


def test_double_backward_needs_the_math_kernel():
    """Without ``sdpa_kernel(SDPBackend.MATH)``, CPU picks flash attention: no double backward.

    This is why Hessian measurements switch attention to the math kernel. If a future
    torch implements the derivative, this test fails and the switch may be dropped.
    """
    torch.manual_seed(0)
    model = CharTransformerLM(7, 8, 2, 4, 1, 5, 4)
    x = torch.randint(0, 7, (2, 5))
    params = list(model.parameters())
    grads = torch.autograd.grad(cross_entropy(model(x), x), params, create_graph=True)
    with pytest.raises(RuntimeError, match="flash_attention.*not implemented|not implemented"):
        torch.autograd.grad(sum(gr.sum() for gr in grads), params)
