import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyxtask
from pyxtask import reference
from tests._inputs import FLOAT_DTYPES, LAYOUTS, gram_tolerance, make_matrix, task_matrices


def expected_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@given(task_matrices())
def test_gram_matches_reference(case):
    rows, cols, dtype, layout, seed = case
    G = make_matrix(rows, cols, dtype, layout, seed)
    out = pyxtask.ops.gram(G)
    assert out.dtype == expected_dtype(dtype)
    assert out.shape == (rows, rows)
    err = (out.double() - reference.gram_reference(G)).abs()
    assert bool((err <= gram_tolerance(G, G, out.dtype)).all()), err.max()
    # Symmetric exactly (the kernel computes the upper triangle and mirrors it) and PSD.
    assert torch.equal(out, out.T)
    if rows > 0 and cols > 0:
        eig = torch.linalg.eigvalsh(out.double())
        assert float(eig.min()) >= -1e-4 * max(1.0, float(eig.abs().max()))


@given(task_matrices(), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_cross_gram_matches_reference(case, other_rows, other_seed):
    rows, cols, dtype, layout, seed = case
    A = make_matrix(rows, cols, dtype, layout, seed)
    B = make_matrix(other_rows, cols, dtype, "contiguous", other_seed)
    out = pyxtask.ops.cross_gram(A, B)
    assert out.dtype == expected_dtype(dtype)
    err = (out.double() - reference.cross_gram_reference(A, B)).abs()
    assert bool((err <= gram_tolerance(A, B, out.dtype)).all()), err.max()


@given(task_matrices(), st.sets(st.integers(0, 63), max_size=3))
def test_cosine_matrix_matches_reference(case, zero_rows):
    rows, cols, dtype, layout, seed = case
    G = make_matrix(rows, cols, dtype, layout, seed)
    for r in zero_rows:
        if r < rows:
            G[r] = 0
    out = pyxtask.ops.cosine_matrix(G)
    assert not bool(out.isnan().any())
    ref = reference.cosine_matrix_reference(G)
    nonzero = G.double().abs().sum(1) > 0
    assert torch.equal(out.diagonal() == 1, nonzero)
    assert bool((out[~nonzero] == 0).all()) and bool((out[:, ~nonzero] == 0).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    # Cosines of near-parallel long vectors lose relative accuracy; compare absolutely.
    assert (float((out.double() - ref).abs().amax()) if out.numel() else 0.0) <= tol


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gram_large_p_accumulates_in_fp32_or_better(dtype, layout):
    # 2e5 columns of ones-ish data: an fp16/bf16 accumulator would be off by percent.
    G = make_matrix(5, 200_003, dtype, layout, seed=1).abs()
    out = pyxtask.ops.gram(G)
    ref = reference.gram_reference(G)
    rel = ((out.double() - ref).abs() / ref.abs()).max()
    assert float(rel) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_gram_of_64_rows_and_empty_columns():
    assert torch.equal(pyxtask.ops.gram(torch.zeros(64, 0)), torch.zeros(64, 64))
    assert pyxtask.ops.gram(torch.zeros(0, 5)).shape == (0, 0)


def test_gram_gradients():
    G = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(pyxtask.ops.gram, (G,))
    torch.autograd.gradcheck(pyxtask.ops.cross_gram, (G, B))
    torch.autograd.gradcheck(pyxtask.ops.cosine_matrix, (G,))
    Z = torch.cat([torch.zeros(1, 9, dtype=torch.float64), G.detach()]).requires_grad_()
    pyxtask.ops.cosine_matrix(Z).sum().backward()
    assert Z.grad is not None and torch.equal(Z.grad[0], torch.zeros(9, dtype=torch.float64))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: pyxtask.ops.gram(torch.randn(5)), "pyxtask.gram: G must be a 2-D"),
        (lambda: pyxtask.ops.gram(torch.randn(65, 3)), "pyxtask.gram: G has 65 rows; at most 64"),
        (
            lambda: pyxtask.ops.gram(torch.ones(2, 3, dtype=torch.int64)),
            "pyxtask.gram: G must be float32",
        ),
        (
            lambda: pyxtask.ops.gram(torch.tensor([[1.0, float("nan")]])),
            "pyxtask.gram: G contains NaN or Inf (row 0)",
        ),
        (
            lambda: pyxtask.ops.cross_gram(torch.randn(2, 3), torch.randn(2, 4)),
            "pyxtask.cross_gram: A and B must have the same number of columns",
        ),
        (
            lambda: pyxtask.ops.cross_gram(
                torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)
            ),
            "pyxtask.cross_gram: A is Float but B is Double",
        ),
        (
            lambda: pyxtask.ops.cross_gram(torch.randn(2, 3), torch.randn(2, 3, device="meta")),
            "pyxtask.cross_gram: A is on cpu but B is on meta",
        ),
        (
            lambda: pyxtask.ops.cosine_matrix(torch.randn(2, 2, 2)),
            "pyxtask.cosine_matrix: G must be a 2-D",
        ),
    ],
)
def test_gram_family_rejects_bad_input(call, message):
    with pytest.raises(RuntimeError) as info:
        call()
    assert message in str(info.value)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gram_family_cuda_matches_cpu(dtype):
    for rows, cols in [(1, 1), (7, 1009), (16, 100_003), (64, 4099), (33, 0)]:
        G = make_matrix(rows, cols, dtype, "column_slice", seed=rows)
        B = make_matrix(5, cols, dtype, "contiguous", seed=cols)
        for fn, args in [
            (pyxtask.ops.gram, (G,)),
            (pyxtask.ops.cross_gram, (G, B)),
            (pyxtask.ops.cosine_matrix, (G,)),
        ]:
            cpu = fn(*args)
            gpu = fn(*(a.cuda() for a in args)).cpu()
            tol = 1e-10 if dtype == torch.float64 else 1e-5
            scale = max(1.0, float(cpu.abs().amax())) if cpu.numel() else 1.0
            assert gpu.numel() == 0 or float((gpu - cpu).abs().amax()) <= tol * scale
