"""Benchmarks every pyxtask op against its float64 reference, the plain-torch way, and peers.

Run ``python benchmarks/bench_ops.py`` (full, a few minutes on 2 cores) or ``--quick`` (a
CI smoke run under a minute). Tables go to stdout, a tqdm bar to stderr, and everything,
with machine information, to ``benchmarks/results/bench_ops.json``. See
``benchmarks/README.md`` for what each column means and the acceptance targets.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from pyxtask import ops, reference
from pyxtask.bench._machine import machine_info
from pyxtask.bench.peers import load_libmtl

DEFAULT_OUT = Path("bench") / "bench_ops.json"
OPS = ops.OP_NAMES
GRAM_FAMILY = ("gram", "cross_gram", "cosine_matrix")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}

# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Best-of-k seconds per call; ``reps`` samples of ``number`` calls each were taken."""

    best_s: float | None = None
    median_s: float | None = None
    reps: int = 0
    number: int = 0
    error: str | None = None


@dataclass
class Timer:
    """The one timing helper: warm-up, then best-of-k wall time, synchronised on CUDA."""

    device: torch.device
    min_reps: int = 5
    max_reps: int = 15
    budget_s: float = 0.5  # extra samples past min_reps only while under this budget
    min_sample_s: float = 2e-3  # tiny ops are looped so one sample outlasts timer noise

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _sample(self, fn: Callable[[], object], number: int) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        self._sync()
        return (time.perf_counter() - start) / number

    def __call__(self, fn: Callable[[], object], min_reps: int | None = None) -> Timing:
        """Times ``fn``; ``min_reps=1`` (the float64 references) lets a slow call run once."""
        min_reps = self.min_reps if min_reps is None else min_reps
        try:
            first = self._sample(fn, 1)
            if min_reps == 1 and first > self.budget_s:
                # A multi-second float64 oracle: its first call is as warm as it gets (each
                # call page-faults fresh buffers anyway), so it is the one sample.
                return Timing(first, first, 1, 1)
            first = min(first, self._sample(fn, 1))  # the first call paid for lazy init
            number = max(1, math.ceil(self.min_sample_s / max(first, 1e-9)))
            samples: list[float] = []
            start = time.perf_counter()
            while len(samples) < min_reps or (
                len(samples) < self.max_reps and time.perf_counter() - start < self.budget_s
            ):
                samples.append(self._sample(fn, number))
            return Timing(min(samples), statistics.median(samples), len(samples), number)
        except Exception as exc:  # a peer or reference that cannot run here
            return Timing(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])


# ---------------------------------------------------------------------------------------------
# Inputs


class Pool:
    """One random fp32 buffer that every big G is a contiguous prefix view of.

    Filling 2.56 GB with randn costs seconds on two cores, so it is done once instead of per
    shape; the per-shape temporaries (float64 copies, outputs) die with each case. One copy
    in another dtype is cached at a time (converted once at its largest size).
    """

    def __init__(self, device: torch.device, need: dict[torch.dtype, int]) -> None:
        self.device = device
        self.need = need
        self._fp32: Tensor | None = None
        self._other: tuple[torch.dtype, Tensor] | None = None

    def flat(self, dtype: torch.dtype, numel: int) -> Tensor:
        if self._fp32 is None:
            gen = torch.Generator(device=self.device).manual_seed(0)
            size = self.need[torch.float32]
            self._fp32 = torch.empty(size, device=self.device).normal_(generator=gen)
        if dtype == torch.float32:
            return self._fp32[:numel]
        if self._other is None or self._other[0] != dtype:
            self._other = None  # free the previous copy before making the next
            self._other = (dtype, self._fp32[: self.need[dtype]].to(dtype))
        return self._other[1][:numel]

    def matrix(self, dtype: torch.dtype, rows: int, cols: int, first_row: int = 0) -> Tensor:
        buf = self.flat(dtype, (first_row + rows) * cols)
        return buf[first_row * cols :].view(rows, cols)

    def release(self) -> None:
        self._fp32 = self._other = None


def param_shapes(n: int) -> list[tuple[int, ...]]:
    """Parameter-like shapes summing to n: weight matrices of falling size, each with a bias."""
    shapes: list[tuple[int, ...]] = []
    left = n
    for frac in (0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015):
        rows = max(1, int(math.sqrt(n * frac / 4)))
        cols = max(1, int(n * frac) // rows)
        if rows * cols + rows > left:
            break
        shapes += [(rows, cols), (rows,)]
        left -= rows * cols + rows
    return [*shapes, (left,)] if left else shapes


def make_tensors(n: int, device: torch.device, seed: int) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, generator=gen, device=device) for s in param_shapes(n)]


# ---------------------------------------------------------------------------------------------
# Peers (installed from PyPI with --no-deps)


def torchjd_mgda() -> Callable[[Tensor], Tensor] | str:
    try:
        aggregation = importlib.import_module("torchjd.aggregation")
    except ImportError as exc:
        return f"torchjd unavailable: {exc}"
    return cast(
        Callable[[Tensor], Tensor], aggregation.MGDAWeighting()
    )  # its defaults: epsilon=1e-3, max_iters=100


def libmtl_min_norm() -> Callable[[Tensor], Tensor | None] | str:
    """LibMTL's MGDA ``_find_min_norm_element``, loaded without ``import LibMTL``.

    The package ``__init__`` imports torchvision APIs that no longer exist, so the two module
    files MGDA.py needs are loaded on their own and registered under their dotted names.
    """
    try:
        solver = load_libmtl("MGDA").MGDA()
    except ImportError:
        return "LibMTL not installed"
    except Exception as exc:
        return f"LibMTL's MGDA.py does not load: {exc}"
    # It takes the T x P gradients (and forms grads @ grads.T itself), returns None when it
    # hits its MAX_ITER = 250, and makes its iterate with torch.zeros(n): fp32 only.
    return cast(Callable[[Tensor], Tensor | None], solver._find_min_norm_element)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    op: str
    dtype: str
    shape: dict[str, int]
    run: Callable[[Timer], dict[str, Any]]
    pool_need: dict[torch.dtype, int] = field(default_factory=dict)  # pool elements it views

    @property
    def label(self) -> str:
        return f"{self.op} {self.dtype} " + " ".join(f"{k}={v}" for k, v in self.shape.items())


# Past this many input elements the float64 reference is not timed: its float64 copy alone is
# 2.56 GB+ and one call takes 4-8 s on two cores (tens under load), a third of the whole run,
# while the smaller shapes already show how it scales.
REFERENCE_MAX_ELEMENTS = 2 * 10**8


def timed(
    timer: Timer, impls: Mapping[str, Callable[[], object]], elements: int = 0
) -> dict[str, Timing]:
    out: dict[str, Timing] = {}
    for name, fn in impls.items():
        if name == "reference" and elements > REFERENCE_MAX_ELEMENTS:
            out[name] = Timing(
                error=f"skipped: {elements:.1e} > {REFERENCE_MAX_ELEMENTS:.0e} elements"
            )
        else:
            # Only the float64 reference may drop to one rep: it is the oracle, not a contender.
            out[name] = timer(fn, min_reps=1 if name == "reference" else None)
    return out


def gram_case(op: str, dtype: str, t: int, p: int, pool: Pool) -> Case:
    rows = 2 * t if op == "cross_gram" else t

    def run(timer: Timer) -> dict[str, Any]:
        dt = DTYPES[dtype]
        both = pool.matrix(dt, rows, p)  # A and B are adjacent: one buffer, one G.sum()
        a, b = both[:t], both[t:]
        impls: dict[str, Callable[[], object]]
        if op == "gram":
            impls = {
                "pyxtask": lambda: ops.gram(a),
                "reference": lambda: reference.gram_reference(a),
                "baseline": lambda: torch.mm(a, a.T),
            }
        elif op == "cross_gram":
            impls = {
                "pyxtask": lambda: ops.cross_gram(a, b),
                "reference": lambda: reference.cross_gram_reference(a, b),
                "baseline": lambda: torch.mm(a, b.T),
            }
        else:
            impls = {
                "pyxtask": lambda: ops.cosine_matrix(a),
                "reference": lambda: reference.cosine_matrix_reference(a),
                "baseline": lambda: torch.mm(a, a.T),
            }
        # The streaming-read ceiling, measured on the very buffer the op then reads.
        sums = {"sum_same": timer(both.sum)}
        if dt != torch.float32:
            fp32 = pool.matrix(torch.float32, rows, p)
            sums["sum_fp32"] = timer(fp32.sum)
        else:
            sums["sum_fp32"] = sums["sum_same"]
        nbytes = both.numel() * both.element_size()
        return {
            "bytes": nbytes,
            "fp32_bytes": both.numel() * 4,
            **sums,
            **timed(timer, impls, both.numel()),
        }

    shape = {"T": t, "S": t, "P": p} if op == "cross_gram" else {"T": t, "P": p}
    # bf16/fp64 cases also sum an fp32 buffer of the same element count.
    need = {DTYPES[dtype]: rows * p, torch.float32: rows * p}
    return Case(op, dtype, shape, run, pool_need=need)


def flat_case(op: str, t: int, n: int, pool: Pool, device: torch.device) -> Case:
    def run(timer: Timer) -> dict[str, Any]:
        tensors = make_tensors(n, device, seed=1)
        out = torch.empty(n, device=device)
        impls: dict[str, Callable[[], object]]
        if op == "gather_flat":
            views = [x.view(-1) for x in tensors]
            impls = {
                "pyxtask": lambda: ops.gather_flat(tensors, out),
                "reference": lambda: reference.gather_flat_reference(tensors),
                "baseline": lambda: torch.cat(views, out=out),
            }
            moved = 2 * n  # read each element, write it once
        elif op == "scatter_combination":
            g = pool.matrix(torch.float32, t, n)
            w = torch.softmax(torch.randn(t, device=device), 0)

            def baseline() -> None:
                combined, offset = w @ g, 0
                for x in tensors:
                    x.copy_(combined[offset : offset + x.numel()].view_as(x))
                    offset += x.numel()

            impls = {
                "pyxtask": lambda: ops.scatter_combination(g, w, tensors),
                "reference": lambda: reference.scatter_combination_reference(g, w, tensors),
                "baseline": baseline,
            }
            moved = (t + 1) * n  # read G once, write the tensors
        else:
            vectors = make_tensors(n, device, seed=2)
            impls = {
                "pyxtask": lambda: ops.add_scaled_(tensors, vectors, -1e-4),
                "reference": lambda: reference.add_scaled_reference(tensors, vectors, -1e-4),
                "baseline": lambda: torch._foreach_add_(tensors, vectors, alpha=-1e-4),
            }
            moved = 3 * n  # read both lists, write the first
        timings = timed(timer, impls, t * n)
        return {"bytes": moved * 4, "n_tensors": len(tensors), **timings}

    shape = {"T": t, "N": n} if op == "scatter_combination" else {"N": n}
    need = {torch.float32: t * n} if op == "scatter_combination" else {}
    return Case(op, "fp32", shape, run, pool_need=need)


def mirror_case(t: int, device: torch.device) -> Case:
    def run(timer: Timer) -> dict[str, Any]:
        gen = torch.Generator(device=device).manual_seed(t)
        w = torch.softmax(torch.randn(t, generator=gen, device=device), 0)
        g = torch.randn(t, generator=gen, device=device)
        lr = 0.1
        return timed(
            timer,
            {
                "pyxtask": lambda: ops.mirror_descent_step(w, g, lr),
                "reference": lambda: reference.mirror_descent_step_reference(w, g, lr),
                "baseline": lambda: torch.softmax(w.log() - lr * g, 0),
            },
        )

    return Case("mirror_descent_step", "fp32", {"T": t}, run)


def min_norm_problem(t: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 G (T x 1000, Gaussian, rows scaled over a decade) and M = G G^T."""
    gen = torch.Generator().manual_seed(1000 + t)
    scales = 10 ** (torch.rand(t, 1, generator=gen) - 0.5)
    g = (torch.randn(t, 1000, generator=gen) * scales / math.sqrt(1000)).to(device)
    return g, g @ g.T


def simplex_optimum(m: np.ndarray) -> tuple[float, str]:
    """min lam^T M lam on the simplex: tight SLSQP, then an exact KKT solve on its support."""
    import scipy.optimize  # noqa: PLC0415 (a bench extra: only the min-norm cases need it)

    t = m.shape[0]
    res = scipy.optimize.minimize(
        lambda x: x @ m @ x,
        np.full(t, 1.0 / t),
        jac=lambda x: 2 * m @ x,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * t,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1, "jac": lambda x: np.ones(t)}],
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    best, how = float(res.x @ m @ res.x), "SLSQP"
    # SLSQP stops at ~1e-10 relative; solving the KKT system on its support is exact when
    # the support is right (checked: lam >= 0 there, and no vertex outside is better).
    support = np.flatnonzero(res.x > 1e-9)
    k = support.size
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = m[np.ix_(support, support)]
    kkt[:k, k] = kkt[k, :k] = 1.0
    try:
        sol = np.linalg.solve(kkt, np.r_[np.zeros(k), 1.0])
    except np.linalg.LinAlgError:
        return best, how
    lam = np.zeros(t)
    lam[support] = sol[:k]
    f = float(lam @ m @ lam)
    if lam.min() >= 0 and (m @ lam).min() >= f * (1 - 1e-9) and f < best:
        best, how = f, "SLSQP + KKT solve on its support"
    return best, how


def min_norm_case(t: int, device: torch.device) -> Case:
    def run(timer: Timer) -> dict[str, Any]:
        g, m = min_norm_problem(t, device)
        libmtl, mgda = libmtl_min_norm(), torchjd_mgda()
        solvers: dict[str, Callable[[], Tensor | None]] = {
            "pyxtask": lambda: ops.min_norm_point(m),
            "pyxtask_plain": lambda: ops.min_norm_point(m, method="plain"),
            "reference": lambda: reference.min_norm_point_reference(m),
        }
        errors: dict[str, str] = {}
        for name, peer, arg in (("torchjd", mgda, m), ("libmtl", libmtl, g)):
            if isinstance(peer, str):
                errors[name] = peer
            else:
                solvers[name] = functools.partial(peer, arg)
        m64 = m.double().cpu().numpy()
        f_star, how = simplex_optimum(m64)
        result: dict[str, Any] = {"f_star": f_star, "f_star_method": how}
        for name, solve in solvers.items():
            try:
                lam = solve()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            if lam is None:
                errors[name] = "returned None (hit its iteration cap)"
                continue
            raw = lam.double().cpu().numpy()
            result[f"{name}_simplex_err"] = float(abs(raw.sum() - 1) + max(0, -raw.min()))
            # fp32 weights miss sum 1 by ~1e-7, which would move f by ~1e-7 at first order;
            # back on the simplex (in float64) only the solver's own error is left.
            lam64 = raw.clip(min=0) / raw.clip(min=0).sum()
            f = float(lam64 @ m64 @ lam64)
            result[f"{name}_gap"] = (f - f_star) / f_star
            result[f"{name}_support"] = int((lam64 > 1e-9).sum())
        result.update(timed(timer, solvers))
        result.update({k: Timing(error=v) for k, v in errors.items()})
        return result

    return Case("min_norm_point", "fp32", {"T": t}, run)


#: op -> (pyxtask weighting built on it, TorchJD's weighting of the same name, its kwargs)
SOLVER_WEIGHTINGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "dual_cone_projection": ("UPGrad", "UPGradWeighting", {}),
    "cagrad_inner": ("CAGrad", "CAGradWeighting", {"c": 0.4}),
    "nash_bargaining": ("NashMTL", "NashMTL", {}),
}


def solver_case(op: str, t: int, device: torch.device) -> Case:
    """The weighting built on ``op`` against TorchJD's on the same gradients (TorchJD's
    Nash-MTL takes the T x 1000 Jacobian itself, the others the Gram)."""
    import warnings  # noqa: PLC0415

    from pyxtask import weighting  # noqa: PLC0415

    ours_name, theirs_name, kwargs = SOLVER_WEIGHTINGS[op]

    def run(timer: Timer) -> dict[str, Any]:
        g, m = min_norm_problem(t, device)
        m64 = m.double()
        ours = getattr(weighting, ours_name)(**kwargs)
        impls: dict[str, Callable[[], object]] = {"pyxtask": lambda: ours(m64)}
        errors = {}
        try:
            aggregation = importlib.import_module("torchjd.aggregation")
            if theirs_name == "NashMTL":
                nash = aggregation.NashMTL(n_tasks=t)
                g64 = g.double()
                impls["torchjd"] = lambda: nash.weighting(g64)
            else:
                theirs = getattr(aggregation, theirs_name)(**kwargs)
                impls["torchjd"] = lambda: theirs(m64)
        except ImportError as exc:
            errors["torchjd"] = f"torchjd unavailable: {exc}"
        with warnings.catch_warnings():  # cvxpy warns on every Nash-MTL solve (not DPP)
            warnings.simplefilter("ignore")
            result: dict[str, Any] = dict(timed(timer, impls))
        result.update({k: Timing(error=v) for k, v in errors.items()})
        return result

    return Case(op, "fp64", {"T": t}, run)


def build_cases(quick: bool, selected: set[str], device: torch.device, pool: Pool) -> list[Case]:
    ts = (4, 16) if quick else (4, 8, 16, 32, 64)
    ps = (10**5, 10**6) if quick else (10**5, 10**6, 10**7)
    ns = (10**5, 10**6) if quick else (10**5, 10**6, 10**7)
    cases: list[Case] = []
    # dtype-major order: the pool converts to bf16 once, then to fp64 (small) once.
    for dtype in ("fp32", "bf16"):
        for op in GRAM_FAMILY:
            # Full cross/cosine grids would cost minutes of fp32-mm and float64-reference time
            # for little new information; cross_gram reads 2T rows, so it stops at T = 32.
            sub = {"gram": ts, "cross_gram": (4, 16, 32), "cosine_matrix": (4, 16, 64)}[op]
            op_ts = tuple(x for x in ts if x in sub)
            cases += [gram_case(op, dtype, t, p, pool) for t in op_ts for p in ps]
    cases += [gram_case(op, "fp64", 16, 10**6, pool) for op in GRAM_FAMILY]
    for op in ("gather_flat", "add_scaled_"):
        cases += [flat_case(op, 0, n, pool, device) for n in ns]
    scatter_ts = (4, 16) if quick else (4, 16, 64)
    cases += [flat_case("scatter_combination", t, n, pool, device) for t in scatter_ts for n in ns]
    cases += [mirror_case(t, device) for t in ((4, 64) if quick else (4, 16, 64))]
    cases += [min_norm_case(t, device) for t in ((4, 16) if quick else (2, 4, 8, 16, 32, 64))]
    for op in SOLVER_WEIGHTINGS:
        cases += [solver_case(op, t, device) for t in ((4, 16) if quick else (4, 16, 64))]
    return [c for c in cases if c.op in selected]


# ---------------------------------------------------------------------------------------------
# Reporting


def fmt_time(t: Timing | None) -> str:
    if t is None:
        return "-"
    if t.best_s is None:
        return "skip" if (t.error or "").startswith("skipped") else "n/a"
    s = t.best_s
    text = f"{s:.3g}s" if s >= 1 else f"{s * 1e3:.3g}ms" if s >= 1e-3 else f"{s * 1e6:.3g}us"
    return text + ("*" if t.reps < 5 else "")


def ratio(num: Timing | None, den: Timing | None) -> float | None:
    if num is None or den is None or num.best_s is None or den.best_s is None:
        return None
    return num.best_s / den.best_s


def gbps(row: dict[str, Any], key: str, nbytes_key: str = "bytes") -> float | None:
    t = row.get(key)
    if not isinstance(t, Timing) or t.best_s is None or nbytes_key not in row:
        return None
    return float(row[nbytes_key] / t.best_s / 1e9)


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


Column = tuple[str, Callable[[dict[str, Any]], str]]


def time_col(key: str, head: str | None = None) -> Column:
    return (head or key, lambda r: fmt_time(r.get(key)))


def speedup_col(key: str, head: str) -> Column:
    return (head, lambda r: fmt_num(ratio(r.get(key), r.get("pyxtask"))) + "x")


def shape_col(key: str) -> Column:
    return (
        key,
        lambda r: f"{r['shape'][key]:.0e}" if r["shape"][key] >= 1e5 else str(r["shape"][key]),
    )


def frac(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else 100 * a / b


COMMON: list[Column] = [
    ("op", lambda r: r["op"]),
    ("dtype", lambda r: r["dtype"]),
]
TRIO: list[Column] = [
    time_col("pyxtask"),
    time_col("reference"),
    time_col("baseline"),
    speedup_col("baseline", "base/pyx"),
    speedup_col("reference", "ref/pyx"),
]
GRAM_TABLE: list[Column] = [
    *COMMON,
    shape_col("T"),
    shape_col("P"),
    *TRIO,
    ("GB/s", lambda r: fmt_num(gbps(r, "pyxtask"), ".1f")),
    ("sum GB/s", lambda r: fmt_num(gbps(r, "sum_same"), ".1f")),
    ("%sum", lambda r: fmt_num(frac(gbps(r, "pyxtask"), gbps(r, "sum_same")), ".0f")),
    ("f32sum GB/s", lambda r: fmt_num(gbps(r, "sum_fp32", "fp32_bytes"), ".1f")),
    (
        "%f32sum",
        lambda r: fmt_num(frac(gbps(r, "pyxtask"), gbps(r, "sum_fp32", "fp32_bytes")), ".0f"),
    ),
]
FLAT_TABLE: list[Column] = [
    *COMMON,
    ("T", lambda r: str(r["shape"].get("T", "-"))),
    shape_col("N"),
    ("tensors", lambda r: str(r["n_tensors"])),
    *TRIO,
    ("GB/s", lambda r: fmt_num(gbps(r, "pyxtask"), ".1f")),
    ("base GB/s", lambda r: fmt_num(gbps(r, "baseline"), ".1f")),
]
MIRROR_TABLE: list[Column] = [*COMMON, shape_col("T"), *TRIO]
MIN_NORM_TABLE: list[Column] = [
    shape_col("T"),
    time_col("pyxtask", "pyx(away)"),
    time_col("pyxtask_plain", "pyx(plain)"),
    time_col("reference"),
    time_col("torchjd"),
    time_col("libmtl"),
    speedup_col("reference", "ref/pyx"),
    speedup_col("torchjd", "tjd/pyx"),
    speedup_col("libmtl", "mtl/pyx"),
    *[
        (f"gap {n}", lambda r, n=k: fmt_num(r.get(f"{n}_gap"), ".1e"))
        for n, k in (
            ("away", "pyxtask"),
            ("plain", "pyxtask_plain"),
            ("ref", "reference"),
            ("tjd", "torchjd"),
            ("mtl", "libmtl"),
        )
    ],
    ("|supp|", lambda r: str(r.get("pyxtask_support", "-"))),
]
SOLVER_TABLE: list[Column] = [
    ("op", lambda r: str(r["op"])),
    shape_col("T"),
    time_col("pyxtask"),
    time_col("torchjd"),
    speedup_col("torchjd", "tjd/pyx"),
]
TABLES: list[tuple[str, tuple[str, ...], list[Column]]] = [
    (
        "Gram family (G is T x P; baseline = torch.mm, which is also TorchJD's way:"
        " its compute_gramian is matrix @ matrix.T)",
        GRAM_FAMILY,
        GRAM_TABLE,
    ),
    ("Flat buffers (N elements over parameter-like tensors)", OPS[3:6], FLAT_TABLE),
    ("Mirror descent step", ("mirror_descent_step",), MIRROR_TABLE),
    (
        "Min-norm point on the simplex (M = G G^T, G is T x 1000)",
        ("min_norm_point",),
        MIN_NORM_TABLE,
    ),
    (
        "Gram solvers: the weighting built on each (UPGrad, CAGrad c=0.4, Nash-MTL) against"
        " TorchJD's on the same gradients (G is T x 1000)",
        tuple(SOLVER_WEIGHTINGS),
        SOLVER_TABLE,
    ),
]


def print_table(title: str, rows: list[dict[str, Any]], columns: list[Column]) -> None:
    cells = [[head for head, _ in columns]] + [[f(r) for _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    print(f"\n== {title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def acceptance(rows: list[dict[str, Any]]) -> list[tuple[str, bool | None, str]]:
    """The targets from README.md, checked on whatever rows this run produced."""

    def pick(op: str, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [r for r in rows if r["op"] == op and pred(r)]

    checks: list[tuple[str, list[float | None], float]] = []
    bw = pick("gram", lambda r: r["dtype"] != "fp64" and r["shape"]["T"] <= 16)
    bw = [r for r in bw if r["shape"]["P"] == 10**7]
    checks.append(
        (
            "gram fp32/bf16 GB/s >= 70% of fp32 G.sum() GB/s (T<=16, P=1e7)",
            [frac(gbps(r, "pyxtask"), gbps(r, "sum_fp32", "fp32_bytes")) for r in bw],
            70.0,
        )
    )
    mm = pick("gram", lambda r: r["shape"]["T"] <= 64)
    checks.append(
        (
            "gram never slower than torch.mm (T<=64)",
            [ratio(r.get("baseline"), r.get("pyxtask")) for r in mm],
            1.0,
        )
    )
    mn = pick("min_norm_point", lambda r: 8 <= r["shape"]["T"] <= 64)
    for peer in ("torchjd", "libmtl"):
        checks.append(
            (
                f"min_norm_point >= 10x faster than {peer} (T=8..64)",
                [ratio(r.get(peer), r.get("pyxtask")) for r in mn],
                10.0,
            )
        )
    out: list[tuple[str, bool | None, str]] = []
    for name, values, threshold in checks:
        known = [v for v in values if v is not None]
        if not known:
            out.append((name, None, "not measured in this run"))
            continue
        worst = min(known)
        missing = len(values) - len(known)
        detail = f"worst {worst:.2f} (target {threshold:g}) over {len(known)} cases"
        out.append(
            (name, worst >= threshold and not missing, detail + f", {missing} n/a" * bool(missing))
        )
    return out


def to_json(x: Any) -> Any:
    if isinstance(x, Timing):
        return x.__dict__
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset for CI (< 60 s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ops", default=",".join(OPS), help="comma list of ops to run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    unknown = set(args.ops.split(",")) - set(OPS)
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    timer = Timer(device, budget_s=0.2 if args.quick else 0.5)
    pool = Pool(device, {})
    cases = build_cases(args.quick, set(args.ops.split(",")), device, pool)
    for case in cases:  # the pool is sized (and converted) once, for the largest case
        for dt, numel in case.pool_need.items():
            pool.need[dt] = max(pool.need.get(dt, 0), numel)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    # disable=None: no bar when stderr is not a terminal (CI logs would keep every redraw).
    for case in tqdm(cases, file=sys.stderr, desc="bench_ops", unit="case", disable=None):
        row: dict[str, Any] = {"op": case.op, "dtype": case.dtype, "shape": case.shape}
        row.update(case.run(timer))
        rows.append(row)
    pool.release()
    elapsed = time.perf_counter() - start

    for title, family, columns in TABLES:
        family_rows = [r for r in rows if r["op"] in family]
        if family_rows:
            print_table(title, family_rows, columns)
    checks = acceptance(rows)
    print("\n== Acceptance targets")
    for name, ok, detail in checks:
        print(f"  [{'PASS' if ok else 'n/a ' if ok is None else 'FAIL'}] {name}: {detail}")
    print(
        f"\n{len(rows)} cases in {elapsed:.0f} s; * = fewer than 5 timed reps (float64 oracle);"
        f" skip = reference not timed above {REFERENCE_MAX_ELEMENTS:.0e} elements"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_info(device),
        "args": {"quick": args.quick, "device": args.device, "ops": args.ops},
        "elapsed_s": elapsed,
        "acceptance": [{"target": n, "pass": ok, "detail": d} for n, ok, d in checks],
        "results": to_json(rows),
    }
    args.out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
