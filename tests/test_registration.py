"""The battery every op runs: schema, fake (meta) kernels, autograd registration and
torch.compile tracing through torch.library.opcheck; TorchScript; docs examples."""

import doctest
import importlib
import re

import pytest
import torch

import pyxtask

ALL_OPS = list(pyxtask.ops.OP_NAMES)


def opcheck_cases():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 37, generator=g)
    M = G @ G.T
    params = [torch.randn(3, 4, generator=g), torch.randn(7, generator=g)]
    yield "gram", (G,), {}
    yield "gram", (G.to(torch.bfloat16),), {}
    yield "gram", (torch.randn(3, 11, dtype=torch.float64, requires_grad=True),), {}
    yield "cross_gram", (G, torch.randn(2, 37, generator=g)), {}
    yield (
        "cross_gram",
        (
            torch.randn(2, 6, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 6, dtype=torch.float64, requires_grad=True),
        ),
        {},
    )
    yield "cosine_matrix", (G,), {}
    yield "cosine_matrix", (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),), {}
    yield "gather_flat", ([p.clone() for p in params], torch.empty(19)), {}
    yield (
        "scatter_combination",
        (
            torch.randn(2, 19, generator=g),
            torch.rand(2, generator=g),
            [torch.zeros(3, 4), torch.zeros(7)],
            True,
        ),
        {},
    )
    yield "add_scaled_", ([p.clone() for p in params], [p.clone() for p in params], 0.5), {}
    yield "mirror_descent_step", (torch.rand(9, generator=g), torch.randn(9, generator=g), 1.0), {}
    yield "min_norm_point", (M, 1000, 1e-12, "away"), {}
    yield "min_norm_point", (M.double(), 1000, 1e-12, "plain"), {}
    yield "dual_cone_projection", (M, torch.eye(5) / 5, 1000, 1e-12), {}
    yield "dual_cone_projection", (M.double(), torch.full((5,), 0.2), 1000, 1e-12), {}
    yield "nash_bargaining", (M, None, 100, 1e-12), {}
    yield "nash_bargaining", (M.double(), torch.ones(5), 100, 1e-12), {}
    yield "cagrad_inner", (M, 0.4, 1000, 1e-12), {}
    a, d = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], dtype=torch.bool)
    ids = torch.randint(0, 7, (3, 5), generator=g)
    yield "linear_sample_dots", (a, d, torch.randn(6, 4, generator=g), mask), {}
    yield "linear_sample_dots", (a.double(), d.double(), torch.randn(6, 4).double(), None), {}
    yield "linear_sample_sq_norms", (a, d, mask, "gram"), {}
    yield "linear_sample_sq_norms", (a.bfloat16(), d.bfloat16(), None, "materialize"), {}
    yield "embedding_sample_dots", (ids, d, torch.randn(7, 6, generator=g), mask.int()), {}
    yield "embedding_sample_sq_norms", (ids.int(), d.double(), mask), {}


@pytest.mark.parametrize(
    ("name", "args", "kwargs"), list(opcheck_cases()), ids=[c[0] for c in opcheck_cases()]
)
def test_opcheck(name, args, kwargs):
    torch.library.opcheck(getattr(torch.ops.pyxtask, name).default, args, kwargs)


def test_every_op_is_covered_by_opcheck():
    assert {c[0] for c in opcheck_cases()} == set(ALL_OPS)


def test_schemas():
    schemas = {name: str(getattr(torch.ops.pyxtask, name).default._schema) for name in ALL_OPS}
    assert schemas["gram"] == "pyxtask::gram(Tensor G) -> Tensor"
    assert "Tensor(a!) out" in schemas["gather_flat"]
    assert "Tensor(a!)[] tensors" in schemas["scatter_combination"]
    assert "Tensor(a!)[] tensors" in schemas["add_scaled_"]
    assert 'str method="away"' in schemas["min_norm_point"]


def test_torch_compile_traces_the_ops_fullgraph():
    def step(G: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        cos = pyxtask.ops.cosine_matrix(G)
        lam = pyxtask.ops.min_norm_point(pyxtask.ops.gram(G))
        return pyxtask.ops.mirror_descent_step(w, -cos[0] + g, 1.0) + lam

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    G, w, g = torch.randn(4, 100), torch.full((4,), 0.25), torch.randn(4)
    assert torch.allclose(compiled(G, w, g), step(G, w, g))


def test_torchscript_calls_the_ops():
    @torch.jit.script
    def scripted(G: torch.Tensor) -> torch.Tensor:
        M = torch.ops.pyxtask.gram(G)
        return torch.ops.pyxtask.min_norm_point(M, 100, 1e-12, "away")

    G = torch.randn(3, 10)
    assert torch.allclose(scripted(G), pyxtask.ops.min_norm_point(pyxtask.ops.gram(G), 100))


def test_meta_tensors_give_shapes_without_data():
    G = torch.empty(6, 1000, device="meta", dtype=torch.bfloat16)
    out = pyxtask.ops.gram(G)
    assert out.device.type == "meta" and out.shape == (6, 6) and out.dtype == torch.float32
    with pytest.raises(RuntimeError, match=r"pyxtask\.gram: G has 65 rows"):
        pyxtask.ops.gram(torch.empty(65, 3, device="meta"))


@pytest.mark.parametrize("module", ["pyxtask.ops", "pyxtask.hessian", "pyxtask._extension"])
def test_docstring_examples_run(module):
    result = doctest.testmod(
        importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE
    )
    assert result.attempted > 0 and result.failed == 0


def test_build_info_reports_the_build():
    info = pyxtask.build_info()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    # "cuda": whether the CUDA kernels were compiled in; "cuda_version": the CUDA runtime they
    # were compiled against ("12.4"), None exactly when they were not.
    assert isinstance(info["cuda"], bool)
    assert (info["cuda_version"] is None) == (info["cuda"] is False)
    if info["cuda"]:
        assert isinstance(info["cuda_version"], str)
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]), info["cuda_version"]
        assert info["cuda_arch_list"], "CUDA kernels built for no architecture"
    if torch.version.cuda is None:  # a CPU-only torch cannot have built CUDA kernels
        assert info["cuda"] is False
        assert info["cuda_arch_list"] == ""
    elif info["cuda"]:  # torch's extension builder refuses a toolkit of another major version
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert info["openmp"] is True and info["num_threads"] >= 1
    assert info["cpu_isa"] in {"base", "avx2", "avx512", "avx512+bf16"}
