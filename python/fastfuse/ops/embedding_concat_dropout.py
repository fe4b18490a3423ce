"""fastfuse.embedding_concat_dropout: fast.ai's tabular input layer (one embedding per categorical column,
concatenated, embedding dropout, then the batch-normed continuous columns) in one fused op.

A call: embedding_concat_dropout() validates, batch-norms x_cont with fastfuse.batch_norm, then calls
fastfuse::embedding_concat_dropout, whose autograd (csrc/embedding_concat_dropout.cpp) and kernels
(csrc/cpu/embedding_concat_dropout_kernel.cpp, csrc/cuda/embedding_concat_dropout_kernel.cu) are C++: the gather and
the Philox mask write straight into the (B, sum d_t + C) output; the backward regenerates the mask and gives every
table's gradient in one deterministic pass; x_cont's gradient is a slice of the output's. This file holds the
fake kernels and the Python backends (triton, reference).

Dropout indexing: element (b, j) of the (B, D) embedding block is element b*D + j of the Philox stream
(see reference.embedding_concat_keep_mask), identical on every backend."""
import torch

from .. import _backends, _extension, _rng, reference
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


# ---- Python backends and fakes -------------------------------------------------------------------------
def _triton_forward(x_cat, weights, p, key, offset, cont):
    from ..triton_kernels import embedding_concat_dropout as tk  # lazily: triton is optional and slow to import
    return tk.forward(x_cat, weights, p, key, offset, cont)


def _triton_backward(grad, x_cat, weights, p, key, offset):
    from ..triton_kernels import embedding_concat_dropout as tk
    return tk.backward(grad, x_cat, weights, p, key, offset)


def _python_forward(run):
    """The op on a Python backend, with the rules of csrc/embedding_concat_dropout.h around its kernel."""
    def forward(x_cat, weights, p, seed, cont, check_index):
        _validate(x_cat, weights, cont)
        x_cat = x_cat.to(torch.int64).contiguous()
        weights = [w.contiguous() for w in weights]
        if not weights:
            return cont.clone() if cont is not None else x_cat.new_empty((x_cat.shape[0], 0), dtype=torch.float32)
        if cont is not None:
            cont = cont.to(weights[0].dtype).contiguous()
        if check_index:
            torch.ops.fastfuse_C.embedding_check_codes(x_cat, weights)
        key, offset = _rng.seed_ints(seed) if p > 0 else (0, 0)
        if p >= 1:  # everything dropped: as torch's x * 0 (NaN stays NaN, negatives -0)
            out = run(x_cat, weights, 0.0, key, offset, cont)
            out[:, :sum(w.shape[1] for w in weights)].mul_(0)
            return out
        return run(x_cat, weights, p, key, offset, cont)
    return forward


def _python_backward(run):
    def backward(grad, x_cat, weights, p, seed):
        x_cat = x_cat.to(torch.int64).contiguous()
        weights = [w.contiguous() for w in weights]
        if p >= 1 or not weights:
            return [torch.zeros_like(w) for w in weights]
        key, offset = _rng.seed_ints(seed) if p > 0 else (0, 0)
        return run(grad.contiguous(), x_cat, weights, p, key, offset)
    return backward


def _fake(x_cat, weights, p, seed, cont, check_index):
    width = sum(w.shape[1] for w in weights) + (cont.shape[1] if cont is not None else 0)
    dtype = weights[0].dtype if weights else (cont.dtype if cont is not None else torch.float32)
    return x_cat.new_empty((x_cat.shape[0], width), dtype=dtype)


def _fake_backward(grad, x_cat, weights, p, seed):
    return [torch.empty_like(w) for w in weights]


if _extension.available():
    torch.library.register_fake("fastfuse::embedding_concat_dropout", _fake)
    torch.library.register_fake("fastfuse::embedding_concat_dropout_backward", _fake_backward)
    _backends.register("embedding_concat_dropout", triton=_python_forward(_triton_forward),
                       reference=_python_forward(reference.embedding_concat_dropout))
    _backends.register("embedding_concat_dropout_backward", triton=_python_backward(_triton_backward),
                       reference=_python_backward(reference.embedding_concat_dropout_backward))


# ---- continuous columns -------------------------------------------------------------------------------
def _batch_norm_cont(x_cont: torch.Tensor, bn, training: bool) -> torch.Tensor:
    """BatchNorm1d's forward (torch's module rules, momentum=None included) on the continuous columns, by
    fastfuse.batch_norm; `bn` is a BatchNorm1d or anything with its attributes."""
    if hasattr(bn, "process_group"):  # a SyncBatchNorm (torch's or fastfuse's): its own forward, whose statistics
        return bn(x_cont)              # span the ranks (an empty rank joins them too)
    if x_cont.shape[0] == 0:
        return x_cont.clone()
    return module_batch_norm(bn, x_cont, training)


# ---- public API ---------------------------------------------------------------------------------------
def embedding_concat_dropout(x_cat: torch.Tensor, weights, p: float = 0.0, training: bool = True,
                             x_cont: torch.Tensor = None, bn_cont=None, *, check_index: bool = True
                             ) -> torch.Tensor:
    """(B, sum d_t + C): [emb_0[x_cat[:, 0]], ..., emb_{T-1}[x_cat[:, T-1]]] with dropout p (when training),
    then x_cont batch-normed by `bn_cont` (a BatchNorm1d, or None to pass x_cont through).

    weights: T tables (tensors or nn.Embedding). Codes outside [0, n_t): on CPU an IndexError naming the column
    and the value; on CUDA a device-side assert (no host sync), which, as nn.Embedding's, raises at the next
    synchronising call. check_index=False skips that check, and such codes then give zero rows and no gradient."""
    weights = [w.weight if isinstance(w, torch.nn.Embedding) else w for w in weights]
    return tensor_tables_forward(x_cat, weights, p, training, x_cont, bn_cont, check_index)


def tensor_tables_forward(x_cat, weights, p, training, x_cont, bn_cont, check_index):
    """embedding_concat_dropout with `weights` a list of tensors (fastfuse.nn.TabularEmbedding's entry)."""
    p = _rng.check_p(p)
    if x_cont is not None and not isinstance(x_cont, torch.Tensor):
        raise TypeError(f"embedding_concat_dropout: x_cont must be a tensor or None, got {type(x_cont).__name__}")
    _validate(x_cat, weights, x_cont, tables=bn_cont is not None)
    cont = x_cont
    if cont is not None and cont.shape[1] == 0:
        cont = None
    if cont is not None and bn_cont is not None:
        if check_index and weights and not torch.compiler.is_compiling():  # before the running statistics change
            torch.ops.fastfuse_C.embedding_check_codes(x_cat, weights)
        cont = _batch_norm_cont(cont, bn_cont, training)
    if weights and cont is not None and cont.dtype != weights[0].dtype:
        cont = cont.to(weights[0].dtype)
    if not weights:
        return cont if cont is not None else x_cat.new_empty((x_cat.shape[0], 0), dtype=torch.float32)
    p = p if training else 0.0
    _extension.require()
    seed = torch.ops.fastfuse.seed() if p > 0 else _rng.NO_SEED
    return torch.ops.fastfuse.embedding_concat_dropout(x_cat, weights, p, seed, cont, check_index)
