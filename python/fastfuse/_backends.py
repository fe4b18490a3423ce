"""Which backend runs a fastfuse op: "cpp" (C++ CPU kernels), "cuda" (CUDA C++ kernels), "triton", or
"reference" (pure PyTorch, fastfuse.reference).

Defaults: "cpp" for CPU tensors, DEFAULT_CUDA for CUDA tensors. `use_backend(name)` or the environment
variable FASTFUSE_BACKEND override the default. The choice is made when the kernel runs (inside the op),
so it also applies to code compiled with torch.compile."""
import contextlib
import importlib.util
import os
import threading

import torch

from . import _extension

NAMES = ("cpp", "cuda", "triton", "reference")
# The faster of "cuda" and "triton" in `python -m fastfuse.bench --device cuda` (see benchmarks/results/).
DEFAULT_CUDA = "cuda"

_local = threading.local()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "CUDA tensors" + (" and CPU tensors (TRITON_INTERPRET=1)" if triton_interpret() else "")
    if triton_interpret():
        return True, "CPU tensors through the interpreter (TRITON_INTERPRET=1)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"


def backends() -> dict:
    """What is available here: {name: {"available": bool, "detail": str}}, plus the current defaults."""
    ext_ok = _extension.available()
    cuda_ok = _extension.has_cuda_kernels() and torch.cuda.is_available()
    if not _extension.has_cuda_kernels():
        cuda_detail = _extension.status() if not ext_ok else "fastfuse._C was built without CUDA kernels"
    elif not torch.cuda.is_available():
        cuda_detail = "CUDA kernels built, but no CUDA device is visible"
    else:
        cuda_detail = f"CUDA kernels on {torch.cuda.get_device_name()}"
    tri_ok, tri_detail = _triton_status()
    return {
        "cpp": {"available": ext_ok, "detail": _extension.status()},
        "cuda": {"available": cuda_ok, "detail": cuda_detail},
        "triton": {"available": tri_ok, "detail": tri_detail},
        "reference": {"available": True, "detail": "pure PyTorch (fastfuse.reference)"},
        "default": {"cpu": "cpp", "cuda": DEFAULT_CUDA, "override": _override()},
    }


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastfuse backend {name!r}; choose one of {NAMES}")
    return name


def _override():
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("FASTFUSE_BACKEND")
    return _check_name(env) if env else None


def eager_cpp(x) -> bool:
    """True when x is a plain CPU tensor that the cpp backend would run in eager mode (not under torch.compile): the
    test of the ops' C++ autograd nodes, which skip the registered op's Python (csrc/cpu/*_autograd.cpp). Reads what
    select() reads without its checks, as it runs on every call."""
    return (type(x) is torch.Tensor and x.is_cpu and not torch.compiler.is_compiling() and _override() in (None, "cpp")
            and _extension.available())


@contextlib.contextmanager
def use_backend(name: str):
    """Run fastfuse ops with this backend inside the block (thread-local, nestable)."""
    _check_name(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def select(x: torch.Tensor) -> str:
    """The backend for an op whose main input is x; raises if that backend cannot take x's device."""
    dev = x.device.type
    name = _override() or ("cpp" if dev == "cpu" else DEFAULT_CUDA)
    if name == "cpp" and dev != "cpu":
        raise RuntimeError(f"fastfuse backend 'cpp' runs CPU tensors, got a {dev} tensor; use 'cuda' or 'triton'")
    if name == "cuda" and dev != "cuda":
        raise RuntimeError(f"fastfuse backend 'cuda' runs CUDA tensors, got a {dev} tensor; use 'cpp'")
    if name == "triton" and dev == "cpu" and not triton_interpret():
        raise RuntimeError("fastfuse backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported to run on CPU tensors")
    if name in ("cpp", "cuda"):
        _extension.require()
        if name == "cuda" and not _extension.has_cuda_kernels():
            raise RuntimeError("fastfuse._C was built without CUDA kernels (no CUDA toolkit at build time). "
                               + _extension.REBUILD_HINT)
    return name
