"""ops/_bn_module.cpp_bn_args: the BatchNorm arguments of the fused C++ CPU paths (TabularEmbedding's bn_cont,
LinBnDrop). Its fast reading of a torch BatchNorm's dicts must give what module_bn_args + batch_norm()'s checks
give, or defer to them (None), for every module configuration; errors come from the general path."""
import pytest
import torch

import fastfuse
from fastfuse.ops import _bn_module

CONFIGS = {
    "default": dict(),
    "momentum_none": dict(momentum=None),
    "no_track": dict(track_running_stats=False),
    "no_affine": dict(affine=False),
    "int_momentum": dict(momentum=1),
    "stats_float64": "double_stats",
    "track_toggled_off": "toggle",
    "running_mean_wrong_size": "bad_size",
}


def _module(name):
    cfg = CONFIGS[name]
    bn = torch.nn.BatchNorm1d(6, **(cfg if isinstance(cfg, dict) else {}))
    if cfg == "double_stats":
        bn.running_mean, bn.running_var = bn.running_mean.double(), bn.running_var.double()
    elif cfg == "toggle":  # buffers kept, but no longer tracked: eval uses them, training neither uses nor updates
        bn.track_running_stats = False
    elif cfg == "bad_size":
        bn.running_mean = torch.zeros(5)
    return bn


def _same(a, b):
    return a is b if isinstance(a, torch.Tensor) or a is None else a == b and type(a) is type(b)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_args_equal_general_or_defer(name, training, rows, dtype):
    bn = _module(name)
    lean = _bn_module._lean_args(bn, (rows, 6), dtype, training)
    try:
        general = _bn_module._general_args(bn, (rows, 6), dtype, training, "relu")
    except (ValueError, RuntimeError, TypeError):
        assert lean is None  # every error is the general path's
        return
    if lean is not None:
        assert general is not None and len(lean) == len(general)
        assert all(_same(a, b) for a, b in zip(lean, general)), (lean, general)
    if name in ("default", "momentum_none", "no_track", "no_affine") and rows > 1 and general is not None:
        assert lean is not None  # the common cases take the fast reading


def test_fused_paths_raise_batch_norms_errors_and_change_nothing():
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean = torch.zeros(4)
    x_cat, ws, xc = torch.zeros(8, 1, dtype=torch.long), [torch.randn(2, 3)], torch.randn(8, 3)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements"):
        fastfuse.embedding_concat_dropout(x_cat, ws, 0.1, True, xc, bn)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastfuse.embedding_concat_dropout(x_cat[:1], ws, 0.1, True, xc[:1], torch.nn.BatchNorm1d(3))
    m = fastfuse.nn.LinBnDrop(5, 3, p=0.2, act=torch.nn.ReLU(), lin_first=True)
    m[2].running_var = torch.ones(2)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="running_var should contain 3 elements"):
        m(torch.randn(8, 5))
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
