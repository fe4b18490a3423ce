"""Which backend runs a fastfuse op: "cpp" (C++ CPU kernels), "cuda" (CUDA C++ kernels), "triton", or
"reference" (pure PyTorch, fastfuse.reference).

The C++ kernels are registered on the dispatcher for CPU and CUDA tensors. `use_backend(name)` (thread-local,
nestable) or the environment variable FASTFUSE_BACKEND set an override that the C++ kernel reads
(csrc/backend.h). Without an override each op runs on its default for the tensor's device, a process-wide table in
C++ set here at import: on CPU tensors the C++ kernels (so the CPU default path runs no Python); on CUDA tensors
the fastest of "cuda", "triton" and "reference" in the committed GPU results (_cuda_defaults.json, written from a
`.ci/gpu check` run), and "reference" for an op those results do not cover (UNMEASURED). For a Python backend the kernel calls fastfuse_py::<op>, an op with the
public op's schema whose kernel, `_route` below, runs the implementation that ops/<op>.py registered. The choice
is made when the kernel runs, so it applies to code compiled with torch.compile too; a backward runs on the
backend of its forward."""
import contextlib
import importlib.util
import json
import os

import torch

from . import _extension

NAMES = ("cpp", "cuda", "triton", "reference")
_CODE = {None: 0, "cpp": 1, "cuda": 2, "triton": 3, "reference": 4}
_NAME = {v: k for k, v in _CODE.items()}
# The public ops that have a per-device default (lin_bn_drop composes batch_norm and follows its default).
OPS = ("dropout", "batch_norm", "embedding_concat_dropout", "reflect_conv2d")
# The CUDA default of an op no GPU run has timed: torch's own kernels (cuDNN's conv, ATen's elementwise and
# reductions), with fastfuse's masks. Every CUDA and Triton kernel here was written without a GPU to run it on; until
# a committed run shows one faster, a user of fuse() on a GPU gets results checked against the reference and speed
# no worse than torch's own path for the parts it computes, never an untimed kernel.
UNMEASURED = "reference"
# {"ranking": {op: [backends, fastest first]}, ...}: the committed choice, written by `.ci/gpu check`
# (fastfuse.bench.choose_defaults over its `python -m fastfuse.bench --device cuda` results)
CUDA_DEFAULTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda_defaults.json")

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
        "default": {"cpu": "cpp", "cuda": {op: default(op, "cuda") for op in OPS}, "override": current(),
                    "cuda_unmeasured": [op for op in OPS if op not in _measured]},
    }


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastfuse backend {name!r}; choose one of {NAMES}")
    return name


def current():
    """This thread's override (None: the default for the tensor's device)."""
    return _NAME[_extension._C.current_backend()] if _extension.available() else None


def default(op: str, device: str) -> str:
    """The backend op runs on for tensors of `device` ("cpu" or "cuda") when no override is set."""
    if not _extension.available():
        return "reference"
    code = _extension._C.default_backend(op, device == "cuda")
    return _NAME[code] or ("cuda" if device == "cuda" else "cpp")


def set_default(op: str, device: str, name: str) -> str:
    """Make `name` op's default for `device` tensors, process-wide (the autograd engine's threads included);
    returns the previous default. For the import-time choice, tests and benchmarks: users pick with use_backend."""
    if op not in OPS:
        raise ValueError(f"unknown fastfuse op {op!r}; choose one of {OPS}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"fastfuse backend defaults are per 'cpu' or 'cuda' device, got {device!r}")
    _extension.require()
    prev = default(op, device)
    native = "cuda" if device == "cuda" else "cpp"
    code = 0 if _check_name(name) == native else _CODE[name]  # 0: the device's C++ kernel, read without a check
    _extension._C.set_default_backend(op, device == "cuda", code)
    return prev


@contextlib.contextmanager
def defaults(device: str, name: str):
    """Every op's default for `device` set to `name` inside the block (process-wide; not for concurrent use)."""
    prev = {op: set_default(op, device, name) for op in OPS}
    try:
        yield
    finally:
        for op, p in prev.items():
            set_default(op, device, p)


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
    dev = next(a.device.type for a in args if isinstance(a, torch.Tensor))
    backend = current() or default(name.removesuffix("_backward"), dev)
    if backend == "triton":
        if dev == "cpu" and not triton_interpret():
            raise RuntimeError("fastfuse backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                               "triton is imported to run on CPU tensors")
    return _IMPLS[name][backend](*args)


def read_cuda_defaults(path=CUDA_DEFAULTS_FILE) -> dict:
    """{op: backend}: the fastest backend available here in the committed GPU results ("triton" only where triton
    is installed); ops they do not cover are left out."""
    try:
        with open(path) as f:
            ranking = json.load(f).get("ranking", {})
    except FileNotFoundError:
        return {}
    usable = {"cuda", "reference"} | ({"triton"} if importlib.util.find_spec("triton") is not None else set())
    out = {}
    for op, names in ranking.items():
        names = [n for n in names if n in usable]
        if op in OPS and names:
            out[op] = names[0]
    return out


_measured = {}  # op -> its CUDA default from the committed results


def _set_cuda_defaults(path=None):
    """At import: each op's CUDA default from the committed results (path: another results file, for tests),
    UNMEASURED for the others."""
    if not _extension.available():
        return
    _measured.clear()
    _measured.update(read_cuda_defaults(path or CUDA_DEFAULTS_FILE))
    for op in OPS:
        set_default(op, "cuda", _measured.get(op, UNMEASURED))


def _env_default():
    env = os.environ.get("FASTFUSE_BACKEND")
    if env and _extension.available():
        _extension._C.set_backend(_CODE[_check_name(env)])  # the importing thread's override


_set_cuda_defaults()
_env_default()
