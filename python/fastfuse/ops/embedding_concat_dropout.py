"""fastfuse.embedding_concat_dropout: fast.ai's tabular input layer (one embedding per categorical column,
concatenated, embedding dropout, then the batch-normed continuous columns) in one fused op.

Path of a call: embedding_concat_dropout() validates, batch-norms x_cont (_batch_norm_cont), then
torch.ops.fastfuse.embedding_concat_dropout -> _route() -> the backend's gather+Philox kernel writing straight
into the (B, sum d_t + C) output. Backward: torch.ops.fastfuse.embedding_concat_dropout_backward regenerates
the mask and gives every table's gradient in one deterministic pass; x_cont's gradient is a slice of grad.
Eager CPU calls with bn_cont take _with_bn_fast instead: the batch norm inside the same C++ call each way.

Dropout indexing: element (b, j) of the (B, D) embedding block is element b*D + j of the Philox stream
(see reference.embedding_concat_keep_mask), identical on every backend."""
import torch

from .. import _backends, _double_backward, _library, _rng, reference  # noqa: F401  (_library defines the schemas)
from ._bn_module import cpp_bn_args
from .batch_norm import module_batch_norm



# ---- validation (clear errors before any kernel runs) ------------------------------------------------
def _validate(x_cat, weights, cont, tables=True):
    """tables=False: only the O(1) checks (the public wrapper; the router checks every table)."""
    if not isinstance(x_cat, torch.Tensor):
        raise TypeError(f"embedding_concat_dropout: x_cat must be a tensor, got {type(x_cat).__name__}")
    if x_cat.is_floating_point() or x_cat.is_complex() or x_cat.dtype == torch.bool:
        raise TypeError(f"embedding_concat_dropout: x_cat must hold integer category codes, got {x_cat.dtype}")
    if x_cat.dim() != 2:
        raise ValueError(f"embedding_concat_dropout: x_cat must be (batch, n_columns), got shape "
                         f"{tuple(x_cat.shape)}")
    if x_cat.shape[1] != len(weights):
        raise ValueError(f"embedding_concat_dropout: x_cat has {x_cat.shape[1]} columns but {len(weights)} "
                         f"embedding tables were given")
    if tables and weights and _tables_uniform(weights, x_cat.device):
        tables = False  # the common case, checked in one pass; the loop below names the culprit otherwise
    for t, w in enumerate(weights if tables else ()):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"embedding_concat_dropout: table {t} must be a 2-D floating-point tensor (n_t, d_t)")
        if w.dtype != weights[0].dtype or w.device != weights[0].device:
            raise ValueError(f"embedding_concat_dropout: table {t} is {w.dtype} on {w.device}, table 0 is "
                             f"{weights[0].dtype} on {weights[0].device}; all tables must match")
        if w.device != x_cat.device:
            raise ValueError(f"embedding_concat_dropout: x_cat is on {x_cat.device}, the tables on {w.device}")
    if cont is not None:
        if cont.dim() != 2:
            raise ValueError(f"embedding_concat_dropout: x_cont must be (batch, n_cont), got {tuple(cont.shape)}")
        if cont.shape[0] != x_cat.shape[0]:
            raise ValueError(f"embedding_concat_dropout: x_cat has batch size {x_cat.shape[0]} but x_cont has "
                             f"{cont.shape[0]}")


def _tables_uniform(weights, device) -> bool:
    try:
        sig = {(w.dim(), w.dtype, w.device) for w in weights}
    except AttributeError:
        return False
    return len(sig) == 1 and weights[0].dim() == 2 and weights[0].is_floating_point() and weights[0].device == device


def check_codes(x_cat: torch.Tensor, weights) -> None:
    """IndexError naming the first bad column and code, if any code is outside [0, n_t) of its table.
    The C++ CPU kernel does this inside its gather loop for free; on GPUs it costs a reduction and a sync,
    which `check_index=False` skips (the kernels then give zero rows for bad codes, never reading them)."""
    if x_cat.numel() == 0:
        return
    n = torch.tensor([w.shape[0] for w in weights], device=x_cat.device)
    bad = (x_cat < 0) | (x_cat >= n)
    if bool(bad.any()):
        b, t = bad.nonzero()[0].tolist()
        raise IndexError(f"embedding_concat_dropout: x_cat column {t} has code {int(x_cat[b, t])} (row {b}), "
                         f"outside [0, {weights[t].shape[0]}) of its embedding table")


# ---- kernels ------------------------------------------------------------------------------------------
def _fwd_cpp(x_cat, weights, p, key, offset, cont, check_index):
    return torch.ops.fastfuse_C.embedding_concat_dropout(x_cat, weights, p, key, offset, cont, check_index)


def _bwd_cpp(grad, x_cat, weights, p, key, offset):
    return torch.ops.fastfuse_C.embedding_concat_dropout_backward(grad, x_cat, weights, p, key, offset)


def _fwd_triton(x_cat, weights, p, key, offset, cont, check_index):
    from ..triton_kernels import embedding_concat_dropout as tk  # lazily: triton is optional and slow to import
    return tk.forward(x_cat, weights, p, key, offset, cont)


def _bwd_triton(grad, x_cat, weights, p, key, offset):
    from ..triton_kernels import embedding_concat_dropout as tk
    return tk.backward(grad, x_cat, weights, p, key, offset)


def _fwd_reference(x_cat, weights, p, key, offset, cont, check_index):
    return reference.embedding_concat_dropout(x_cat, weights, p, key, offset, cont)


_FWD = {"cpp": _fwd_cpp, "cuda": _fwd_cpp, "triton": _fwd_triton, "reference": _fwd_reference}
_BWD = {"cpp": _bwd_cpp, "cuda": _bwd_cpp, "triton": _bwd_triton,
        "reference": reference.embedding_concat_dropout_backward}


def _route(x_cat, weights, p, seed, cont, check_index=True):
    _validate(x_cat, weights, cont)
    backend = _backends.select(x_cat)
    x_cat = x_cat.to(torch.int64).contiguous()
    weights = [w.contiguous() for w in weights]
    if not weights:
        dtype = cont.dtype if cont is not None else torch.float32
        return reference.embedding_concat_dropout(x_cat, weights, 0.0, 0, 0, cont.to(dtype) if cont is not None
                                                  else None).to(dtype)
    if cont is not None:
        cont = cont.to(weights[0].dtype).contiguous()
    if check_index and backend != "cpp":
        check_codes(x_cat, weights)
    key, offset = _rng.seed_ints(seed)
    if p >= 1:  # everything dropped: no random words needed
        out = _FWD[backend](x_cat, weights, 0.0, key, offset, cont, check_index)
        out[:, :sum(w.shape[1] for w in weights)].mul_(0)  # as torch's x * 0: NaN stays NaN, negatives -0
        return out
    return _FWD[backend](x_cat, weights, p, key, offset, cont, check_index)


def _route_backward(grad, x_cat, weights, p, seed):
    backend = _backends.select(x_cat)
    x_cat = x_cat.to(torch.int64).contiguous()
    weights = [w.contiguous() for w in weights]
    if p >= 1 or not weights:
        return [torch.zeros_like(w) for w in weights]
    key, offset = _rng.seed_ints(seed)
    return _BWD[backend](grad.contiguous(), x_cat, weights, p, key, offset)


def _fake(x_cat, weights, p, seed, cont, check_index=True):
    width = sum(w.shape[1] for w in weights) + (cont.shape[1] if cont is not None else 0)
    dtype = weights[0].dtype if weights else (cont.dtype if cont is not None else torch.float32)
    return x_cat.new_empty((x_cat.shape[0], width), dtype=dtype)


def _fake_backward(grad, x_cat, weights, p, seed):
    return [torch.empty_like(w) for w in weights]


torch.library.register_kernel("fastfuse::embedding_concat_dropout", ("cpu", "cuda"), _route)
torch.library.register_kernel("fastfuse::embedding_concat_dropout_backward", ("cpu", "cuda"), _route_backward)
torch.library.register_fake("fastfuse::embedding_concat_dropout", _fake)
torch.library.register_fake("fastfuse::embedding_concat_dropout_backward", _fake_backward)


# ---- autograd -----------------------------------------------------------------------------------------
def _any(flag):
    return any(flag) if isinstance(flag, (list, tuple)) else bool(flag)


def _setup_context(ctx, inputs, output):
    x_cat, weights, p, seed, cont, _ = inputs
    ctx.p = p
    ctx.width = sum(w.shape[1] for w in weights)
    ctx.has_cont = cont is not None
    ctx.save_for_backward(x_cat, seed, *weights)  # weights only for their shapes; seed regenerates the mask


def _table_grads(grad, x_cat, weights, p, seed, need, backward_op):
    """The tables' gradients: by the op, or differentiable under create_graph=True (see _double_backward)."""
    if not _double_backward.wanted():
        return backward_op(grad, x_cat, weights, p, seed)
    key, offset = _rng.seed_ints(seed)
    width = sum(w.shape[1] for w in weights)
    return _double_backward.grads(lambda *ws: reference.embedding_concat_dropout(x_cat, list(ws), p, key, offset),
                                  weights, grad[:, :width], need)


def _backward(ctx, grad):
    x_cat, seed, *weights = ctx.saved_tensors
    grad_weights, grad_cont = [None] * len(weights), None  # a list either way: torch.library checks the structure
    need = ctx.needs_input_grad[1]
    if _any(need):
        need = list(need) if isinstance(need, (list, tuple)) else [need] * len(weights)
        grad_weights = _table_grads(grad, x_cat, weights, ctx.p, seed, need,
                                    torch.ops.fastfuse.embedding_concat_dropout_backward)
    if ctx.has_cont and ctx.needs_input_grad[4]:
        grad_cont = grad[:, ctx.width:]
    return None, grad_weights, None, None, grad_cont, None


torch.library.register_autograd("fastfuse::embedding_concat_dropout", _backward, setup_context=_setup_context)


# ---- eager fast path ----------------------------------------------------------------------------------
# The same kernels through a plain autograd.Function: torch.library's generic autograd wrapper flattens the
# 24-tensor list with pytree on every call and costs ~0.5 ms per forward+backward on CPU, more than the
# kernels themselves at Rossmann sizes. torch.compile (and torch.ops callers) keep using the registered op.
EAGER_FAST_PATH = True


class _EagerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_cat, p, seed, check_index, cont, *weights):
        out = _route(x_cat, list(weights), p, seed, cont, check_index)
        ctx.p, ctx.width, ctx.has_cont = p, out.shape[1] - (cont.shape[1] if cont is not None else 0), cont is not None
        ctx.save_for_backward(x_cat, seed, *weights)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_cat, seed, *weights = ctx.saved_tensors
        grad_weights = [None] * len(weights)
        if any(ctx.needs_input_grad[5:]):
            grad_weights = _table_grads(grad, x_cat, weights, ctx.p, seed, list(ctx.needs_input_grad[5:]),
                                        _route_backward)
        grad_cont = grad[:, ctx.width:] if ctx.has_cont and ctx.needs_input_grad[4] else None
        return (None, None, None, None, grad_cont, *grad_weights)


def _use_fast_path() -> bool:
    return EAGER_FAST_PATH and not torch.compiler.is_compiling()


# ---- eager CPU path with the continuous columns' batch norm in the same C++ calls --------------------------
# At Rossmann sizes a separate batch norm (its op, autograd node and Python, forward and backward) cost more than
# the embedding kernels. Here fastfuse_C::embedding_concat_dropout_bn runs bn_forward of x_cont, the gather + Philox
# kernel writing it beside the embeddings, and the running statistics update in one call; its autograd is C++
# (csrc/cpu/embedding_concat_dropout_autograd.cpp: the tables' gradients, then bn_backward, with no Python in
# between). The same kernels and ATen ops as the unfused path, so the same bits.
def _with_bn_fast(x_cat, weights, p, training, cont, bn, check_index):
    """embedding_concat_dropout with bn_cont through fastfuse_C::embedding_concat_dropout_bn, when it applies (the
    eager cpp backend, the usual dtypes); None otherwise, and the caller takes the general path. Arguments and
    checks are module_batch_norm's (ops/_bn_module.py) and _validate's (the tables' in C++), so errors and
    semantics are the same."""
    if (not _use_fast_path() or p >= 1 or not weights or not x_cat.is_cpu or not cont.is_cpu or cont.dim() != 2
            or cont.shape[0] == 0 or not cont.is_contiguous() or _backends.select(x_cat) != "cpp"):
        return None
    bn_args = cpp_bn_args(bn, cont.shape, cont.dtype, training)  # batch_norm()'s checks first, as on the general path
    if bn_args is None:
        return None
    *bn_args, weight, bias = bn_args
    if cont.dtype != weights[0].dtype:
        return None
    # the tables are checked in C++ (check_tables in csrc/embedding_concat_dropout.h: _validate's errors)
    p = p if training else 0.0
    x_cat = x_cat if x_cat.dtype == torch.int64 and x_cat.is_contiguous() else x_cat.to(torch.int64).contiguous()
    # seed None: for p > 0 the op draws it as _rng.new_seed() would (csrc/cpu/seed.h)
    return torch.ops.fastfuse_C.embedding_concat_dropout_bn(x_cat, weights, p, None, None, cont, weight, bias,
                                                            *bn_args, check_index)[0]


# ---- continuous columns -------------------------------------------------------------------------------
def _batch_norm_cont(x_cont: torch.Tensor, bn, training: bool) -> torch.Tensor:
    """BatchNorm1d's forward (torch's module rules, momentum=None included) on the continuous columns, by
    fastfuse.batch_norm; `bn` is a BatchNorm1d or anything with its attributes."""
    if x_cont.shape[0] == 0:
        return x_cont.clone()
    return module_batch_norm(bn, x_cont, training)


# ---- public API ---------------------------------------------------------------------------------------
def embedding_concat_dropout(x_cat: torch.Tensor, weights, p: float = 0.0, training: bool = True,
                             x_cont: torch.Tensor = None, bn_cont=None, *, check_index: bool = True
                             ) -> torch.Tensor:
    """(B, sum d_t + C): [emb_0[x_cat[:, 0]], ..., emb_{T-1}[x_cat[:, T-1]]] with dropout p (when training),
    then x_cont batch-normed by `bn_cont` (a BatchNorm1d, or None to pass x_cont through).

    weights: T tables (tensors or nn.Embedding). Codes outside [0, n_t) raise IndexError naming the column
    and the value; check_index=False skips that check (it costs a device sync on GPUs), and such codes then
    give zero rows and no gradient."""
    weights = [w.weight if isinstance(w, torch.nn.Embedding) else w for w in weights]
    return tensor_tables_forward(x_cat, weights, p, training, x_cont, bn_cont, check_index)


def tensor_tables_forward(x_cat, weights, p, training, x_cont, bn_cont, check_index):
    """embedding_concat_dropout with `weights` a list of tensors (fastfuse.nn.TabularEmbedding's entry)."""
    p = _rng.check_p(p)
    if x_cont is not None and not isinstance(x_cont, torch.Tensor):
        raise TypeError(f"embedding_concat_dropout: x_cont must be a tensor or None, got {type(x_cont).__name__}")
    _validate(x_cat, weights, x_cont, tables=False)
    cont = x_cont
    if cont is not None and cont.shape[1] == 0:
        cont = None
    if cont is not None and bn_cont is not None:
        out = _with_bn_fast(x_cat, weights, p, training, cont, bn_cont, check_index)
        if out is not None:
            return out
        cont = _batch_norm_cont(cont, bn_cont, training)
    if weights and cont is not None and cont.dtype != weights[0].dtype:
        cont = cont.to(weights[0].dtype)
    if not weights:
        return cont if cont is not None else x_cat.new_empty((x_cat.shape[0], 0), dtype=torch.float32)
    p = p if training else 0.0
    seed = _rng.new_seed() if p > 0 else _rng.NO_SEED
    if _use_fast_path():
        return _EagerFunction.apply(x_cat, p, seed, check_index, cont, *weights)
    return torch.ops.fastfuse.embedding_concat_dropout(x_cat, weights, p, seed, cont, check_index)
