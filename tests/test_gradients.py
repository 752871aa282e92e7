"""TaskGradients against autograd.grad per task on a tiny BERT, both modes."""

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from pyxtask.data.labels import LabelMap
from pyxtask.gradients import NonFiniteGradientError, TaskGradients
from pyxtask.models import MultiTaskModel

TASKS = [
    ("target", LabelMap(["A", "B", "C"], name="target")),
    ("src1", LabelMap(["x", "y"], name="src1")),
    ("src2", LabelMap(["p", "q", "r", "s"], name="src2", kind="sentence")),
]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return MultiTaskModel.from_config(config, TASKS, dropout=0.0).train()


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, labels in TASKS:
        ids = torch.randint(5, 50, (3, 6), generator=g)
        mask = torch.ones_like(ids)
        if labels.kind == "token":
            y = torch.randint(0, len(labels), (3, 6), generator=g)
        else:
            y = torch.randint(0, len(labels), (3,), generator=g)
        out.append((name, ids, mask, y))
    return out


def losses(model, data):
    return [model(name, ids, mask, y).loss for name, ids, mask, y in data]


def reference(model, data, weights):
    """autograd.grad per task: the per-task gradients and the grads of sum_t w_t L_t."""
    shared = list(model.shared_parameters())
    rows = []
    for loss in losses(model, data):
        g = torch.autograd.grad(loss, shared, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if x is None else x).reshape(-1)
                    for p, x in zip(shared, g, strict=True)
                ]
            )
        )
    G = torch.stack(rows).double()
    model.zero_grad(set_to_none=True)
    total = sum(w * loss for w, loss in zip(weights, losses(model, data), strict=True))
    total.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return G, expected


def engine(model, mode):
    names = [name for name, _ in TASKS]
    return TaskGradients(
        model.shared_parameters(),
        len(TASKS),
        mode=mode,
        task_parameters=[list(model.task_parameters(n)) for n in names],
        task_names=names,
    )


@pytest.mark.parametrize("mode", ["buffer", "streaming"])
@given(weights=st.lists(st.floats(0.0, 3.0), min_size=3, max_size=3), seed=st.integers(0, 5))
def test_matches_autograd_grad_per_task(mode, weights, seed):
    model = tiny_model(seed)
    data = batches(seed + 1)
    G, expected = reference(model, data, weights)
    with engine(model, mode) as grads:
        stats = grads.backward(losses(model, data), weights)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name, value in expected.items():
        # fp32 sums over every token in another order: error ~ eps * terms * largest entry.
        atol = 1e-5 * float(value.abs().max()) + 1e-7
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=atol, msg=name)
    # The statistics TAWT uses: target . g_t and ||g_t||^2 (fp32 sums of fp32 products).
    torch.testing.assert_close(stats.reference_dots, G @ G[0], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(stats.sq_norms, (G * G).sum(1), rtol=1e-4, atol=1e-8)
    cos = torch.nn.functional.cosine_similarity(G[0:1], G)
    torch.testing.assert_close(stats.reference_cosines(), cos, rtol=1e-4, atol=1e-6)
    if mode == "buffer":
        torch.testing.assert_close(stats.gram, G @ G.T, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(grads.buffer.double(), G, rtol=1e-6, atol=1e-7)
    else:
        assert stats.gram is None and grads.buffer is None


def test_buffer_and_streaming_same_weights_and_update():
    model_b, model_s = tiny_model(3), tiny_model(3)
    data = batches(4)
    w = [0.7, 0.2, 0.1]
    with engine(model_b, "buffer") as gb, engine(model_s, "streaming") as gs:
        sb = gb.backward(losses(model_b, data))  # weights chosen after seeing the Gram
        gb.combine(w)
        ss = gs.backward(losses(model_s, data), w)
    torch.testing.assert_close(sb.reference_cosines(), ss.reference_cosines(), rtol=1e-5, atol=1e-7)
    for (n, pb), (_, ps) in zip(
        model_b.named_parameters(), model_s.named_parameters(), strict=True
    ):
        torch.testing.assert_close(pb.grad, ps.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["buffer", "streaming"])
def test_reference_vector_and_accumulation(mode):
    model = tiny_model(5)
    data = batches(6)
    G, expected = reference(model, data, [1.0, 1.0, 1.0])
    v = torch.randn(G.shape[1])
    # A previous micro-batch's gradient stays and is added to.
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with engine(model, mode) as grads:
        stats = grads.backward(losses(model, data), [1.0, 1.0, 1.0], reference=v)
    torch.testing.assert_close(stats.reference_dots, G @ v.double(), rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n] + 1.0, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["buffer", "streaming"])
def test_non_finite_gradient_names_the_task(mode):
    model = tiny_model(0)
    data = batches(1)
    ls = losses(model, data)
    ls[2] = ls[2] * float("nan")
    with engine(model, mode) as grads, pytest.raises(NonFiniteGradientError, match="src2"):
        grads.backward(ls, [1.0, 1.0, 1.0])
    assert all(p.grad is None for p in model.shared_parameters())


def test_missing_loss_is_not_measured_and_hooks_are_inert_outside():
    model = tiny_model(0)
    data = batches(1)
    with engine(model, "streaming") as grads:
        ls = losses(model, data)
        stats = grads.backward([ls[0], None, ls[2]], [1.0, 5.0, 1.0])
        assert stats.measured.tolist() == [True, False, True]
        assert float(stats.sq_norms[1]) == 0.0
        model.zero_grad(set_to_none=True)
        # An ordinary backward while the object exists is untouched by its hooks.
        loss = losses(model, data)[1]
        loss.backward()
        plain = [p.grad.clone() for p in model.shared_parameters()]
    model.zero_grad(set_to_none=True)
    losses(model, data)[1].backward()
    for a, p in zip(plain, model.shared_parameters(), strict=True):
        assert torch.equal(a, p.grad)


def test_bad_arguments():
    model = tiny_model(0)
    with pytest.raises(ValueError, match="unknown mode"):
        TaskGradients(model.shared_parameters(), 3, mode="other")
    with pytest.raises(ValueError, match="num_tasks"):
        TaskGradients(model.shared_parameters(), 0)
    grads = TaskGradients(model.shared_parameters(), 3, mode="streaming")
    with pytest.raises(ValueError, match="needs the weights"):
        grads.backward(losses(model, batches()))
    with pytest.raises(ValueError, match="2 losses for 3 tasks"):
        grads.backward(losses(model, batches())[:2], [1, 1, 1])
    with pytest.raises(ValueError, match="3 tasks"):
        grads.backward(losses(model, batches()), [1, 1])
    grads.close()
    with pytest.raises(RuntimeError, match="combine"):
        TaskGradients(model.shared_parameters(), 3).combine([1, 1, 1])


def test_bf16_autocast():
    model = tiny_model(2)
    data = batches(3)
    with engine(model, "streaming") as grads:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ls = losses(model, data)
        stats = grads.backward(ls, [1.0, 1.0, 1.0])
    assert torch.isfinite(stats.sq_norms).all() and (stats.sq_norms > 0).all()
    assert all(p.grad.dtype == torch.float32 for p in model.shared_parameters())


def test_bf16_buffer_rounds_rows_not_weights():
    """A bf16 buffer holds each task's gradient rounded to bf16 (relative error <= 2^-8 per
    entry); the Gram accumulates in fp32 and the combination uses fp32 weights, so both match
    the fp32 computation on the rounded rows to fp32 accuracy."""
    torch.manual_seed(0)
    shared = torch.nn.Parameter(torch.randn(1000))
    data = torch.randn(3, 1000)
    losses = lambda: [(shared * d).sum() + (shared**2 * d).sum() for d in data]  # noqa: E731
    exact = TaskGradients([shared], 3, mode="buffer")
    exact_stats = exact.backward(losses())
    rows = exact.buffer.clone()
    exact.combine([0.5, 1.0 / 3.0, 2.0])
    want = shared.grad.clone()
    shared.grad = None
    exact.close()

    grads = TaskGradients([shared], 3, mode="buffer", buffer_dtype=torch.bfloat16)
    stats = grads.backward(losses())
    assert grads.buffer.dtype == torch.bfloat16
    rounded = rows.bfloat16().double()
    torch.testing.assert_close(grads.buffer.double(), rounded, rtol=0, atol=0)
    torch.testing.assert_close(stats.gram, rounded @ rounded.T, rtol=1e-6, atol=1e-6)
    # Against the unrounded Gram: each product carries two 2^-8 roundings.
    scale = exact_stats.gram.diagonal().sqrt()
    assert ((stats.gram - exact_stats.gram).abs() <= 2 * 2**-8 * torch.outer(scale, scale)).all()
    grads.combine([0.5, 1.0 / 3.0, 2.0])
    w = torch.tensor([0.5, 1.0 / 3.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(shared.grad.double(), w @ rounded, rtol=1e-6, atol=1e-6)
    assert (shared.grad - want).abs().max() <= 2**-8 * (w.abs() @ rows.double().abs()).max()
    grads.close()


def test_buffer_dtype_must_be_floating():
    shared = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="buffer_dtype must be one of"):
        TaskGradients([shared], 2, buffer_dtype=torch.int8)
