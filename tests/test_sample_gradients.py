"""Per-sample gradient products: the ops against their float64 references, and
SampleGradientProducts against per-sample gradients from torch.func.vmap(grad) on a tiny
BERT and on a two-layer network, padding masked out; .grad untouched by the hooks."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import pyxtask.ops
from pyxtask import reference
from pyxtask.sample_gradients import SampleGradientProducts

# -- the ops --------------------------------------------------------------------------------


def lengths_mask(lengths: list[int], L: int) -> torch.Tensor:
    return torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]


def holes_mask(B: int, L: int, seed: int) -> torch.Tensor:
    """Real positions anywhere (not only a prefix), some samples with none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[0] = False
    return mask


def op_inputs(sizes: tuple[int, int, int, int], dtype: torch.dtype, seed: int):
    """a [B, L, n_in], d [B, L, n_out], v [n_out, n_in]."""
    B, L, n_in, n_out = sizes
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, L, n_in, generator=g).to(dtype)
    d = torch.randn(B, L, n_out, generator=g).to(dtype)
    v = torch.randn(n_out, n_in, generator=g).to(dtype)
    return a, d, v


def tolerance(dtype: torch.dtype, terms: int, magnitude: torch.Tensor) -> torch.Tensor:
    """A sum of `terms` products accumulated in the op's dtype (float32 for float32, float64
    for float64) is off by at most ~terms * u * sum |products|; the GEMM stages add their own
    inner dimension, included in `terms` by the callers."""
    u = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    return terms * u * magnitude + 1e-300


shapes = st.tuples(
    st.integers(1, 6),  # B
    st.integers(1, 9),  # L
    st.integers(1, 40),  # I
    st.integers(1, 40),  # O
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from(["none", "lengths", "holes"]),
    st.integers(0, 2**31 - 1),
)


def make_mask(kind: str, B: int, L: int, seed: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "holes":
        return holes_mask(B, L, seed)
    g = torch.Generator().manual_seed(seed)
    return lengths_mask(torch.randint(0, L + 1, (B,), generator=g).tolist(), L)


@given(shapes)
def test_linear_ops_match_the_materialised_reference(shape):
    B, L, n_in, n_out, dtype, mask_kind, seed = shape
    a, d, v = op_inputs((B, L, n_in, n_out), dtype, seed)
    mask = make_mask(mask_kind, B, L, seed)
    m = reference._positions_mask(mask, a.shape[:2])
    dots = pyxtask.ops.linear_sample_dots(a, d, v, mask)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert dots.shape == (B,) and dots.dtype == acc
    bound = torch.einsum(
        "blo,oi,bli,bl->b", d.double().abs(), v.double().abs(), a.double().abs(), m
    )
    expected = reference.linear_sample_dots_reference(a, d, v, mask)
    assert ((dots.double() - expected).abs() <= tolerance(dtype, n_in + n_out + L + 4, bound)).all()
    # The squared norm: |sum_{k,l} (d_k . d_l)(a_k . a_l)| <= (sum_k |d_k| |a_k|)^2.
    norm_bound = torch.einsum("blo,bli,bl->b", d.double().abs(), a.double().abs(), m) ** 2
    expected_sq = reference.linear_sample_sq_norms_reference(a, d, mask)
    for method in ("gram", "materialize", "auto"):
        sq = pyxtask.ops.linear_sample_sq_norms(a, d, mask, method)
        err = (sq.double() - expected_sq).abs()
        assert (err <= tolerance(dtype, n_in + n_out + L * L + 4, norm_bound)).all(), method


@given(
    st.tuples(st.integers(1, 6), st.integers(1, 12), st.integers(1, 40), st.integers(1, 9)),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from(["none", "lengths", "holes"]),
    st.integers(0, 2**31 - 1),
)
def test_embedding_ops_match_the_materialised_reference(sizes, dtype, mask_kind, seed):
    B, L, H, rows = sizes
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rows, (B, L), generator=g)  # few rows: ids repeat within samples
    d = torch.randn(B, L, H, generator=g).to(dtype)
    v = torch.randn(rows, H, generator=g).to(dtype)
    mask = make_mask(mask_kind, B, L, seed)
    m = reference._positions_mask(mask, ids.shape)
    bound = torch.einsum("blh,blh,bl->b", d.double().abs(), v.double().abs()[ids], m)
    dots = pyxtask.ops.embedding_sample_dots(ids, d, v, mask)
    expected = reference.embedding_sample_dots_reference(ids, d, v, mask)
    assert ((dots.double() - expected).abs() <= tolerance(dtype, H + L + 4, bound)).all()
    sq = pyxtask.ops.embedding_sample_sq_norms(ids, d, mask)
    norm_bound = torch.einsum("blh,bl->b", d.double().abs(), m) ** 2 * H
    expected_sq = reference.embedding_sample_sq_norms_reference(ids, d, mask)
    assert ((sq.double() - expected_sq).abs() <= tolerance(dtype, H + L + 4, norm_bound)).all()


def test_half_precision_inputs_are_widened():
    a, d, v = op_inputs((3, 5, 8, 6), torch.float32, seed=3)
    for dtype in (torch.float16, torch.bfloat16):
        a_, d_, v_ = a.to(dtype), d.to(dtype), v.to(dtype)
        dots = pyxtask.ops.linear_sample_dots(a_, d_, v_)
        assert dots.dtype == torch.float32
        expected = reference.linear_sample_dots_reference(a_, d_, v_, None)
        assert torch.allclose(dots.double(), expected, rtol=1e-5, atol=1e-4)


def ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape)


BAD_CALLS = {
    "a must be \\[B, L, I\\]": lambda: pyxtask.ops.linear_sample_dots(
        ones(2, 3), ones(2, 3, 1), ones(1, 3)
    ),
    "v must be \\[O, I\\] = \\[5, 4\\]": lambda: pyxtask.ops.linear_sample_dots(
        ones(2, 3, 4), ones(2, 3, 5), ones(4, 5)
    ),
    "mask must be \\[B, L\\]": lambda: pyxtask.ops.linear_sample_sq_norms(
        ones(2, 3, 4), ones(2, 3, 5), ones(2, 4)
    ),
    "method must be": lambda: pyxtask.ops.linear_sample_sq_norms(
        ones(1, 1, 1), ones(1, 1, 1), None, "fast"
    ),
    "ids\\[0, 1\\] = 9 is not a row of v": lambda: pyxtask.ops.embedding_sample_dots(
        torch.tensor([[0, 9]]), ones(1, 2, 3), ones(4, 3)
    ),
    "ids must be int64 or int32": lambda: pyxtask.ops.embedding_sample_sq_norms(
        ones(1, 2), ones(1, 2, 3)
    ),
}


@pytest.mark.parametrize(("message", "call"), list(BAD_CALLS.items()))
def test_bad_inputs_name_the_op_and_the_problem(message, call):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_an_id_out_of_range_at_a_padding_position_is_ignored():
    ids = torch.tensor([[0, 99]])
    mask = torch.tensor([[1, 0]])
    out = pyxtask.ops.embedding_sample_dots(ids, torch.ones(1, 2, 3), torch.ones(4, 3), mask)
    assert out.tolist() == [3.0]


# -- SampleGradientProducts against vmap(grad) ----------------------------------------------


class TinyBertTagger(nn.Module):
    """A tiny BERT with a token head; the padding mask enters as an additive 4-D mask, which
    BERT takes as is (its 2-D mask path inspects the mask's values, which vmap forbids)."""

    def __init__(self, vocab: int, hidden: int, layers: int, seq: int, labels: int) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=hidden + 4,
            max_position_embeddings=seq,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            attn_implementation="eager",
        )
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(hidden, labels)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        dtype = self.head.weight.dtype
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        hidden = self.encoder(input_ids=ids, attention_mask=additive).last_hidden_state
        return self.head(hidden)


def token_losses(logits, labels, mask):
    """Per-sample sums of the token cross entropies over real positions."""
    ce = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return (ce.view(labels.shape) * mask).sum(-1)


def per_sample_gradients(model, losses_of, *batch):
    """{name: [B, *shape]}: each sample's gradient, from vmap over grad of its own loss."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, *sample):
        return losses_of(lambda *x: functional_call(model, p, x), *(s[None] for s in sample)).sum()

    return vmap(grad(one), in_dims=(None, *[0] * len(batch)))(params, *batch)


def bert_batch(B, L, vocab, labels, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L  # one full-length sample
    mask = lengths_mask(lengths.tolist(), L).long()
    ids = torch.randint(1, vocab, (B, L), generator=g) * mask  # 0: BERT's [PAD], padding_idx
    ids[0, L // 2] = 0  # a [PAD] id at a real position: no gradient for that row either
    ids[-1, 0] = ids[-1, -1]  # a repeated token
    y = torch.randint(0, labels, (B, L), generator=g)
    return ids, mask, y


def bert_losses(model_fn, ids, mask, y):
    return token_losses(model_fn(ids, mask), y, mask)


def expected_products(per_sample, vector, names):
    dots = sum((per_sample[n] * vector[n]).flatten(1).sum(1) for n in names)
    sq = sum(per_sample[n].flatten(1).square().sum(1) for n in names)
    return dots, sq


def assert_close(got, expected, what):
    assert got is not None
    scale = expected.abs().max().clamp(min=1.0)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-10 * float(scale)), (
        f"{what}: {got} vs {expected}"
    )


@settings(max_examples=6)
@given(
    st.integers(2, 5),
    st.integers(2, 9),
    st.sampled_from([4, 8]),
    st.sampled_from(["all", "linear"]),
    st.integers(0, 2**31 - 1),
)
def test_bert_products_match_vmap_per_sample_gradients(B, L, hidden, layers, seed):
    torch.manual_seed(seed % 1000)
    vocab, labels = 23, 3
    model = TinyBertTagger(vocab, hidden, 2, L, labels).double()
    ids, mask, y = bert_batch(B, L, vocab, labels, seed)
    per_sample = per_sample_gradients(model, bert_losses, ids, mask, y)
    g = torch.Generator().manual_seed(seed + 1)
    vector = {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }
    products = SampleGradientProducts(model, layers=layers)
    expected_dots, expected_sq = expected_products(per_sample, vector, products.parameter_names)

    with products.capture(vector, mask):
        bert_losses(model, ids, mask, y).sum().backward()
    assert_close(products.dots, expected_dots, "dots after capture")
    assert_close(products.sq_norms, expected_sq, "sq_norms after capture")

    dots, sq = products.measure(lambda: bert_losses(model, ids, mask, y), vector, mask)
    assert_close(dots, expected_dots, "dots from measure")
    assert_close(sq, expected_sq, "sq_norms from measure")


def test_bert_coverage_by_layer_kind():
    model = TinyBertTagger(23, 8, 2, 6, 3)
    counts = {"linear": 0, "other": 0}
    for module in model.modules():
        kind = "linear" if isinstance(module, nn.Linear) else "other"
        counts[kind] += sum(p.numel() for p in module.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    assert SampleGradientProducts(model).coverage == 1.0
    linear = SampleGradientProducts(model, layers="linear")
    assert linear.coverage == pytest.approx(counts["linear"] / total, abs=0, rel=1e-15)
    assert 0 < linear.coverage < 1
    # A frozen parameter is not trainable: it counts neither as covered nor in the total.
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    frozen = SampleGradientProducts(model, layers="linear")
    vocab_rows = model.encoder.embeddings.word_embeddings.weight.numel()
    assert frozen.coverage == pytest.approx(counts["linear"] / (total - vocab_rows), rel=1e-15)


class TwoLayerNet(nn.Module):
    """The paper's App. B model: features -> hidden (ReLU) -> labels."""

    def __init__(self, features: int, hidden: int, labels: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, hidden)
        self.out = nn.Linear(hidden, labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def mlp_losses(model_fn, x, y):
    return nn.functional.cross_entropy(model_fn(x), y, reduction="none")


def window_losses(model_fn, x, y, mask):
    """The network on every position of a padded sequence: per-sample sums over real ones."""
    return token_losses(model_fn(x), y, mask)


@given(
    st.integers(1, 7),
    st.integers(1, 30),
    st.integers(1, 50),
    st.integers(2, 6),
    st.integers(0, 2**31 - 1),
)
def test_two_layer_network_matches_vmap(B, features, hidden, labels, seed):
    torch.manual_seed(seed % 1000)
    model = TwoLayerNet(features, hidden, labels).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, labels, (B,), generator=g)
    per_sample = per_sample_gradients(model, mlp_losses, x, y)
    vector = {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }
    products = SampleGradientProducts(model)
    expected_dots, expected_sq = expected_products(per_sample, vector, products.parameter_names)
    dots, sq = products.measure(lambda: mlp_losses(model, x, y), vector)
    assert_close(dots, expected_dots, "dots")
    assert_close(sq, expected_sq, "sq_norms")
    norms_only, sq_again = products.measure(lambda: mlp_losses(model, x, y))
    assert norms_only is None and torch.equal(sq_again, sq)


@given(st.integers(1, 5), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_two_layer_network_on_padded_sequences_matches_vmap(B, L, seed):
    torch.manual_seed(seed % 1000)
    model = TwoLayerNet(7, 33, 4).double()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g).tolist()
    mask = lengths_mask(lengths, L).double()
    # Padding holds garbage: it must not reach the products (the loss ignores it too).
    x = torch.randn(B, L, 7, generator=g, dtype=torch.float64) * (1 + 1e3 * (1 - mask[..., None]))
    y = torch.randint(0, 4, (B, L), generator=g)
    per_sample = per_sample_gradients(model, window_losses, x, y, mask)
    vector = {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }
    products = SampleGradientProducts(model)
    expected_dots, expected_sq = expected_products(per_sample, vector, products.parameter_names)
    with products.capture(vector, mask):
        window_losses(model, x, y, mask).sum().backward()
    assert_close(products.dots, expected_dots, "dots")
    assert_close(products.sq_norms, expected_sq, "sq_norms")


# -- the hooks leave training alone ---------------------------------------------------------


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_capture_leaves_every_grad_bitwise_unchanged():
    torch.manual_seed(0)
    model = TinyBertTagger(31, 16, 2, 10, 5)
    ids, mask, y = bert_batch(6, 10, 31, 5, seed=7)
    vector = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    bert_losses(model, ids, mask, y).sum().backward()
    plain = grads_of(model)
    model.zero_grad(set_to_none=True)
    products = SampleGradientProducts(model)
    with products.capture(vector, mask):
        bert_losses(model, ids, mask, y).sum().backward()
    hooked = grads_of(model)
    assert plain.keys() == hooked.keys() == dict(model.named_parameters()).keys()
    for name in plain:
        assert torch.equal(plain[name], hooked[name]), name
    assert products.sq_norms.shape == (6,) and bool((products.sq_norms > 0).all())


def test_measure_touches_no_grad_and_matches_capture():
    torch.manual_seed(0)
    model = TinyBertTagger(31, 16, 2, 10, 5)
    ids, mask, y = bert_batch(4, 10, 31, 5, seed=8)
    vector = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    products = SampleGradientProducts(model)
    dots, sq = products.measure(lambda: bert_losses(model, ids, mask, y), vector, mask)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="one loss per sample"):
        products.measure(lambda: bert_losses(model, ids, mask, y)[None], vector, mask)
    assert all(p.requires_grad for p in model.parameters())  # restored after an error too
    with products.capture(vector, mask):
        bert_losses(model, ids, mask, y).sum().backward()
    assert dots is not None and products.dots is not None
    assert torch.allclose(dots, products.dots, rtol=1e-5) and torch.allclose(
        sq, products.sq_norms, rtol=1e-5
    )


def test_hooks_are_removed_after_the_block():
    model = TwoLayerNet(3, 4, 2)
    products = SampleGradientProducts(model)
    with products.capture(None, None):
        mlp_losses(model, torch.randn(5, 3), torch.zeros(5, dtype=torch.long)).sum().backward()
    assert products.sq_norms.shape == (5,)
    assert not model.hidden._forward_hooks and not model.out._forward_hooks
    before = products.sq_norms.clone()
    mlp_losses(model, torch.randn(2, 3), torch.zeros(2, dtype=torch.long)).sum().backward()
    assert torch.equal(products.sq_norms, before)


# -- clear errors ---------------------------------------------------------------------------


def test_bad_vectors_and_masks_are_named():
    model = TwoLayerNet(3, 4, 2)
    products = SampleGradientProducts(model)
    vector = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    missing = {k: v for k, v in vector.items() if k != "hidden.bias"}
    with pytest.raises(KeyError, match=r"'hidden\.bias'"), products.capture(missing):
        pass
    with pytest.raises(KeyError, match="'nope'"), products.capture({**vector, "nope": ones(1)}):
        pass
    wrong = {**vector, "out.weight": ones(1)}
    match = r"vector\['out\.weight'\] has shape \(1,\)"
    with pytest.raises(ValueError, match=match), products.capture(wrong):
        pass
    with pytest.raises(ValueError, match="layers must be one of"):
        SampleGradientProducts(model, layers="conv")
    seq = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"layer 'hidden' has positions \(5,\)"):
        products.measure(lambda: model(seq).sum((1, 2)), None, torch.ones(2, 4))


def test_a_module_that_runs_twice_or_shares_parameters_is_refused():
    model = TwoLayerNet(4, 4, 2)
    products = SampleGradientProducts(model)
    with pytest.raises(RuntimeError, match="layer 'hidden' ran twice"):
        products.measure(lambda: model.hidden(model.hidden(torch.randn(3, 4))).sum(1))
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="used by both '0' and '1'"):
        SampleGradientProducts(tied)


def test_materialised_and_gram_norms_agree_inside_the_module():
    """Long sequences take the materialised path ('auto'); the result is the same sum."""
    torch.manual_seed(1)
    model = TwoLayerNet(3, 2, 2).double()
    x = torch.randn(2, 40, 3, dtype=torch.float64)  # L (I + O) > I O for both layers
    y = torch.randint(0, 2, (2, 40))
    mask = torch.ones(2, 40)
    per_sample = per_sample_gradients(model, window_losses, x, y, mask)
    products = SampleGradientProducts(model)
    _, sq = products.measure(lambda: window_losses(model, x, y, mask), None, mask)
    _, expected = expected_products(per_sample, dict(per_sample), products.parameter_names)
    assert math.isclose(float(sq[0]), float(expected[0]), rel_tol=1e-12)
    assert_close(sq, expected, "sq_norms")
