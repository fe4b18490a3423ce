"""Imported by the transformed test module: routes fastfuse's "cuda" backend to the emulated kernels for CPU
tensors. ffemu (built and put on sys.path by run.py) registers the CUDA kernels of the public ops as the CPU
kernels of namespace fastfuse_emu, whose schemas are defined here from fastfuse's; under use_backend("cuda") the
C++ CPU kernels hand each call to the Python router (as for a Python backend), which calls fastfuse_emu."""
import contextlib

import torch
import fastfuse
from fastfuse import _backends

_lib = torch.library.Library("fastfuse_emu", "DEF")
_OPS = [name for name in _backends._IMPLS]
for _name in _OPS:
    _lib.define(str(getattr(torch.ops.fastfuse, _name).default._schema).split("::", 1)[1])

import ffemu  # noqa: E402,F401  (registers the emulated kernels)

_emulating = []
_route = _backends._route
_use_backend = _backends.use_backend


def _route_emulated(name, args):
    if _emulating and _emulating[-1]:
        return getattr(torch.ops.fastfuse_emu, name)(*args)
    return _route(name, args)


@contextlib.contextmanager
def _use_backend_emulated(name):
    with _use_backend("reference" if name == "cuda" else name):  # any Python backend: the router decides
        _emulating.append(name == "cuda")
        try:
            yield
        finally:
            _emulating.pop()


_backends._route = _route_emulated
_backends.use_backend = fastfuse.use_backend = _use_backend_emulated
