"""Which backend runs a fastfuse op: "cpp" (C++ CPU kernels), "cuda" (CUDA C++ kernels), "triton", or
"reference" (pure PyTorch, fastfuse.reference).

The C++ kernels are registered on the dispatcher for CPU and CUDA tensors, so the default path runs no Python.
`use_backend(name)` (thread-local, nestable) or the environment variable FASTFUSE_BACKEND set an override that
the C++ kernel reads (csrc/backend.h). For a Python backend the kernel calls fastfuse_py::<op>, an op with the
public op's schema whose kernel, `_route` below, runs the implementation that ops/<op>.py registered. The choice
is made when the kernel runs, so it applies to code compiled with torch.compile too; a backward runs on the
backend of its forward."""
import contextlib
import importlib.util
import os

import torch

from . import _extension

NAMES = ("cpp", "cuda", "triton", "reference")
_CODE = {None: 0, "cpp": 1, "cuda": 2, "triton": 3, "reference": 4}
_NAME = {v: k for k, v in _CODE.items()}
# The faster of "cuda" and "triton" in `python -m fastfuse.bench --device cuda` (see benchmarks/results/).
DEFAULT_CUDA = "cuda"

_IMPLS = {}  # op name -> {"triton": fn, "reference": fn}
_py_lib = None


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
        "default": {"cpu": "cpp", "cuda": DEFAULT_CUDA, "override": current()},
    }


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastfuse backend {name!r}; choose one of {NAMES}")
    return name


def current():
    """This thread's override (None: the default for the tensor's device)."""
    return _NAME[_extension._C.current_backend()] if _extension.available() else None


@contextlib.contextmanager
def use_backend(name: str):
    """Run fastfuse ops with this backend inside the block (thread-local, nestable)."""
    code = _CODE[_check_name(name)]
    _extension.require()
    prev = _extension._C.set_backend(code)
    try:
        yield
    finally:
        _extension._C.set_backend(prev)


def register(name: str, **impls):
    """The Python backends of op fastfuse::<name> (triton=..., reference=...), each taking the op's arguments.
    Defines fastfuse_py::<name>, which the C++ kernels call when the override names one of them."""
    global _py_lib
    if not _extension.available():
        return
    if _py_lib is None:
        _py_lib = torch.library.Library("fastfuse_py", "DEF")
    schema = str(getattr(torch.ops.fastfuse, name).default._schema).split("::", 1)[1]
    _py_lib.define(schema)
    _IMPLS[name] = impls
    _py_lib.impl(name, lambda *args: _route(name, args), "CompositeExplicitAutograd")


def _route(name, args):
    backend = current()
    if backend == "triton":
        dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if dev == "cpu" and not triton_interpret():
            raise RuntimeError("fastfuse backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               "triton is imported to run on CPU tensors")
    return _IMPLS[name][backend](*args)


def _env_default():
    env = os.environ.get("FASTFUSE_BACKEND")
    if env and _extension.available():
        _extension._C.set_backend(_CODE[_check_name(env)])  # the importing thread's override


_env_default()
