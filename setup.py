"""Builds fastfuse._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch are present.

Knobs (environment):
  FASTFUSE_CUDA=0|1      force the CUDA build off/on (default: auto)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0")
  MAX_JOBS               parallel compile jobs (default: from cores and free memory)
  FASTFUSE_DEBUG=1       -O0 -g
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fastfuse setup] {msg}", flush=True)


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_toolkit():
    """The real toolkit folder. torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc on PATH
    is a wrapper outside the toolkit (as on our dev machines), so look in the standard places first."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if _is_toolkit(c):
            return os.path.realpath(c)
    return None


def find_pip_nvidia_includes():
    """Header folders of the pip NVIDIA packages (cusparse.h etc. for torch's CUDA headers live there, not
    in the toolkit): nvidia/cu13/include in newer wheels, nvidia/<lib>/include in older ones."""
    dirs = []
    for site in sys.path:
        root = os.path.join(site, "nvidia")
        if os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


def default_max_jobs():
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8
    return max(1, min(os.cpu_count() or 1, int(free_gb // 3)))  # nvcc with torch headers takes ~2-3 GB


def build_extensions():
    toolkit = find_cuda_toolkit()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit  # must be set before torch.utils.cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    want = os.environ.get("FASTFUSE_CUDA", "auto").strip().lower()
    have = toolkit is not None and torch.version.cuda is not None
    if want in ("1", "true", "yes"):
        if not have:
            raise RuntimeError(f"FASTFUSE_CUDA=1 but no CUDA build is possible: toolkit={toolkit}, "
                               f"torch.version.cuda={torch.version.cuda}")
        use_cuda = True
    elif want in ("0", "false", "no"):
        use_cuda = False
    else:
        use_cuda = have
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    debug = os.environ.get("FASTFUSE_DEBUG", "0") == "1"

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math lets GCC turn `keep ? x * s : 0` into a vector select (results are unchanged)
    # -ffp-contract=off: no multiply-add fused where the source does not say so (GCC's C++ default fuses them): the
    # AVX2 batch-norm kernels fused them in vector loops but not always in scalar tails, so bits depended on where
    # a loop split; now they round as written, as the Python composition of the same kernels does
    # -fopenmp: at::parallel_for is header code that only runs in parallel when the caller has OpenMP
    cxx = opt + ["-fno-trapping-math", "-ffp-contract=off", "-fopenmp",
                 f'-DFASTFUSE_TORCH_VERSION="{torch.__version__}"']
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = {}
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        cxx.append("-DFASTFUSE_WITH_CUDA")
        include_dirs += [os.path.join(toolkit, "include")] + find_pip_nvidia_includes()
        nvcc = opt + ["-DFASTFUSE_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": nvcc}
        ext_cls = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        ext_cls = CppExtension

    _log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit: {toolkit}, "
         f"FASTFUSE_CUDA={want} -> CUDA kernels {'ON' if use_cuda else 'OFF'}")
    if use_cuda:
        _log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, "
             f"include dirs: {include_dirs[1:]}")
    _log(f"MAX_JOBS={os.environ['MAX_JOBS']}, debug={debug}, sources: {sources}")
    ext = ext_cls("fastfuse._C", sources, include_dirs=include_dirs, extra_link_args=["-fopenmp"], **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())}


ext_modules, cmdclass = build_extensions()

setup(
    packages=["fastfuse", "fastfuse.ops", "fastfuse.nn", "fastfuse.bench",
              "fastfuse.triton_kernels", "fastfuse.benchmarks",
              "fastfuse.models", "fastfuse.examples"],
    package_dir={"fastfuse": "python/fastfuse", "fastfuse.ops": "python/fastfuse/ops",
                 "fastfuse.nn": "python/fastfuse/nn", "fastfuse.bench": "python/fastfuse/bench",
                 "fastfuse.triton_kernels": "triton_kernels", "fastfuse.benchmarks": "benchmarks",
                 "fastfuse.models": "python/fastfuse/models", "fastfuse.examples": "python/fastfuse/examples"},
    package_data={"fastfuse": ["_cuda_defaults.json"]},  # the CUDA defaults from a GPU run, once committed
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
