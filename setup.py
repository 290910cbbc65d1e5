"""Build script: the Python package and the C++/CUDA extension ``dfm_fused._C`` (csrc/).

The CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit and a
CUDA build of torch are present, or when ``DFM_FUSED_BUILD_CUDA=1``;
``DFM_FUSED_BUILD_CUDA=0`` skips them. On x86-64 the CPU kernels that gain from wider
vectors (``AVX2_SOURCES``) are compiled a second time for AVX2 + FMA, with
``-DDFM_FUSED_TARGET_AVX2`` (csrc/cpu/target.h), and picked at run time (``DFM_FUSED_CPU_AVX2=0``
skips that build, e.g. for a compiler without GCC's target pragma). CUDA architectures come from
``TORCH_CUDA_ARCH_LIST`` (default when no GPU is visible: 8.0 8.6 8.9 9.0+PTX).
``MAX_JOBS`` limits parallel compile jobs (read by torch's ninja build).
``DFM_FUSED_LOCAL_VERSION=1`` appends ``+cu<CUDA>torch<major.minor>`` (or ``+cputorch<..>``)
to the version, as the wheel build script does.
"""
import os
import platform
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# One source per op and device (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu), the code two ops share,
# the argument checks, the test hooks and the op registration.
CPU_SOURCES = [
    "csrc/ops.cpp", "csrc/checks.cpp", "csrc/test_hooks.cpp", "csrc/cpu/target.cpp", "csrc/cpu/channel_map.cpp",
    "csrc/cpu/exp_decay.cpp", "csrc/cpu/state_update.cpp", "csrc/cpu/feedback_input.cpp",
]
CUDA_SOURCES = ["csrc/cuda/exp_decay.cu", "csrc/cuda/state_update.cu", "csrc/cuda/feedback_input.cu"]
# CPU sources compiled twice: baseline and AVX2 + FMA (csrc/cpu/target.h).
AVX2_SOURCES = ["csrc/cpu/feedback_input.cpp"]


def _version() -> str:
    text = (ROOT / "dfm_fused" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _extension_build():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flag = os.environ.get("DFM_FUSED_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"DFM_FUSED_BUILD_CUDA: expected 0 or 1; got {flag!r}")
    cuda = flag == "1" or (flag == "" and torch.version.cuda is not None and CUDA_HOME is not None)
    if cuda and (torch.version.cuda is None or CUDA_HOME is None):
        raise SystemExit(
            "DFM_FUSED_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    sources = list(CPU_SOURCES)
    # Stringified in C++ (csrc/ops.cpp): keep the values free of spaces, commas and semicolons.
    defines = [f"-DDFM_FUSED_TORCH_VERSION={torch.__version__}"]
    avx2 = os.environ.get("DFM_FUSED_CPU_AVX2", "1")
    if avx2 not in ("0", "1"):
        raise SystemExit(f"DFM_FUSED_CPU_AVX2: expected 0 or 1; got {avx2!r}")
    with_avx2 = avx2 == "1" and platform.machine().lower() in ("x86_64", "amd64")
    if with_avx2:
        defines.append("-DDFM_FUSED_WITH_AVX2")
    # -fno-trapping-math: the kernels never read floating-point exception flags; without it GCC
    # refuses to vectorise loops with a float -> int conversion (the softmax exp).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    extra = {"cxx": cxx}
    if cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0+PTX"
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        defines += [
            "-DDFM_FUSED_WITH_CUDA",
            f"-DDFM_FUSED_CUDA_VERSION={torch.version.cuda}",
            "-DDFM_FUSED_CUDA_ARCHS=" + re.sub(r"[\s;,]+", "/", archs.strip()),
        ]
        sources += CUDA_SOURCES
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"] + defines
        ext = CUDAExtension
    else:
        ext = CppExtension
    extra["cxx"] = cxx + defines
    module = ext("dfm_fused._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])

    class BuildWithTargets(BuildExtension):
        """BuildExtension that also compiles ``AVX2_SOURCES`` for AVX2 + FMA into the same library."""

        def build_extension(self, ext):
            if with_avx2:
                # ext.extra_compile_args holds torch's flags by now (ABI, extension name); the same
                # source gets its own object directory, so its object does not replace the baseline one.
                flags = dict(ext.extra_compile_args)
                flags["cxx"] = [*flags["cxx"], "-DDFM_FUSED_TARGET_AVX2"]
                ext.extra_objects = [*ext.extra_objects, *self.compiler.compile(
                    AVX2_SOURCES, output_dir=os.path.join(self.build_temp, "avx2"), macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=flags, depends=ext.depends)]
            super().build_extension(ext)

    return [module], {"build_ext": BuildWithTargets}, cuda


def _local_version(cuda: bool) -> str:
    import torch

    if os.environ.get("DFM_FUSED_LOCAL_VERSION") != "1":
        return ""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    device = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    return f"+{device}torch{torch_mm}"


ext_modules, cmdclass, with_cuda = _extension_build()
setup(version=_version() + _local_version(with_cuda), ext_modules=ext_modules, cmdclass=cmdclass)
