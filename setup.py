"""Builds the extensions of csrc/ with ninja: fastres._C (the op schemas, and the CUDA kernels for
sm_80 and sm_90 when nvcc and a CUDA-enabled torch are present, unless FASTRES_NO_CUDA=1) and
the CPU kernels, once per instruction set (fastres._cpu_avx2 and fastres._cpu_avx512 on x86-64).
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


# Host compiler flags of every extension (a tuple: torch's build appends to the lists it is given).
CXX = ("-O3", "-std=c++20")

# The CPU kernels are built once per instruction set, as ATen builds its own (at::vec::Vectorized
# is only as wide as the ISA macros it is compiled with), each as its own module so that the two
# builds of the same inline code never meet in one symbol table; fastres.backend loads the one
# matching torch.backends.cpu.get_cpu_capability(). Elsewhere than x86-64 one generic build.
CPU_ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512"],
}


def cpu_isas() -> list[str]:
    return list(CPU_ISA_FLAGS) if platform.machine() in ("x86_64", "AMD64") else ["default"]


def cpu_extension(isa: str):
    """fastres._cpu_<isa>: the CPU kernels of csrc/cpu. at::parallel_for is OpenMP inline code, so
    it needs -fopenmp (libgomp is the one torch loads)."""
    flags = [*CXX, "-fopenmp", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    return ce.CppExtension(f"fastres._cpu_{isa}", sorted(glob.glob("csrc/cpu/*.cpp")),
                           extra_compile_args={"cxx": flags + CPU_ISA_FLAGS.get(isa, [])},
                           extra_link_args=["-fopenmp"])


def extension():
    """fastres._C: the op schemas and, where CUDA is available, the CUDA kernels."""
    sources = ["csrc/fastres.cpp"]
    cuda = (os.environ.get("FASTRES_NO_CUDA") != "1" and torch.version.cuda is not None
            and ce.CUDA_HOME is not None)
    if not cuda:
        return ce.CppExtension("fastres._C", sources, extra_compile_args={"cxx": list(CXX)})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return ce.CUDAExtension(
        "fastres._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("FASTRES_WITH_CUDA", "1")],
        extra_compile_args={"cxx": list(CXX), "nvcc": [*CXX, "--use_fast_math"]})


class BuildExtension(ce.BuildExtension):
    """One object folder per extension: the CPU sources are compiled once per ISA, and a shared
    folder would make every build recompile them all."""

    def build_extension(self, ext):
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared


setup(
    packages=find_packages(include=["fastres", "fastres.*"]) + ["fastres.kernels"],
    package_dir={"fastres.kernels": "kernels"},
    ext_modules=[extension()] + [cpu_extension(isa) for isa in cpu_isas()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
