"""Builds the fastres._C extension from csrc/ with ninja: the CPU sources always, the CUDA sources
(sm_80 and sm_90) when nvcc and a CUDA-enabled torch are present, unless FASTRES_NO_CUDA=1.
Triton kernels in kernels/ ship inside the package as fastres.kernels."""
import glob
import os
import platform

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME on import; /usr/local/cuda is where nvcc's toolkit
# (with libcudart) lives, while guessing from `which nvcc` may find a bare /usr/local/bin.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension as ce  # noqa: E402


def cpu_flags() -> list[str]:
    """at::parallel_for is OpenMP inline code, so it needs -fopenmp (libgomp is the one torch loads);
    at::vec::Vectorized is only SIMD with the ISA macros ATen's own kernels get: AVX2 on x86-64."""
    flags = ["-fopenmp"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"]
    return flags


def extension():
    sources = ["csrc/fastres.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda = (os.environ.get("FASTRES_NO_CUDA") != "1" and torch.version.cuda is not None
            and ce.CUDA_HOME is not None)
    cxx = ["-O3", "-std=c++20"] + cpu_flags()
    link = ["-fopenmp"]
    if not cuda:
        return ce.CppExtension("fastres._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return ce.CUDAExtension(
        "fastres._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("FASTRES_WITH_CUDA", "1")], extra_link_args=link,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]})


setup(
    packages=find_packages(include=["fastres", "fastres.*"]) + ["fastres.kernels"],
    package_dir={"fastres.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": ce.BuildExtension.with_options(use_ninja=True)},
)
