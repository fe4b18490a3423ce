"""Imported by the transformed test module: routes fastfuse's "cuda" backend to the emulated kernels (ffemu,
built and put on sys.path by run.py) for CPU tensors, through the tables the ops route by, so the Python op
layer runs unchanged."""
import importlib
import types

import torch  # noqa: F401  (loads libtorch before ffemu)
import ffemu as E
from fastfuse import _backends

drop = importlib.import_module("fastfuse.ops.dropout")
ecd = importlib.import_module("fastfuse.ops.embedding_concat_dropout")
bn = importlib.import_module("fastfuse.ops.batch_norm")
rc = importlib.import_module("fastfuse.ops.reflect_conv2d")

_select = _backends.select


def _select_emulated(x):
    return "cuda" if _backends._override() == "cuda" else _select(x)


_backends.select = _select_emulated
drop._KERNELS["cuda"] = E.dropout
ecd._FWD["cuda"] = lambda x, ws, p, k, o, c, ci: E.ecd(x, ws, p, k, o, c, ci)
ecd._BWD["cuda"] = E.ecd_backward
bn._CUDA = types.SimpleNamespace(bn_stats=E.bn_stats, bn_apply=E.bn_apply, bn_grad_reduce=E.bn_grad_reduce,
                                 bn_grad_apply=E.bn_grad_apply)
rc._FWD["cuda"] = lambda x, w, b, s, p, d, g: E.reflect_conv2d(x, w, b, list(s), list(p), list(d), g, rc._algo())
rc._BWD["cuda"] = lambda go, x, w, s, p, d, g, m: E.reflect_conv2d_backward(go, x, w, list(s), list(p), list(d), g,
                                                                             list(m), rc._algo())
