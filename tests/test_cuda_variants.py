"""CUDA kernels in every variant they dispatch to, against the float64 references.

The CUDA Gram kernel picks a template per (dtype, T, vector alignment): 4-, 8- and 16-row
upper triangles, 4-row cross tiles and 8 x 8 tile pairs, each with vector loads when every
row starts 16-byte aligned (8 for fp16/bf16) and element loads otherwise; the flat kernels
take 16-byte copies when both ends are aligned. The layouts below reach each of them: a
contiguous matrix (vector loads iff P * itemsize is a multiple of the vector width), the
TaskGradients buffer with its padded row stride (always vector loads), a column slice at
offset 4 (vector loads iff P is a multiple of the lane count) and at offset 1 (never), and
a matrix at an odd storage offset (element loads, but vector loads for fp64). Every byte of
a parent buffer outside the slice is NaN, so a kernel that reads the padding fails.

Tolerances follow the kernels' accumulation (csrc/ops/gram_cuda.cu): every fp32 (fp64)
accumulator adds at most kSliceProducts = 256 products, plus one from the ragged end, and
everything after that is summed in double; with u the unit roundoff of the accumulator,
an entry is off by at most about 257 u sum_k |a_k b_k|, plus the double stages and the
final rounding to the output dtype. The bound allows 300 u. Columns at the ends and on
every multiple of 4096 (every slice and chunk boundary of any power-of-two split) are
scaled by 1000, so a column that a kernel drops or adds twice moves an entry far beyond it.

Skipped without a CUDA device (the `cuda` marker, tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import pyxtask
from pyxtask import reference
from pyxtask.gradients import _padded_rows
from tests._inputs import FLOAT_DTYPES

pytestmark = pytest.mark.cuda

COLUMNS = [4096, 100_000, 1_000_003]
TASKS = [1, 3, 4, 5, 8, 9, 16, 17, 32, 64]
LAYOUTS = ["contiguous", "padded", "offset4", "offset1", "storage_offset"]
SPIKE = 1000.0
# Bound on the products one accumulator adds before its sum goes to double, with margin for
# the ragged end, the double stages and the rounding of the weights.
ACC_TERMS = 300


def unit(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounding(dtype: torch.dtype, exact: torch.Tensor) -> torch.Tensor:
    """Bound on the error of rounding `exact` to dtype: half an ulp, the subnormal spacing
    near zero."""
    info = torch.finfo(dtype)
    return unit(dtype) * exact.abs() + info.tiny * info.eps / 2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def spike_columns(m: torch.Tensor) -> None:
    """Scales the end columns and the columns either side of every multiple of 4096."""
    p = m.shape[-1]
    cols = {0, 1, p - 3, p - 2, p - 1}
    cols |= {c for k in range(4096, p, 4096) for c in (k - 1, k)}
    idx = torch.tensor(sorted(c for c in cols if 0 <= c < p), device=m.device)
    m[..., idx] *= SPIKE


def device_matrix(rows: int, cols: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """A rows x cols CUDA matrix in `layout`, values exact in dtype, NaN around it."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen, device="cuda")
    spike_columns(values)
    values = values.to(dtype)
    nan = float("nan")
    if layout == "contiguous":
        return values
    if layout == "padded":
        m = _padded_rows(rows, cols, dtype, torch.device("cuda"))
        m.as_strided((rows, m.stride(0)), (m.stride(0), 1)).fill_(nan)
    elif layout in ("offset4", "offset1"):
        start = 4 if layout == "offset4" else 1
        m = torch.full((rows, cols + 8), nan, dtype=dtype, device="cuda")[:, start : start + cols]
    else:
        flat = torch.full((rows * cols + 8,), nan, dtype=dtype, device="cuda")
        m = flat[3 : 3 + rows * cols].view(rows, cols)
    m.copy_(values)
    return m


def parent_of(m: torch.Tensor) -> torch.Tensor:
    """The whole storage m lives in, as a flat tensor (to check what a kernel left alone)."""
    return torch.empty(0, dtype=m.dtype, device=m.device).set_(m.untyped_storage())


def dot_tolerance(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Entrywise bound for a dot-product matrix computed as the CUDA kernels do (module doc).
    The float64 reference (cuBLAS) has its own rounding, at most P u64 sum |a_k b_k|."""
    bound = a.double().abs() @ b.double().abs().T
    u_acc = unit(acc_dtype(a.dtype))
    ref_terms = a.shape[1] if a.dtype == torch.float64 else 0
    exact = a.double() @ b.double().T
    return (ACC_TERMS + ref_terms) * u_acc * bound + rounding(out_dtype, exact)


def assert_within(out: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    err = (out.double() - ref).abs()
    bad = ~(err <= tol)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} entries off, worst error {float(err.max()):.3g} "
        f"(tolerance there {float(tol.flatten()[int(err.flatten().argmax())]):.3g}); first off: "
        f"error {float(err[bad].flatten()[0]):.3g}, tolerance {float(tol[bad].flatten()[0]):.3g}"
    )


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def check_untouched(m: torch.Tensor, before: torch.Tensor) -> None:
    assert same_bits(parent_of(m), before), "a kernel wrote into an input or its padding"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("rows", TASKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gram_family(dtype, rows, cols, layout):
    G = device_matrix(rows, cols, dtype, layout, seed=rows * 7919 + cols)
    other = max(1, (rows + 1) // 2)
    B = device_matrix(other, cols, dtype, layout, seed=cols + 13)
    before = parent_of(G).clone()
    out_dtype = acc_dtype(dtype)
    what = f"{dtype} T={rows} P={cols} {layout}"

    g = pyxtask.ops.gram(G)
    assert g.dtype == out_dtype and g.shape == (rows, rows) and g.is_cuda
    assert_within(g, reference.gram_reference(G), dot_tolerance(G, G, out_dtype), "gram " + what)
    assert torch.equal(g, g.T), "gram is not exactly symmetric: " + what
    # Same input, same device: the same bits (fixed slices, fixed summation order).
    assert torch.equal(g, pyxtask.ops.gram(G)), "gram is not deterministic: " + what

    x = pyxtask.ops.cross_gram(G, B)
    assert x.dtype == out_dtype and x.shape == (rows, other)
    assert_within(
        x, reference.cross_gram_reference(G, B), dot_tolerance(G, B, out_dtype), "cross " + what
    )

    c = pyxtask.ops.cosine_matrix(G)
    # |d cos| <= tau + |cos| tau with tau the relative bound of the sums (Cauchy-Schwarz:
    # sum |a_k b_k| <= |a| |b|), plus the rounding of the result.
    tau = ACC_TERMS * unit(acc_dtype(dtype)) + (cols * unit(dtype) if dtype == torch.float64 else 0)
    tol = torch.full_like(g, 2 * tau + 2 * unit(out_dtype), dtype=torch.float64)
    assert_within(c, reference.cosine_matrix_reference(G), tol, "cosine " + what)
    check_untouched(G, before)


@pytest.mark.parametrize("cols", [4096, 100_000])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gram_is_the_same_for_every_aligned_layout(dtype, cols):
    """The row stride and base address don't change the arithmetic: two layouts that both
    take the vector path give the same bits (a different path may round differently)."""
    for rows in TASKS:
        contiguous = device_matrix(rows, cols, dtype, "contiguous", seed=rows)
        for layout in ("padded", "offset4"):
            G = device_matrix(rows, cols, dtype, layout, seed=rows)
            assert torch.equal(pyxtask.ops.gram(G), pyxtask.ops.gram(contiguous)), (rows, layout)


def param_views(total: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Parameter-like CUDA tensors holding `total` elements: odd sizes at odd storage
    offsets of one buffer (so some are 16-byte aligned and some not), one transposed."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    small = [(1,), (3,), (5, 7), (4,), (13,)]
    rest = total - sum(math.prod(s) for s in small)
    first = rest // 3 // 4 * 4
    shapes = [small[0], (first,), small[1], small[2], (rest - first,), small[3], small[4]]
    buf = torch.randn(total + 2 * len(shapes), generator=gen, device="cuda")
    spike_columns(buf)
    buf = buf.to(dtype)
    out, at = [], 1
    for shape in shapes:
        n = math.prod(shape)
        piece = buf[at : at + n]
        # A 2-D shape is stored transposed: non-contiguous, it goes through ATen.
        out.append(piece.view(shape[1], shape[0]).T if len(shape) == 2 else piece.view(shape))
        at += n + 1
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gather_flat_into_a_row(dtype, cols, layout):
    rows = 3
    G = device_matrix(rows, cols, dtype, layout, seed=cols)
    tensors = param_views(cols, dtype, seed=cols + 1)
    # One tensor of another dtype: converted through ATen.
    tensors[1] = tensors[1].to(torch.float32 if dtype != torch.float32 else torch.float64)
    row = G[1]
    expected = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    # The whole storage afterwards: the row gathered, every other byte (rows 0 and 2, the
    # NaN padding) as it was.
    after = parent_of(G).clone()
    after.as_strided(row.shape, row.stride(), row.storage_offset()).copy_(expected)
    pyxtask.ops.gather_flat(tensors, row)
    assert torch.equal(row, expected), f"{dtype} P={cols} {layout}"
    assert same_bits(parent_of(G), after), f"gather_flat wrote outside its row: {layout}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("rows", TASKS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_combination(dtype, rows, cols, layout):
    G = device_matrix(rows, cols, dtype, layout, seed=rows + cols)
    before = parent_of(G).clone()
    w = torch.rand(rows, dtype=torch.float64, device="cuda") - 0.3
    what = f"{dtype} T={rows} P={cols} {layout}"
    acc = acc_dtype(dtype)
    # |error| <= (T + 2) u_acc (|dst| + sum_t |w_t g_t|) (T ordered multiply-adds and the
    # rounding of the weights to the accumulator) + the rounding to the target's dtype.
    magnitude = w.abs() @ G.double().abs()
    for accumulate in (False, True):
        targets = param_views(cols, dtype, seed=rows)
        targets[-1] = targets[-1].to(torch.float32 if dtype != torch.float32 else torch.float64)
        start = [t.clone() for t in targets]
        expected = reference.scatter_combination_reference(G, w, start, accumulate)
        pyxtask.ops.scatter_combination(G, w, targets, accumulate=accumulate)
        offset = 0
        for t, s, e in zip(targets, start, expected, strict=True):
            n = t.numel()
            mag = magnitude[offset : offset + n].reshape(t.shape)
            if accumulate:
                mag = mag + s.double().abs()
            tol = (rows + 2) * 2 * unit(acc) * mag + rounding(t.dtype, e)
            if accumulate and not t.is_contiguous():
                # Computed into a contiguous twin, added back in t's dtype: one more rounding.
                tol = tol + rounding(t.dtype, e - s.double())
            assert_within(t, e, tol, f"scatter accumulate={accumulate} {what} {tuple(t.shape)}")
            offset += n
    check_untouched(G, before)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cols", COLUMNS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_scaled_from_buffer_rows(dtype, cols, layout):
    """Vectors that are pieces of a buffer row (contiguous, at every storage offset)."""
    G = device_matrix(2, cols, dtype, layout, seed=cols + 5)
    tensors = param_views(cols, dtype, seed=cols + 6)
    vectors, at = [], 0
    for t in tensors:
        vectors.append(G[1, at : at + t.numel()].view(t.shape))
        at += t.numel()
    start = [t.clone() for t in tensors]
    alpha = -0.37
    pyxtask.ops.add_scaled_(tensors, vectors, alpha)
    expected = reference.add_scaled_reference(start, vectors, alpha)
    u_acc = unit(acc_dtype(dtype))
    for t, s, v, e in zip(tensors, start, vectors, expected, strict=True):
        # One multiply and one add in the accumulator dtype (2 u), then one rounding.
        tol = 2 * u_acc * (s.double().abs() + abs(alpha) * v.double().abs()) + rounding(dtype, e)
        assert_within(t, e, tol, f"add_scaled_ {dtype} P={cols} {layout} {tuple(t.shape)}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_add_scaled_with_a_vector_that_is_its_tensor(dtype):
    """t += alpha * t: the fused kernel's __restrict__ rules it out, ATen takes it."""
    x = param_views(100_003, dtype, seed=1)
    start = [t.clone() for t in x]
    pyxtask.ops.add_scaled_(x, x, 0.5)
    for t, s in zip(x, start, strict=True):
        e = 1.5 * s.double()
        assert_within(t, e, 2 * unit(acc_dtype(dtype)) * e.abs() + rounding(dtype, e), "alias")


# -- per-sample gradient products (csrc/ops/sample_products_cuda.cu) ------------------------
# One block per sample; the linear norms take the batch's L x L Grams or, when
# L (I + O) > I O, the per-sample gradients a chunk of samples at a time (chunks of
# 2^24 / (I O) samples: I = O = 4096 gives one sample per chunk). Inputs are rounded to
# their dtype first, so the float64 reference sees exactly what the kernels see; half
# inputs are widened to float32. Each product sum is off by at most ~(terms) u sum |terms|.


def sample_mask(B: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """Right padding, holes and one sample with no real position."""
    lengths = torch.randint(0, L + 1, (B,), generator=gen)
    mask = torch.arange(L)[None] < lengths[:, None]
    mask[B // 2] = torch.rand(L, generator=gen) < 0.5
    mask[-1] = False
    return mask


SAMPLE_SHAPES = [
    (1, 1, 1, 1),
    (3, 7, 33, 5),
    (32, 128, 384, 1536),
    (5, 200, 8, 8),
    (2, 9, 4096, 4096),
]


@pytest.mark.parametrize(("B", "L", "I", "O"), SAMPLE_SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_linear_sample_products(dtype, B, L, I, O):  # noqa: E741
    gen = torch.Generator().manual_seed(B * L + I + O)
    a = torch.randn(B, L, I, generator=gen).to(dtype)
    d = torch.randn(B, L, O, generator=gen).to(dtype)
    v = torch.randn(O, I, generator=gen).to(dtype)
    mask = sample_mask(B, L, gen)
    m = mask.double()
    u = unit(acc_dtype(dtype))
    expected = reference.linear_sample_dots_reference(a, d, v, mask)
    bound = torch.einsum(
        "blo,oi,bli,bl->b", d.double().abs(), v.double().abs(), a.double().abs(), m
    )
    got = pyxtask.ops.linear_sample_dots(a.cuda(), d.cuda(), v.cuda(), mask.cuda())
    assert got.dtype == acc_dtype(dtype) and got.shape == (B,)
    assert_within(got.cpu(), expected, (I + O + L + 4) * u * bound, f"dots {dtype} {B, L, I, O}")
    expected_sq = reference.linear_sample_sq_norms_reference(a, d, mask)
    sq_bound = torch.einsum("blo,bli,bl->b", d.double().abs(), a.double().abs(), m) ** 2
    for method in ("gram", "materialize", "auto"):
        sq = pyxtask.ops.linear_sample_sq_norms(a.cuda(), d.cuda(), mask.cuda(), method)
        tol = (I + O + L * L + 4) * u * sq_bound
        assert_within(sq.cpu(), expected_sq, tol, f"sq_norms {method} {dtype} {B, L, I, O}")
    assert float(sq[-1]) == 0.0


@pytest.mark.parametrize(
    ("B", "L", "H", "rows"), [(1, 1, 1, 1), (4, 9, 33, 3), (32, 128, 384, 30522)]
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_embedding_sample_products(dtype, B, L, H, rows):
    gen = torch.Generator().manual_seed(B + L + H)
    ids = torch.randint(0, min(rows, 7), (B, L), generator=gen)  # ids repeat in a sample
    d = torch.randn(B, L, H, generator=gen).to(dtype)
    v = torch.randn(rows, H, generator=gen).to(dtype)
    mask = sample_mask(B, L, gen)
    m = mask.double()
    u = unit(acc_dtype(dtype))
    bound = torch.einsum("blh,blh,bl->b", d.double().abs(), v.double().abs()[ids], m)
    got = pyxtask.ops.embedding_sample_dots(ids.cuda(), d.cuda(), v.cuda(), mask.cuda())
    expected = reference.embedding_sample_dots_reference(ids, d, v, mask)
    assert_within(got.cpu(), expected, (H + L + 4) * u * bound, f"embedding dots {dtype}")
    sq = pyxtask.ops.embedding_sample_sq_norms(ids.cuda(), d.cuda(), mask.cuda())
    expected_sq = reference.embedding_sample_sq_norms_reference(ids, d, mask)
    sq_bound = torch.einsum("blh,bl->b", d.double().abs(), m) ** 2 * H
    assert_within(sq.cpu(), expected_sq, (H + L + 4) * u * sq_bound, f"embedding sq {dtype}")
    bad = ids.clone()
    bad[0, 0] = rows
    with pytest.raises(RuntimeError, match="is not a row of v"):
        pyxtask.ops.embedding_sample_dots(bad.cuda(), d.cuda(), v.cuda(), None)


def test_sample_gradient_products_on_cuda_match_the_cpu():
    """The whole module on a small BERT: CUDA against CPU, float64."""
    import transformers

    from pyxtask.sample_gradients import SampleGradientProducts

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertModel(config, add_pooling_layer=False).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (6, 12), generator=gen)
    mask = sample_mask(6, 12, gen).long()
    mask[:, 0] = 1
    vector = {
        n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()
    }
    results = []
    for device in ("cpu", "cuda"):
        model.to(device)
        products = SampleGradientProducts(model)
        on = {n: t.to(device) for n, t in vector.items()}

        def losses(device=device):
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            return (out.square().sum(-1) * mask.to(device)).sum(1)

        dots, sq = products.measure(losses, on, mask.to(device))
        results.append((dots.cpu(), sq.cpu()))
    (cpu_dots, cpu_sq), (gpu_dots, gpu_sq) = results
    assert torch.allclose(gpu_dots, cpu_dots, rtol=1e-9, atol=1e-9 * float(cpu_dots.abs().max()))
    assert torch.allclose(gpu_sq, cpu_sq, rtol=1e-9)
