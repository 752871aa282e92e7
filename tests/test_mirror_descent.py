import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyxtask
from pyxtask import reference


@st.composite
def weights_and_grads(draw):
    n = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen, dtype=torch.float64)
    w[torch.rand(n, generator=gen) < draw(st.floats(0, 0.5))] = 0  # some zero weights
    if float(w.sum()) == 0:
        w[0] = 1
    w = w / w.sum()
    g = torch.randn(n, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1, 1e3]))
    lr = draw(st.sampled_from([0.0, 0.1, 1.0, 10.0]))
    return w.to(dtype), g.to(dtype), lr


@given(weights_and_grads())
def test_mirror_descent_matches_reference_and_stays_on_simplex(case):
    w, g, lr = case
    out = pyxtask.ops.mirror_descent_step(w, g, lr)
    assert out.dtype == w.dtype and out.shape == w.shape
    ref = reference.mirror_descent_step_reference(w, g, lr)
    tol = 1e-12 if w.dtype == torch.float64 else 1e-6
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)
    assert bool((out >= 0).all())
    assert abs(float(out.double().sum()) - 1) <= 10 * tol
    assert torch.equal(out[w == 0], torch.zeros_like(out[w == 0]))  # zero stays zero


@given(weights_and_grads(), st.floats(-1e4, 1e4))
def test_mirror_descent_is_invariant_to_shifting_the_gradient(case, shift):
    w, g, lr = case
    w, g = w.double(), g.double()
    a = pyxtask.ops.mirror_descent_step(w, g, lr)
    b = pyxtask.ops.mirror_descent_step(w, g + shift, lr)
    # Shifting g by c multiplies every term by exp(-lr c): cancelled by the normalisation,
    # up to the rounding of g + c.
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * (1 + abs(shift) * lr))


def test_mirror_descent_survives_huge_steps():
    w = torch.tensor([0.25, 0.25, 0.5, 0.0])
    out = pyxtask.ops.mirror_descent_step(w, torch.tensor([1e4, -1e4, 0.0, -1e4]), 1.0)
    assert torch.equal(out, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    out = pyxtask.ops.mirror_descent_step(w, torch.tensor([-1e4, -1e4, 0.0, 0.0]), 1.0)
    assert torch.allclose(out, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_mirror_descent_ten_million_samples():
    n = 10_000_000
    gen = torch.Generator().manual_seed(0)
    w = torch.full((n,), 1.0 / n)
    g = torch.randn(n, generator=gen)
    out = pyxtask.ops.mirror_descent_step(w, g, 2.0)
    ref = reference.mirror_descent_step_reference(w, g, 2.0)
    assert float((out.double() - ref).abs().max()) <= 1e-6 * float(ref.max())
    assert abs(float(out.double().sum()) - 1) < 1e-4


@pytest.mark.parametrize(
    ("w", "g", "lr", "message"),
    [
        (
            [0.5, 0.5],
            [0.0, float("nan")],
            1.0,
            "pyxtask.mirror_descent_step: grads[1] = nan is not finite",
        ),
        ([0.5, float("inf")], [0.0, 0.0], 1.0, "pyxtask.mirror_descent_step: weights[1] = inf"),
        ([0.5, -0.1], [0.0, 0.0], 1.0, "weights must be finite and non-negative"),
        ([0.0, 0.0], [0.0, 0.0], 1.0, "pyxtask.mirror_descent_step: all weights are zero"),
        ([0.5, 0.5], [0.0, 0.0], float("inf"), "pyxtask.mirror_descent_step: lr must be finite"),
        (
            [0.5, 0.5],
            [0.0],
            1.0,
            "pyxtask.mirror_descent_step: grads has shape [1] but weights has shape [2]",
        ),
        ([], [], 1.0, "pyxtask.mirror_descent_step: weights must hold at least one entry"),
    ],
)
def test_mirror_descent_rejects_bad_input(w, g, lr, message):
    with pytest.raises(RuntimeError) as info:
        pyxtask.ops.mirror_descent_step(torch.tensor(w), torch.tensor(g), lr)
    assert message in str(info.value)


def test_mirror_descent_rejects_integer_and_2d_weights():
    with pytest.raises(
        RuntimeError, match=r"pyxtask\.mirror_descent_step: weights must be float32"
    ):
        pyxtask.ops.mirror_descent_step(torch.ones(2, dtype=torch.int64), torch.zeros(2), 1.0)
    with pytest.raises(RuntimeError, match=r"pyxtask\.mirror_descent_step: weights must be 1-D"):
        pyxtask.ops.mirror_descent_step(torch.ones(2, 2), torch.zeros(2, 2), 1.0)


@pytest.mark.cuda
def test_mirror_descent_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(1_000_003, generator=gen, dtype=torch.float64)
    w[::7] = 0
    g = torch.randn(1_000_003, generator=gen, dtype=torch.float64) * 100
    cpu = pyxtask.ops.mirror_descent_step(w, g, 1.0)
    gpu = pyxtask.ops.mirror_descent_step(w.cuda(), g.cuda(), 1.0).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-10, atol=1e-15)
    with pytest.raises(RuntimeError, match="is not finite"):
        g[5] = float("nan")
        pyxtask.ops.mirror_descent_step(w.cuda(), g.cuda(), 1.0)
