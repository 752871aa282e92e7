"""Compile-only check of the CUDA kernels (CI has nvcc but no GPU).

Run with a CUDA build of torch (torch==2.14.1, cu130) in its own venv. Each
csrc/ops/*_cuda.cu is compiled to an object file with the flags torch's CUDAExtension
uses, for the archs setup.py defaults to; a file that does not compile fails the check.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        print("cuda_compile_check: needs a CUDA build of torch and CUDA_HOME", file=sys.stderr)
        return 2
    nvcc = str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc")
    includes = [
        *cpp_extension.include_paths(device_type="cuda"),
        sysconfig.get_paths()["include"],
        str(ROOT / "csrc" / "include"),
        str(ROOT / "csrc"),
    ]
    cpath = os.environ.get("CPATH", "")
    includes += [p for p in cpath.split(":") if p]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-std=c++20" if torch.__version__ >= "2.14" else "-std=c++17",
        "-O3",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DPYX_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    sources = sorted((ROOT / "csrc" / "ops").glob("*.cu"))
    out_dir = Path(tempfile.mkdtemp(prefix="pyxtask-cuda-"))

    def compile_one(src: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
        cmd = [
            nvcc,
            "-c",
            str(src),
            "-o",
            str(out_dir / (src.stem + ".o")),
            *flags,
            *(f"-I{p}" for p in includes),
        ]
        return src, subprocess.run(cmd, capture_output=True, text=True, check=False)

    failed = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res in pool.map(compile_one, sources):
            status = "ok" if res.returncode == 0 else "FAILED"
            print(f"nvcc {src.relative_to(ROOT)}: {status}")
            if res.returncode != 0:
                failed += 1
                print(res.stdout + res.stderr)
    print(f"cuda compile check: {len(sources) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
