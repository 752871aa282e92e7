"""Compile-only check of the CUDA kernels (CI has nvcc but no GPU).

Run with a CUDA build of torch (torch==2.14.1, cu130) in its own venv. Each
csrc/ops/*_cuda.cu is compiled to an object file with the flags torch's CUDAExtension
uses, for the archs setup.py defaults to; a file that does not compile fails the check.

Two properties a GPU would otherwise reveal are checked from ptxas and the PTX:
  - no kernel has a stack frame over MAX_STACK_BYTES: the driver reserves a kernel's local
    memory for every thread the device can hold (36 KB per thread is ~10 GB on an H100);
    register spills are listed (they are legal, but belong out of hot loops);
  - the kernels in NO_FMA_SOURCES (the min-norm solver, whose iterates must be the CPU's
    bit for bit) have no fma.*.f64 and no plain add/sub/mul.f64 in their PTX, which ptxas
    would be free to contract: only the .rn forms (__dadd_rn & co.).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
MAX_STACK_BYTES = 1024
NO_FMA_SOURCES = ("min_norm_cuda.cu",)


def ptxas_problems(log: str) -> tuple[list[str], list[str]]:
    """(errors, notes) from `-Xptxas -v` output: stack frames over the limit, and spills."""
    errors, notes, kernel = [], [], "?"
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            kernel = f"{entry.group(1)} ({entry.group(2)})"
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if frame:
            stack, spill = int(frame.group(1)), int(frame.group(2))
            if stack > MAX_STACK_BYTES:
                errors.append(f"{kernel}: {stack} bytes stack frame (limit {MAX_STACK_BYTES})")
            elif spill:
                notes.append(f"{kernel}: {spill} bytes spilled")
    return errors, notes


def fma_problems(ptx: str) -> list[str]:
    """f64 operations in PTX that ptxas may contract into an FMA, or FMAs already."""
    counts: dict[str, int] = {}
    for op in re.findall(r"\b(fma\.\w+\.f64|(?:add|sub|mul)\.f64)\b", ptx):
        counts[op] = counts.get(op, 0) + 1
    return [f"{n} x {op}" for op, n in sorted(counts.items())]


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
    ]
    archs = [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    sources = sorted((ROOT / "csrc" / "ops").glob("*.cu"))
    out_dir = Path(tempfile.mkdtemp(prefix="pyxtask-cuda-"))

    def compile_one(src: Path) -> tuple[Path, subprocess.CompletedProcess[str], list[str]]:
        cmd = [
            nvcc,
            "-c",
            str(src),
            "-o",
            str(out_dir / (src.stem + ".o")),
            *flags,
            *archs,
            "-Xptxas",
            "-v",
            *(f"-I{p}" for p in includes),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        fma: list[str] = []
        if res.returncode == 0 and src.name in NO_FMA_SOURCES:
            ptx = out_dir / (src.stem + ".ptx")
            ptx_cmd = [nvcc, "-ptx", str(src), "-o", str(ptx), "-arch=sm_90", *flags]
            ptx_cmd += [f"-I{p}" for p in includes]
            ptx_res = subprocess.run(ptx_cmd, capture_output=True, text=True, check=False)
            if ptx_res.returncode != 0:
                fma = ["PTX did not compile: " + ptx_res.stderr[-2000:]]
            else:
                fma = fma_problems(ptx.read_text())
        return src, res, fma

    failed = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res, fma in pool.map(compile_one, sources):
            errors, notes = ptxas_problems(res.stdout + res.stderr)
            if fma:
                errors.append("f64 ops ptxas may contract (or FMAs): " + ", ".join(fma))
            status = "ok" if res.returncode == 0 and not errors else "FAILED"
            print(f"nvcc {src.relative_to(ROOT)}: {status}")
            for note in notes:
                print(f"  note: {note}")
            if res.returncode != 0:
                failed += 1
                print(res.stdout + res.stderr)
            elif errors:
                failed += 1
                print("\n".join(f"  error: {e}" for e in errors))
    print(f"cuda compile check: {len(sources) - failed} compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
