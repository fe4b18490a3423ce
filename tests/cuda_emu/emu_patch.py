"""Imported by the transformed test module: routes fastfuse's "cuda" backend to the emulated kernels for CPU
tensors. ffemu (built and put on sys.path by run.py) registers the CUDA kernels of the public ops as the CPU
kernels of namespace fastfuse_emu, whose schemas are defined here from fastfuse's; under use_backend("cuda") the
C++ CPU kernels hand each call to the Python router (as for a Python backend), which calls fastfuse_emu.

Each emulated op runs under _NoHostSync: the ATen calls its own code makes must not read device data on the host
(see run.py's docstring)."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastfuse
from fastfuse import _backends

_aten = torch.ops.aten
# ATen ops that, on CUDA tensors, copy device data to the host (a stream sync; illegal during graph capture)
_SYNCING = {_aten.item.default, _aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default,
            _aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default, _aten.unique_dim.default,
            _aten.unique_consecutive.default, _aten.repeat_interleave.Tensor}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class HostSyncError(RuntimeError):
    pass


def _devices(args, kwargs):
    flat = torch.utils._pytree.tree_leaves((args, kwargs))
    return {a.device for a in flat if isinstance(a, torch.Tensor)} | {
        torch.device(a) for a in flat if isinstance(a, torch.device)}


class _NoHostSync(TorchDispatchMode):
    """Raises HostSyncError when the emulated op's own code calls an ATen op that syncs on a GPU. The emulated
    op is entered with the mode still active (redispatched to its CPU kernel), so its direct ATen calls come
    here; what those calls do inside ATen runs without the mode."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastfuse_emu":
            with self:
                return func.redispatch(_CPU, *args, **kwargs)
        copies = func in (_aten._to_copy.default, _aten.copy_.default) and len(_devices(args, kwargs)) > 1
        if func in _SYNCING or copies:
            raise HostSyncError(f"emulated CUDA op fastfuse::{self.name} calls {func}: on a GPU that reads device "
                                "data on the host (a sync, and a failure under CUDA-graph capture)")
        return func(*args, **kwargs)

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
        with _NoHostSync(name):
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
