"""Shared input strategies: task matrices in every layout the ops must take."""

import torch
from hypothesis import strategies as st

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Odd, prime and awkward column counts around the kernels' lane and chunk boundaries.
COLUMNS = [0, 1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 33, 97, 127, 257, 1009, 4099, 8209, 20011]
LAYOUTS = ["contiguous", "column_slice", "strided", "transposed"]


def make_matrix(  # noqa: PLR0917
    rows: int, cols: int, dtype: torch.dtype, layout: str, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """A rows x cols matrix with the given memory layout; values exact in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        m = torch.randn(rows, cols, generator=gen)
    elif layout == "column_slice":  # a slice of a wider buffer: row stride != cols
        m = torch.randn(rows, cols + 7, generator=gen)[:, 3 : 3 + cols]
    elif layout == "strided":  # column stride 2
        m = torch.randn(rows, 2 * cols, generator=gen)[:, ::2]
    else:  # stored column-major
        m = torch.randn(cols, rows, generator=gen).T
    return m.to(device=device, dtype=dtype)


@st.composite
def task_matrices(draw, max_rows: int = 64):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.sampled_from(COLUMNS) | st.integers(0, 3000))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**31 - 1))
    return rows, cols, dtype, layout, seed


def gram_tolerance(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per-entry error bound for a dot-product matrix: a multiple of the unit roundoff of
    the accumulation dtype times sum_k |a_ik| |b_jk| (the classic bound is n * u; the
    kernels accumulate per 16-lane register and per L2 chunk, so ~1e3 * u is generous for
    fp32 and still tight enough to catch a wrong product)."""
    bound = a.double().abs() @ b.double().abs().T
    unit = torch.finfo(out_dtype).eps
    return 1e3 * unit * bound + 1e-30
