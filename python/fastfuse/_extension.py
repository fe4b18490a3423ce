"""Loads the compiled extension fastfuse._C, which defines every op. Import never fails: a missing or mismatched
build is recorded, reported by fastfuse.backends(), and raised (with how to rebuild) when an op is called."""
import torch

REBUILD_HINT = ("Rebuild it against the installed torch from the fastfuse source folder: "
                "pip install --no-build-isolation -e .  (add FASTFUSE_CUDA=1 to insist on the CUDA kernels)")

_C = None
_error = None
_info = {}

try:
    from fastfuse import _C  # noqa: F811  (runs the TORCH_LIBRARY registrations of fastfuse and fastfuse_C)
    _info = dict(_C.build_info())
    if _info.get("torch_version") != torch.__version__:
        _error = (f"fastfuse._C was built for torch {_info.get('torch_version')} but torch {torch.__version__} "
                  "is installed")
except Exception as e:  # ImportError, or an undefined symbol from a build for another torch
    _error = f"fastfuse._C could not be loaded ({type(e).__name__}: {e})"


def available() -> bool:
    return _error is None


def has_cuda_kernels() -> bool:
    return available() and bool(_info.get("cuda"))


def status() -> str:
    if _error:
        return _error
    return f"built for torch {_info['torch_version']}, CUDA kernels {'built' if _info.get('cuda') else 'not built'}"


def require():
    """Raise a RuntimeError that says how to rebuild if the extension is unusable."""
    if _error:
        raise RuntimeError(f"{_error}. {REBUILD_HINT}")


def empty_cpu_cache() -> None:
    """Free the idle blocks of fastfuse's CPU output cache (big outputs reuse already-touched memory; see
    csrc/cpu/alloc.h). Like torch.cuda.empty_cache(): live tensors are untouched. FASTFUSE_CPU_CACHE_MB caps it."""
    if _C is not None and _error is None:
        _C.empty_cpu_cache()
