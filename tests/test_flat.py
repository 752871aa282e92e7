import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyxtask
from pyxtask import reference
from tests._inputs import FLOAT_DTYPES


@st.composite
def tensor_lists(draw):
    """Lists of tensors like a model's parameters: mixed shapes, some non-contiguous."""
    n = draw(st.integers(0, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
        dtype = draw(st.sampled_from(FLOAT_DTYPES))
        kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
        if kind == "transposed" and len(shape) >= 2:
            t = torch.randn(tuple(reversed(shape)), generator=gen).transpose(0, -1)
        elif kind == "sliced" and len(shape) >= 1:
            t = torch.randn((*shape[:-1], 2 * shape[-1] + 1), generator=gen)[..., 1::2]
        else:
            t = torch.randn(tuple(shape), generator=gen)
        out.append(t.to(dtype))
    return out


def rounding(dtype):
    return {torch.float64: 0.0, torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}[
        dtype
    ]


@given(tensor_lists(), st.sampled_from(FLOAT_DTYPES))
def test_gather_flat_matches_reference(tensors, out_dtype):
    out = torch.full((sum(t.numel() for t in tensors),), float("nan"), dtype=out_dtype)
    pyxtask.ops.gather_flat(tensors, out)
    expected = reference.gather_flat_reference(tensors)
    # Exact when no dtype conversion is involved, else one rounding to out's dtype.
    # (subnormal results have absolute, not relative, spacing).
    info = torch.finfo(out_dtype)
    assert torch.allclose(
        out.double(), expected, rtol=rounding(out_dtype), atol=info.tiny * info.eps
    )


def test_gather_flat_into_a_row_of_a_task_buffer():
    params = [torch.randn(3, 4), torch.randn(5, 2).T, torch.randn(4, 6)[:, ::2]]
    buf = torch.zeros(3, 34)
    pyxtask.ops.gather_flat(params, buf[1])
    assert torch.equal(buf[1], torch.cat([p.reshape(-1) for p in params]))
    assert torch.equal(buf[0], torch.zeros(34)) and torch.equal(buf[2], torch.zeros(34))


@given(
    tensor_lists(),
    st.integers(1, 64),
    st.booleans(),
    st.integers(0, 2**31 - 1),
    st.sampled_from(FLOAT_DTYPES),
)
def test_scatter_combination_matches_reference(tensors, rows, accumulate, seed, g_dtype):
    gen = torch.Generator().manual_seed(seed)
    p = sum(t.numel() for t in tensors)
    G = torch.randn(rows, p + 3, generator=gen)[:, 2 : 2 + p].to(g_dtype)  # sliced rows
    w = torch.rand(rows, generator=gen)
    before = [t.clone() for t in tensors]
    expected = reference.scatter_combination_reference(G, w, before, accumulate)
    pyxtask.ops.scatter_combination(G, w, tensors, accumulate)
    for got, exp, t in zip(tensors, expected, before, strict=True):
        assert got.shape == t.shape and got.dtype == t.dtype
        # fp32 accumulation over <= 64 rows, then one rounding to the tensor's dtype.
        scale = (w.double() @ G.double().abs()).max().item() if p else 0.0
        tol = rounding(t.dtype) * (exp.abs() + scale) + 64 * 2e-7 * scale
        assert bool(((got.double() - exp).abs() <= tol).all())


def test_gather_then_scatter_round_trip():
    params = [torch.randn(7, 3), torch.randn(2, 5).T, torch.randn(11)]
    G = torch.zeros(2, 42)
    pyxtask.ops.gather_flat(params, G[0])
    targets = [torch.zeros_like(p) for p in params]
    pyxtask.ops.scatter_combination(G, torch.tensor([1.0, 0.0]), targets)
    for p, t in zip(params, targets, strict=True):
        assert torch.equal(p, t)


@given(tensor_lists(), st.floats(-10, 10), st.integers(0, 2**31 - 1))
def test_add_scaled_matches_reference(tensors, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    vectors = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in tensors]
    expected = reference.add_scaled_reference(tensors, vectors, alpha)
    pyxtask.ops.add_scaled_(tensors, vectors, alpha)
    for got, exp in zip(tensors, expected, strict=True):
        tol = rounding(got.dtype) * exp.abs() + 4e-7 * (1 + abs(alpha)) * (exp.abs() + 1)
        assert bool(((got.double() - exp).abs() <= tol).all())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: pyxtask.ops.gather_flat([torch.ones(3)], torch.zeros(4)),
            "pyxtask.gather_flat: the tensors hold 3 elements but out has 4",
        ),
        (
            lambda: pyxtask.ops.gather_flat([torch.ones(3)], torch.zeros(3, 1)),
            "pyxtask.gather_flat: out must be 1-D",
        ),
        (
            lambda: pyxtask.ops.gather_flat([torch.ones(3, dtype=torch.int32)], torch.zeros(3)),
            "pyxtask.gather_flat: tensors[0] must be a floating-point tensor",
        ),
        (
            lambda: pyxtask.ops.scatter_combination(
                torch.ones(2, 3), torch.ones(3), [torch.ones(3)]
            ),
            "pyxtask.scatter_combination: weights must be a 1-D tensor with one entry per row of G",
        ),
        (
            lambda: pyxtask.ops.scatter_combination(
                torch.ones(2, 3), torch.ones(2), [torch.ones(2)]
            ),
            "pyxtask.scatter_combination: the tensors hold 2 elements but G has 3 columns",
        ),
        (
            lambda: pyxtask.ops.scatter_combination(
                torch.ones(65, 1), torch.ones(65), [torch.ones(1)]
            ),
            "pyxtask.scatter_combination: G has 65 rows",
        ),
        (
            lambda: pyxtask.ops.add_scaled_([torch.ones(2)], [torch.ones(3)], 1.0),
            "pyxtask.add_scaled_: tensors[0] has shape [2] but vectors[0] has shape [3]",
        ),
        (
            lambda: pyxtask.ops.add_scaled_([torch.ones(2)], [torch.ones(2, device="meta")], 1.0),
            "pyxtask.add_scaled_: vectors[0] is on meta but tensors[0] is on cpu",
        ),
        (
            lambda: pyxtask.ops.add_scaled_([torch.ones(2)], [], 1.0),
            "pyxtask.add_scaled_: got 1 tensors but 0 vectors",
        ),
    ],
)
def test_flat_ops_reject_bad_input(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.cuda
def test_flat_ops_cuda_match_cpu():
    params = [torch.randn(70, 33), torch.randn(5, 9).T, torch.randn(1000).to(torch.bfloat16)]
    cuda_params = [p.cuda() for p in params]
    out = pyxtask.ops.gather_flat(params, torch.empty(2310 + 45 + 1000))
    out_gpu = pyxtask.ops.gather_flat(cuda_params, torch.empty(3355, device="cuda"))
    assert torch.equal(out, out_gpu.cpu())
    G, w = torch.randn(3, 3355), torch.rand(3)
    pyxtask.ops.scatter_combination(G, w, params, accumulate=True)
    pyxtask.ops.scatter_combination(G.cuda(), w.cuda(), cuda_params, accumulate=True)
    for p, q in zip(params, cuda_params, strict=True):
        assert torch.allclose(
            p.double(),
            q.cpu().double(),
            rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5,
            atol=1e-5,
        )
    pyxtask.ops.add_scaled_(params, params, 0.5)
    pyxtask.ops.add_scaled_(cuda_params, cuda_params, 0.5)
    for p, q in zip(params, cuda_params, strict=True):
        assert torch.allclose(p.double(), q.cpu().double(), rtol=1e-2, atol=1e-4)
