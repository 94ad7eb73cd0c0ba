"""Transformers: paper 002's WMT encoder-decoder and paper 003's character language model.

==================================  ============================  ======================
model                               parameters                    used in
==================================  ============================  ======================
:class:`EncoderDecoderTransformer`  63,084,544 (37k, shared)      paper 002, §5, Fig. 7
:class:`CharTransformerLM`          1,610,305 (65 characters)     paper 003, §3.1
==================================  ============================  ======================

Both are built from one attention module, :class:`MultiHeadAttention`, which projects
``d_model`` to ``num_heads * key_size`` for queries, keys and values and back (Haiku's
``hk.MultiHeadAttention``), and one residual sub-layer rule, chosen by ``norm``:

.. math::
    \\text{pre-LN:}\\quad x \\leftarrow x + \\operatorname{Dropout}(f(\\operatorname{LN}(x))),
    \\qquad
    \\text{post-LN:}\\quad x \\leftarrow \\operatorname{LN}(x + \\operatorname{Dropout}(f(x))),

where :math:`f` is self-attention, cross-attention or the feed-forward block. A pre-LN
stack ends with one more LayerNorm (Xiong et al., 2020, "On layer normalization in the
transformer architecture", paper 002's [46]); a post-LN stack (Vaswani et al., 2017) does
not, its output being normalized already.

**Kernels.** Attention runs through
:func:`torch.nn.functional.scaled_dot_product_attention`. Its fused kernels (flash
attention on CPU, flash and memory-efficient on GPU) have no double backward, so a
Hessian-vector product by double backward needs the math kernel::

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ...  # forward, first and second backward

**Dropout.** Every dropout is an :class:`torch.nn.Dropout` module (none hides inside the
attention kernel), so ``model.eval()`` or a measurement that switches dropout off finds
all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CharTransformerLM",
    "EncoderDecoderTransformer",
    "MultiHeadAttention",
    "sinusoidal_positions",
]

Norm = Literal["pre", "post"]


def _check_norm(norm: str) -> None:
    if norm not in ("pre", "post"):
        raise ValueError(f"norm={norm!r}; choose 'pre' (pre-LN) or 'post' (post-LN).")


def sinusoidal_positions(
    length: int,
    d_model: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The sinusoidal positional encoding of Vaswani et al. (2017), §3.5.

    .. math::
        PE_{(p, 2i)} = \\sin\\big(p / 10000^{2i/d}\\big), \\qquad
        PE_{(p, 2i+1)} = \\cos\\big(p / 10000^{2i/d}\\big).

    Computed in ``dtype`` itself (float64 when asked, so a float64 model is exact to
    float64, not to the float32 rounding of a stored table).

    Args:
        length: positions :math:`p = 0, \\dots, \\text{length} - 1`.
        d_model: width :math:`d` (even).
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        A tensor of shape ``(length, d_model)``.

    Example:
        >>> pe = sinusoidal_positions(4, 6)
        >>> pe.shape, pe[0].tolist()
        (torch.Size([4, 6]), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    """
    if d_model % 2:
        raise ValueError(f"d_model={d_model} must be even for sinusoidal positions.")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    position = torch.arange(length, dtype=work, device=device)[:, None]
    exponent = torch.arange(0, d_model, 2, dtype=work, device=device) / d_model
    angle = position * torch.pow(10000.0, -exponent)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(length, d_model).to(dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a free key size, as Haiku's ``hk.MultiHeadAttention``.

    With :math:`H` heads of key size :math:`k`, queries from :math:`x` and keys and values
    from :math:`m` (:math:`m = x` for self-attention):

    .. math::
        \\operatorname{head}_h = \\operatorname{softmax}\\Big(
            \\frac{(x W^Q_h + b^Q_h)(m W^K_h + b^K_h)^\\top}{\\sqrt{k}} + M\\Big)
            (m W^V_h + b^V_h),
        \\qquad
        \\operatorname{MHA}(x, m) = [\\operatorname{head}_1, \\dots,
            \\operatorname{head}_H]\\, W^O + b^O,

    with :math:`W^{Q,K,V}_h \\in \\mathbb{R}^{d \\times k}` and :math:`W^O \\in
    \\mathbb{R}^{Hk \\times d}`. :math:`Hk` need not equal :math:`d` (paper 003: 8 heads
    of 32 on :math:`d = 128`). :math:`M` is :math:`-\\infty` where a key is padding or,
    with ``is_causal``, in the future of the query, and 0 elsewhere. A query whose keys
    are all padding attends to all of them instead, so every kernel returns finite
    values (its output is meaningless, but it cannot poison a sum with NaN).

    Args:
        d_model: width :math:`d` of inputs and output.
        num_heads: :math:`H`.
        key_size: :math:`k`, the size of queries, keys and values per head; ``None`` for
            ``d_model // num_heads``.

    Example:
        >>> import torch
        >>> attn = MultiHeadAttention(128, num_heads=8, key_size=32)
        >>> attn.query.weight.shape, attn.out.weight.shape
        (torch.Size([256, 128]), torch.Size([128, 256]))
        >>> attn(torch.randn(2, 5, 128), is_causal=True).shape
        torch.Size([2, 5, 128])
    """

    def __init__(self, d_model: int, num_heads: int, key_size: int | None = None) -> None:
        super().__init__()
        if key_size is None:
            if d_model % num_heads:
                raise ValueError(
                    f"d_model={d_model} is not a multiple of num_heads={num_heads}; "
                    "pass key_size explicitly."
                )
            key_size = d_model // num_heads
        self.num_heads = num_heads
        self.key_size = key_size
        inner = num_heads * key_size
        self.query = nn.Linear(d_model, inner)
        self.key = nn.Linear(d_model, inner)
        self.value = nn.Linear(d_model, inner)
        self.out = nn.Linear(inner, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.key_size).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attend from ``x`` to ``memory``.

        Args:
            x: queries' inputs, ``(B, T, d_model)``.
            memory: keys' and values' inputs, ``(B, S, d_model)``; ``None`` for ``x``.
            key_padding_mask: ``(B, S)`` booleans, ``True`` where a key is padding.
            is_causal: query ``t`` sees keys ``0..t`` only (self-attention, ``S = T``).

        Returns:
            ``(B, T, d_model)``.
        """
        memory = x if memory is None else memory
        b, t, _ = x.shape
        q = self._heads(self.query(x))
        k = self._heads(self.key(memory))
        v = self._heads(self.value(memory))
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S): over heads, queries
            if is_causal:
                s = memory.shape[1]
                causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril()
                mask, is_causal = mask & causal, False
            mask = mask | ~mask.any(dim=-1, keepdim=True)  # a row with no key: attend to all
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return self.out(out.transpose(1, 2).reshape(b, t, self.num_heads * self.key_size))


class _FeedForward(nn.Module):
    """Position-wise :math:`\\phi(x W_1 + b_1) W_2 + b_2` (Vaswani et al., eq. 2)."""

    def __init__(self, d_model: int, d_ff: int, activation: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


def _gelu_tanh(x: Tensor) -> Tensor:
    """``jax.nn.gelu``'s default, the tanh approximation (Haiku's example uses it)."""
    return F.gelu(x, approximate="tanh")


class _Layer(nn.Module):
    """Shared residual rule of every layer: pre-LN or post-LN, dropout on the branch."""

    def __init__(self, norm: Norm, dropout: float) -> None:
        super().__init__()
        self.pre = norm == "pre"
        self.dropout = nn.Dropout(dropout)

    def _residual(self, x: Tensor, ln: nn.LayerNorm, branch: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre:
            return x + self.dropout(branch(ln(x)))
        return ln(x + self.dropout(branch(x)))


class _SelfAttentionLayer(_Layer):
    """Self-attention then feed-forward: an encoder layer, or a causal LM layer."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        key_size: int | None,
        d_ff: int,
        activation: Callable[[Tensor], Tensor],
        norm: Norm,
        dropout: float,
    ) -> None:
        super().__init__(norm, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, key_size)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = _FeedForward(d_model, d_ff, activation)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, key_padding_mask=key_padding_mask, is_causal=is_causal)

        x = self._residual(x, self.norm1, attend)
        return self._residual(x, self.norm2, self.ff)


class _DecoderLayer(_Layer):
    """Causal self-attention, cross-attention to the encoder's output, feed-forward."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, norm: Norm, dropout: float) -> None:
        super().__init__(norm, dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = _FeedForward(d_model, d_ff, F.relu)

    def forward(self, y: Tensor, memory: Tensor, src_padding_mask: Tensor) -> Tensor:
        y = self._residual(y, self.norm1, lambda h: self.self_attn(h, is_causal=True))

        def cross(h: Tensor) -> Tensor:
            return self.cross_attn(h, memory, key_padding_mask=src_padding_mask)

        y = self._residual(y, self.norm2, cross)
        return self._residual(y, self.norm3, self.ff)


def _final_norm(d_model: int, norm: Norm) -> nn.Module:
    return nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()


class EncoderDecoderTransformer(nn.Module):
    """The 6L-6L encoder-decoder Transformer of paper 002 (§5, Fig. 7: WMT En→De).

    Paper 002 (§5 and the caption of Fig. 7) trains "a 6L-6L encoder-decoder Pre-LN
    transformer" and its Post-LN twin on "the En->De WMT translation task" (the year is
    not given) with Adam at :math:`\\eta = 0.001`, 40k steps of linear warmup (after
    Popel and Bojar, 2018, its [36]) and batch sizes 1024 and 10240. It gives no other
    architectural detail, and App. G.1 lists no Transformer. The defaults are therefore
    Transformer-base of Vaswani et al. (2017), §3 and Table 3:
    :math:`d_\\text{model} = 512`, 8 heads, :math:`d_\\text{ff} = 2048`, ReLU, dropout 0.1.

    **Layers.** Each encoder layer is self-attention then feed-forward; each decoder
    layer is causal self-attention, cross-attention to the encoder's output, then
    feed-forward. Every sub-layer :math:`f` is wrapped as

    .. math::
        \\text{pre-LN:}\\ x + \\operatorname{Dropout}(f(\\operatorname{LN}(x))),
        \\qquad
        \\text{post-LN:}\\ \\operatorname{LN}(x + \\operatorname{Dropout}(f(x))),

    and with ``norm="pre"`` both stacks end with a LayerNorm (Xiong et al., 2020, paper
    002's [46]); ``norm="post"`` is Vaswani et al.'s original. Cross-attention takes its
    keys and values from the encoder's output (after the encoder's final LayerNorm under
    pre-LN) as it is, without another LayerNorm.

    **Embeddings** (Vaswani et al., §3.4-3.5): token embeddings times
    :math:`\\sqrt{d_\\text{model}}`, plus the sinusoidal encoding of
    :func:`sinusoidal_positions`, then dropout. With ``share_embeddings`` one matrix
    :math:`E` embeds source and target and gives the logits :math:`y E^\\top` (§3.4,
    which needs one joint vocabulary); otherwise source embedding, target embedding and
    output projection are three matrices. The output projection has no bias either way.

    **Masks.** Source positions equal to ``pad_id`` are masked as keys in encoder
    self-attention and in cross-attention, so appending padding to ``src`` leaves the
    logits unchanged. Padded *queries* still compute (their outputs are never attended
    to). A source that is all padding attends to all of its positions (finite, meaningless
    outputs). Decoder self-attention is causal only: with right-padded ``tgt_in``,
    causality already keeps real tokens from seeing the padding after them, and the loss
    should ignore the logits at padded positions.

    **Initialization** (neither paper states one): Xavier-uniform weights for every
    linear map (as PyTorch's ``nn.Transformer`` and Flax's WMT example), zero biases,
    LayerNorm scale 1 and offset 0, and embeddings :math:`\\mathcal{N}(0,
    1/d_\\text{model})`, so that the scaled embeddings have unit variance (tensor2tensor's
    convention).

    **Dropout** (Vaswani et al., §5.4) on each sub-layer's output before the residual sum
    and on the sums of embeddings and positions; none on attention probabilities.

    **Size.** With a shared vocabulary of :math:`V`,
    :math:`Vd + 6(4d^2 + 2d d_\\text{ff} + 9d + d_\\text{ff}) + 6(8d^2 + 2d d_\\text{ff} +
    15d + d_\\text{ff}) + 4d` for pre-LN (:math:`2d` fewer for post-LN): **63,084,544**
    for :math:`V = 37000` (Vaswani et al.'s En-De BPE vocabulary; their Table 3 quotes 65M
    for base) and **48,236,544** for :math:`V = 8000`; unshared (two vocabularies of
    :math:`V`, plus an output matrix) 100,972,544 and 56,428,544.

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: target vocabulary size (equal to the source's to share).
        d_model: model width :math:`d` (a multiple of ``num_heads``, and even).
        num_heads: attention heads; key size ``d_model // num_heads``.
        d_ff: hidden width of the feed-forward blocks.
        num_encoder_layers: encoder layers.
        num_decoder_layers: decoder layers.
        norm: ``"pre"`` (pre-LN) or ``"post"`` (post-LN).
        dropout: residual and embedding dropout.
        max_len: longest source or target sequence accepted (the sinusoids are computed,
            not stored, so this is only a guard).
        pad_id: the padding token of the source.
        share_embeddings: one matrix for source and target embeddings and output.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> def n_params(**kwargs):
        ...     with torch.device("meta"):  # sizes only, no initialization cost
        ...         model = EncoderDecoderTransformer(37000, 37000, **kwargs)
        ...     return sum(p.numel() for p in model.parameters())
        >>> n_params(share_embeddings=True), n_params(share_embeddings=True, norm="post")
        (63084544, 63082496)
        >>> n_params()  # three 37000 x 512 matrices
        100972544
        >>> model = EncoderDecoderTransformer(11, 13, d_model=16, num_heads=2, d_ff=32)
        >>> src = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]])  # 0 is padding
        >>> model(src, torch.randint(1, 13, (2, 4))).shape
        torch.Size([2, 4, 13])
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        num_heads: int = 8,
        d_ff: int = 2048,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        norm: Literal["pre", "post"] = "pre",
        dropout: float = 0.1,
        max_len: int = 256,
        pad_id: int = 0,
        share_embeddings: bool = False,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        if d_model % num_heads or d_model % 2:
            raise ValueError(
                f"d_model={d_model} must be even (sinusoidal positions) and a multiple of "
                f"num_heads={num_heads}."
            )
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings=True needs one joint vocabulary, but src_vocab_size="
                f"{src_vocab_size} != tgt_vocab_size={tgt_vocab_size}; build a joint "
                "vocabulary or set share_embeddings=False."
            )
        self.d_model = d_model
        self.max_len = max_len
        self.pad_id = pad_id
        self.norm = norm
        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = (
            self.src_embed if share_embeddings else nn.Embedding(tgt_vocab_size, d_model)
        )
        self.output = None if share_embeddings else nn.Linear(d_model, tgt_vocab_size, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(
            _SelfAttentionLayer(d_model, num_heads, None, d_ff, F.relu, norm, dropout)
            for _ in range(num_encoder_layers)
        )
        self.encoder_norm = _final_norm(d_model, norm)
        self.decoder = nn.ModuleList(
            _DecoderLayer(d_model, num_heads, d_ff, norm, dropout)
            for _ in range(num_decoder_layers)
        )
        self.decoder_norm = _final_norm(d_model, norm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform linear weights, zero biases, :math:`\\mathcal{N}(0, 1/d)` embeddings."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=self.d_model**-0.5)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    def _embed(self, table: nn.Embedding, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(
                f"a sequence of length {length} is longer than max_len={self.max_len}; "
                "build the model with a larger max_len."
            )
        embedded = table(tokens) * math.sqrt(self.d_model)
        positions = sinusoidal_positions(length, self.d_model, embedded.dtype, embedded.device)
        return self.dropout(embedded + positions)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's output ``(B, S, d_model)`` and the source padding mask ``(B, S)``."""
        padding = src == self.pad_id
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, key_padding_mask=padding)
        return self.encoder_norm(x), padding

    def decode(self, tgt_in: Tensor, memory: Tensor, src_padding_mask: Tensor) -> Tensor:
        """Logits ``(B, T, tgt_vocab_size)`` from the encoder's output and mask."""
        y = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, src_padding_mask)
        y = self.decoder_norm(y)
        return F.linear(y, self.tgt_embed.weight) if self.output is None else self.output(y)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Next-token logits.

        Args:
            src: source tokens, ``(B, S)`` integers, padded with ``pad_id``.
            tgt_in: target tokens shifted right (starting with a begin token), ``(B, T)``.

        Returns:
            Logits ``(B, T, tgt_vocab_size)``; position ``t`` depends on ``tgt_in[:, :t+1]``
            and on the source's non-padding tokens only.
        """
        memory, padding = self.encode(src)
        return self.decode(tgt_in, memory, padding)


def _haiku_truncated_normal_(weight: Tensor, std: float) -> None:
    """Haiku's ``TruncatedNormal(std)``: :math:`\\mathcal{N}(0, \\text{std}^2)` cut at 2 std."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


# std of a standard normal truncated to [-2, 2]; Haiku's VarianceScaling divides by it
_TRUNCATED_STD = 0.87962566103423978


class CharTransformerLM(nn.Module):
    """The character-level Transformer language model of paper 003 (§3.1, tiny-shakespeare).

    Paper 003, §3.1: "we modified the sample implementation of Transformers distributed
    with the Haiku package [...] The architecture was as in the Haiku distribution, with 6
    layers, 8 heads, a key size of 32, 'model size' of 128, and sequence length of 64.
    Because it introduces noise, Dropout was removed." Haiku's ``examples/transformer``
    (``model.py``) is a decoder-only pre-LN stack:

    .. math::
        h_0 = E[x] + P_{0:T}, \\qquad
        h \\leftarrow h + \\operatorname{MHA}_\\text{causal}(\\operatorname{LN}(h)), \\qquad
        h \\leftarrow h + W_2\\, \\operatorname{GELU}(W_1 \\operatorname{LN}(h) + b_1) + b_2,

    repeated ``num_layers`` times, then :math:`\\text{logits} = W_o \\operatorname{LN}(h) +
    b_o` (untied). :math:`P` is a learned positional embedding of ``seq_len`` rows; the
    token embedding is not scaled; the MLP widens by 4 with the tanh-approximate GELU
    (``jax.nn.gelu``'s default); attention has 8 heads of key size 32 on a width of 128,
    i.e. projections :math:`128 \\to 256 \\to 128` (:class:`MultiHeadAttention`), with
    biases. ``norm="post"`` (not in paper 003) replaces each sub-layer by
    :math:`\\operatorname{LN}(h + f(h))` and drops the final LayerNorm, for pre- versus
    post-LN comparisons as in paper 002. Dropout, when not 0, acts on each sub-layer's
    output, as in Haiku.

    Haiku also masks keys equal to its pad token 0, the NUL character, which its ASCII
    loader forbids in the text, so the mask is never active; here there is no padding
    (the vocabulary of :class:`~lightning_eos.data.CharLMDataModule` is the text's
    characters) and attention is causal only.

    **Initialization** (Haiku's): token and positional embeddings truncated normal with
    std 0.02 (cut at 2 std); attention and MLP weights ``VarianceScaling(2 /
    num_layers)``, a truncated normal of variance :math:`2/(L \\cdot \\text{fan\\_in})`;
    output weights truncated normal with std :math:`1/\\sqrt{d}`; biases 0, LayerNorm
    scale 1 and offset 0.

    **Size.** :math:`Vd + Td + L(4d\\,Hk + 3Hk + d + 2d\\,d_\\text{ff} + d_\\text{ff} + d +
    4d) + 2d + dV + V`: **1,610,305** for tiny-shakespeare's 65 characters (pre-LN; 256
    fewer for post-LN) and 1,626,496 for Haiku's 128 ASCII code points.

    Args:
        vocab_size: number of characters :math:`V`.
        d_model: model width :math:`d` ("model size").
        num_heads: attention heads :math:`H`.
        key_size: size :math:`k` of each head's queries, keys and values.
        num_layers: Transformer layers :math:`L`.
        seq_len: longest input :math:`T` (rows of the positional embedding).
        d_ff: MLP hidden width; ``None`` for ``4 * d_model`` (Haiku's widening factor).
        dropout: dropout on each sub-layer's output (0 in paper 003).
        norm: ``"pre"`` (Haiku's, paper 003) or ``"post"``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> with torch.device("meta"):  # sizes only
        ...     pre, post = CharTransformerLM(65), CharTransformerLM(65, norm="post")
        >>> sum(p.numel() for p in pre.parameters()), sum(p.numel() for p in post.parameters())
        (1610305, 1610049)
        >>> model = CharTransformerLM(65, num_layers=2)
        >>> x = torch.randint(0, 65, (2, 64))
        >>> logits = model(x)
        >>> logits.shape
        torch.Size([2, 64, 65])
        >>> y = x.clone()
        >>> y[:, 10:] = 0  # the future does not change the past
        >>> torch.allclose(model(y)[:, :10], logits[:, :10], atol=1e-5)
        True
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        num_heads: int = 8,
        key_size: int = 32,
        num_layers: int = 6,
        seq_len: int = 64,
        d_ff: int | None = None,
        dropout: float = 0.0,
        norm: Literal["pre", "post"] = "pre",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.seq_len = seq_len
        self.num_layers = num_layers
        self.norm = norm
        self.embed = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(torch.empty(seq_len, d_model))
        self.layers = nn.ModuleList(
            _SelfAttentionLayer(d_model, num_heads, key_size, d_ff, _gelu_tanh, norm, dropout)
            for _ in range(num_layers)
        )
        self.final_norm = _final_norm(d_model, norm)
        self.output = nn.Linear(d_model, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Haiku's initialization (see the class docstring)."""
        _haiku_truncated_normal_(self.embed.weight, 0.02)
        _haiku_truncated_normal_(self.positions, 0.02)
        scale = 2.0 / max(1, self.num_layers)
        for layer in self.layers:
            for m in layer.modules():
                if isinstance(m, nn.Linear):
                    fan_in = m.weight.shape[1]
                    _haiku_truncated_normal_(m.weight, math.sqrt(scale / fan_in) / _TRUNCATED_STD)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
        if isinstance(self.final_norm, nn.LayerNorm):
            self.final_norm.reset_parameters()
        _haiku_truncated_normal_(self.output.weight, self.output.weight.shape[1] ** -0.5)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Next-character logits.

        Args:
            x: characters, ``(B, T)`` integers with ``T <= seq_len``.

        Returns:
            Logits ``(B, T, vocab_size)``; position ``t`` depends on ``x[:, :t+1]`` only.
        """
        length = x.shape[1]
        if length > self.seq_len:
            raise ValueError(
                f"input of length {length} is longer than seq_len={self.seq_len}; "
                "build the model with a larger seq_len."
            )
        h = self.embed(x) + self.positions[:length]
        for layer in self.layers:
            h = layer(h, is_causal=True)
        return self.output(self.final_norm(h))
