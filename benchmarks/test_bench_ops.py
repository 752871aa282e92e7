"""pytest-benchmark suite: every op in ``pyxtask.ops.OP_NAMES`` beside its plain-torch baseline.

Each (op, size) is one pytest-benchmark group holding ``pyxtask`` and ``torch``: the plain-torch
way, as in the op benchmark (``pyxtask bench --ops``, ``benchmarks/bench_ops.py``), whose input
helpers this reuses; for ``min_norm_point`` the reference's Python loop, plus TorchJD's solver
when it is installed. An op without an input builder here is collected as a skip, so a
new op shows up in the run. Sizes: T in {4, 16} x P (or N) in {1e5, 1e6}; ``--quick``: T = 4,
P = 1e4. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from pyxtask import ops, reference
from pyxtask.bench.ops import make_tensors, min_norm_problem, torchjd_mgda

CPU = torch.device("cpu")

Impls = dict[str, Callable[[], object]]
Shape = tuple[tuple[str, int], ...]  # (("T", 4), ("P", 100000)): hashable, ordered


def sizes(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(T values, P/N values)."""
    return ((4,), (10**4,)) if quick else ((4, 16), (10**5, 10**6))


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Input builders: shape -> (implementations, what the baseline is)


def build_gram_family(op: str, shape: dict[str, int]) -> tuple[Impls, str]:
    t, p = shape["T"], shape["P"]
    if op == "cross_gram":
        both = randn(2 * t, p)
        a, b = both[:t], both[t:]
        return {
            "pyxtask": lambda: ops.cross_gram(a, b),
            "torch": lambda: torch.mm(a, b.T),
        }, "torch.mm(A, B.T)"
    g = randn(t, p)
    op_fn = ops.gram if op == "gram" else ops.cosine_matrix
    # As in the op benchmark, cosine_matrix's baseline is the matrix product it reduces to.
    return {"pyxtask": lambda: op_fn(g), "torch": lambda: torch.mm(g, g.T)}, "torch.mm(G, G.T)"


def build_flat(op: str, shape: dict[str, int]) -> tuple[Impls, str]:
    n = shape["N"]
    tensors = make_tensors(n, CPU, seed=1)
    if op == "gather_flat":
        out = torch.empty(n)
        views = [x.view(-1) for x in tensors]
        return {
            "pyxtask": lambda: ops.gather_flat(tensors, out),
            "torch": lambda: torch.cat(views, out=out),
        }, "torch.cat(views, out=out)"
    if op == "scatter_combination":
        g = randn(shape["T"], n)
        w = torch.softmax(randn(shape["T"], seed=1), 0)

        def baseline() -> None:
            combined, offset = w @ g, 0
            for x in tensors:
                x.copy_(combined[offset : offset + x.numel()].view_as(x))
                offset += x.numel()

        return {
            "pyxtask": lambda: ops.scatter_combination(g, w, tensors),
            "torch": baseline,
        }, "w @ G, then copy_ per tensor"
    vectors = make_tensors(n, CPU, seed=2)
    return {
        "pyxtask": lambda: ops.add_scaled_(tensors, vectors, -1e-4),
        "torch": lambda: torch._foreach_add_(tensors, vectors, alpha=-1e-4),
    }, "torch._foreach_add_(tensors, vectors, alpha=...)"


def build_mirror(op: str, shape: dict[str, int]) -> tuple[Impls, str]:
    t, lr = shape["T"], 0.1
    w, g = torch.softmax(randn(t), 0), randn(t, seed=1)
    return {
        "pyxtask": lambda: ops.mirror_descent_step(w, g, lr),
        "torch": lambda: torch.softmax(w.log() - lr * g, 0),
    }, "torch.softmax(w.log() - lr * g)"


def build_min_norm(op: str, shape: dict[str, int]) -> tuple[Impls, str]:
    _, m = min_norm_problem(shape["T"], CPU)  # M = G G^T, G is T x 1000 (as `pyxtask bench`)
    impls: Impls = {
        "pyxtask": lambda: ops.min_norm_point(m),
        "torch": lambda: reference.min_norm_point_reference(m),
    }
    peer = torchjd_mgda()  # its defaults (epsilon 1e-3, max_iters 100); a str: not installed
    if not isinstance(peer, str):
        impls["torchjd"] = lambda: peer(m)
    return impls, "reference.min_norm_point_reference: the same iterations as a Python loop"


def _torchjd(weighting: str, **kwargs: object) -> Callable[[Tensor], Tensor] | None:
    try:
        from torchjd import aggregation  # a peer: optional
    except ImportError:
        return None
    return getattr(aggregation, weighting)(**kwargs)


def build_gram_solver(op: str, shape: dict[str, int]) -> tuple[Impls, str]:
    """The solvers behind UPGrad (dual_cone_projection), Nash-MTL and CAGrad on the same M as
    min_norm_point, against their references and TorchJD's whole weighting (its solver)."""
    t = shape["T"]
    _, m = min_norm_problem(t, CPU)
    m = m.double()
    if op == "dual_cone_projection":
        u = torch.eye(t, dtype=torch.float64) / t  # UPGrad: every e_i / T
        impls: Impls = {
            "pyxtask": lambda: ops.dual_cone_projection(m, u),
            "torch": lambda: reference.dual_cone_projection_reference(m, u),
        }
        peer = _torchjd("UPGradWeighting")
    elif op == "nash_bargaining":
        impls = {
            "pyxtask": lambda: ops.nash_bargaining(m),
            "torch": lambda: reference.nash_bargaining_reference(m),
        }
        peer = None  # TorchJD's Nash-MTL takes the Jacobian, not the Gram
    else:
        impls = {
            "pyxtask": lambda: ops.cagrad_inner(m, 0.4),
            "torch": lambda: reference.cagrad_inner_reference(m, 0.4),
        }
        peer = _torchjd("CAGradWeighting", c=0.4)
    if peer is not None:
        impls["torchjd"] = lambda: peer(m)
    return impls, f"reference.{op}_reference (SciPy-based); torchjd: its weighting's solver"


@dataclass(frozen=True)
class Spec:
    build: Callable[[str, dict[str, int]], tuple[Impls, str]]
    shapes: Callable[[bool], list[dict[str, int]]]
    impls: tuple[str, ...] = ("pyxtask", "torch")


def _t_p(quick: bool) -> list[dict[str, int]]:
    ts, ps = sizes(quick)
    return [{"T": t, "P": p} for t in ts for p in ps]


def _n(quick: bool) -> list[dict[str, int]]:
    return [{"N": n} for n in sizes(quick)[1]]


def _t_n(quick: bool) -> list[dict[str, int]]:
    ts, ns = sizes(quick)
    return [{"T": t, "N": n} for t in ts for n in ns]


def _t(quick: bool) -> list[dict[str, int]]:
    return [{"T": t} for t in sizes(quick)[0]]


SPECS: dict[str, Spec] = {
    "gram": Spec(build_gram_family, _t_p),
    "cross_gram": Spec(build_gram_family, _t_p),
    "cosine_matrix": Spec(build_gram_family, _t_p),
    "gather_flat": Spec(build_flat, _n),
    "scatter_combination": Spec(build_flat, _t_n),
    "add_scaled_": Spec(build_flat, _n),
    "mirror_descent_step": Spec(build_mirror, _t),
    "min_norm_point": Spec(build_min_norm, _t, ("pyxtask", "torch", "torchjd")),
    "dual_cone_projection": Spec(build_gram_solver, _t, ("pyxtask", "torch", "torchjd")),
    "nash_bargaining": Spec(build_gram_solver, _t),
    "cagrad_inner": Spec(build_gram_solver, _t, ("pyxtask", "torch", "torchjd")),
}


@functools.lru_cache(maxsize=1)  # the impls of one (op, shape) run back to back: build once
def build(op: str, shape: Shape) -> tuple[Impls, str]:
    return SPECS[op].build(op, dict(shape))


def label(shape: Shape, sep: str) -> str:
    def num(v: int) -> str:
        return f"{v:.0e}".replace("e+0", "e") if v >= 10**4 else str(v)

    return sep.join(f"{k}{'=' if sep == ' ' else ''}{num(v)}" for k, v in shape)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    quick = bool(metafunc.config.getoption("quick"))
    params = []
    for op in ops.OP_NAMES:
        spec = SPECS.get(op)
        if spec is None:
            reason = f"no input builder for op {op!r}: add one to SPECS in benchmarks/{__name__}.py"
            params.append(pytest.param((op, (), ""), id=op, marks=pytest.mark.skip(reason=reason)))
            continue
        for shape_dict in spec.shapes(quick):
            shape = tuple(shape_dict.items())
            for impl in spec.impls:
                params.append(
                    pytest.param((op, shape, impl), id=f"{op}-{label(shape, '-')}-{impl}")
                )
    metafunc.parametrize("case", params)


def test_op(benchmark: Any, case: tuple[str, Shape, str]) -> None:
    op, shape, impl = case
    impls, baseline = build(op, shape)
    if impl not in impls:
        pytest.skip(f"{impl} is not installed")
    benchmark.group = f"{op} {label(shape, ' ')}"
    benchmark.extra_info.update(op=op, impl=impl, **dict(shape))
    if impl == "torch":
        benchmark.extra_info["baseline"] = baseline
    benchmark(impls[impl])
