"""Build script: the Python package and the C++/CUDA extension ``dfm_fused._C`` (csrc/).

The CPU kernels are always built. The CUDA kernels are built when a CUDA toolkit and a
CUDA build of torch are present, or when ``DFM_FUSED_BUILD_CUDA=1``;
``DFM_FUSED_BUILD_CUDA=0`` skips them. On x86-64 the CPU kernels that gain from wider
vectors (``AVX2_SOURCES``) are compiled a second time for AVX2 + FMA, with
``-DDFM_FUSED_TARGET_AVX2`` (csrc/cpu/target.h), and picked at run time (``DFM_FUSED_CPU_AVX2=0``
skips that build, e.g. for a compiler without GCC's target pragma). CUDA architectures come from
``TORCH_CUDA_ARCH_LIST`` (default ``RELEASE_CUDA_ARCHS`` for a wheel made for one torch, see
below, or when no GPU is visible; else the visible GPU's).
``MAX_JOBS`` limits parallel compile jobs (read by torch's ninja build).
``DFM_FUSED_PTXAS_VERBOSE=1`` makes nvcc print each CUDA kernel's registers, spills and shared
memory (``--resource-usage``) into the build log, which scripts/check_gpu_compile.py reads.
``DFM_FUSED_LOCAL_VERSION=1``, as the wheel build script sets, makes a wheel for one torch: it
appends ``+cu<CUDA>torch<major.minor>`` (or ``+cputorch<..>``) to the version and requires the
torch release it was built against up to the next minor (``torch>=2.14.1,<2.15``), because the
extension loads only into the torch it was compiled against. Without it (source and editable
installs) the requirement is the wide ``TORCH_REQUIREMENT``.
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
# Release GPUs: A100 (8.0), RTX 30xx/A10 (8.6), RTX 40xx/L4/L40 (8.9), H100/H200 (9.0), B200/B300
# (10.0; SASS for 10.0 runs on 10.3), RTX 50xx/RTX PRO 6000 Blackwell (12.0; runs on 12.1), and PTX
# of the newest for later GPUs to compile at load. nvcc 13.0 (torch 2.14's CUDA) also lists
# sm_110 (Thor, an ARM SoC that no x86-64 wheel meets) and the 10.3/12.1 variants; torch's own
# cu130 build ships SASS for 10.0 and 12.0 likewise.
RELEASE_CUDA_ARCHS = "8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# Source and editable installs: any torch the code supports (the extension is built there against
# the torch at hand, and reports a mismatch at load).
TORCH_REQUIREMENT = "torch>=2.4"


def _version() -> str:
    text = (ROOT / "dfm_fused" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _for_one_torch() -> bool:
    flag = os.environ.get("DFM_FUSED_LOCAL_VERSION", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"DFM_FUSED_LOCAL_VERSION: expected 0 or 1; got {flag!r}")
    return flag == "1"


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
        # A wheel for others (or a build without a GPU to target) gets the release list; a local
        # build on a GPU machine gets torch's default, that GPU.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and (_for_one_torch() or not torch.cuda.is_available()):
            os.environ["TORCH_CUDA_ARCH_LIST"] = RELEASE_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
        defines += [
            "-DDFM_FUSED_WITH_CUDA",
            f"-DDFM_FUSED_CUDA_VERSION={torch.version.cuda}",
            "-DDFM_FUSED_CUDA_ARCHS=" + re.sub(r"[\s;,]+", "/", archs.strip()),
        ]
        sources += CUDA_SOURCES
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"] + defines
        verbose = os.environ.get("DFM_FUSED_PTXAS_VERBOSE", "0")
        if verbose not in ("0", "1"):
            raise SystemExit(f"DFM_FUSED_PTXAS_VERBOSE: expected 0 or 1; got {verbose!r}")
        if verbose == "1":
            extra["nvcc"].append("--resource-usage")
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

    if not _for_one_torch():
        return ""
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    device = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    return f"+{device}torch{torch_mm}"


def _torch_requirement() -> str:
    """``torch>=<the build's release>,<<next minor>`` for a wheel made for one torch, else the wide range.

    The floor is the build's own release (pre-release included, e.g. 2.15.0a0 for a nightly), not
    x.y.0: the library records the exact torch it was compiled against and loads only into that one.
    """
    if not _for_one_torch():
        return TORCH_REQUIREMENT
    import torch

    release = torch.__version__.split("+")[0]  # the public version: "2.14.1", "2.15.0a0", "2.15.0.dev20260101"
    major, minor = (int(part) for part in release.split(".")[:2])
    return f"torch>={release},<{major}.{minor + 1}"


ext_modules, cmdclass, with_cuda = _extension_build()
setup(version=_version() + _local_version(with_cuda), install_requires=[_torch_requirement()],
      ext_modules=ext_modules, cmdclass=cmdclass)
