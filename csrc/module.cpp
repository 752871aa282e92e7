// The Python extension module pyxtask._C. Importing it runs the TORCH_LIBRARY registrations
// of every op; the module itself only reports what was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <string>

#include "ops/cpu/isa.h"

#ifndef PYX_SOURCE_HASH
#define PYX_SOURCE_HASH "unknown"
#endif
#ifndef PYX_CUDA_ARCHS
#define PYX_CUDA_ARCHS ""
#endif

#ifdef PYX_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyxtask compiled ops (registered as torch.ops.pyxtask.*)";
  m.def("build_info", [] {
    py::dict info;
    info["torch_version"] = std::string(TORCH_VERSION);
#ifdef PYX_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] =
        std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
    info["cuda"] = false;
    info["cuda_version"] = py::none();
#endif
    info["cuda_arch_list"] = std::string(PYX_CUDA_ARCHS);
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["num_threads"] = at::get_num_threads();
    info["cpu_isa"] = std::string(pyxtask::cpu::isa_name(pyxtask::cpu::current_isa()));
    info["source_hash"] = std::string(PYX_SOURCE_HASH);
    return info;
  });
}
