"""Every module under torch.inference_mode(), in eval and in training (running statistics still update), equals
its torch twin. The C++ kernels' worker threads do not inherit the caller's inference mode, so an in-place ATen
op there on an inference tensor failed ("Inplace update to inference tensor outside InferenceMode")."""
import pytest
import torch
from torch import nn

import fastfuse
from fastfuse.models import EagerTabularModel, TabularModel

from conftest import CPU_BACKENDS


def _twins():
    """(name, fastfuse module, torch twin with the same state, input args)"""
    torch.manual_seed(0)
    x_cat = torch.stack([torch.randint(0, 5, (12,)), torch.randint(0, 4, (12,))], 1)
    args = dict(emb_szs=[(5, 3), (4, 2)], n_cont=2, out_sz=1, layers=[8, 6], y_range=(0, 3))
    tab_e = EagerTabularModel(**args)
    tab_f = TabularModel(**args)
    tab_f.load_state_dict(tab_e.state_dict())
    lin_f = fastfuse.nn.LinBnDrop(6, 8, act=nn.ReLU(), lin_first=True)  # the one-call C++ path
    lin_e = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.BatchNorm1d(8))
    lin_e.load_state_dict(lin_f.state_dict())
    conv_f = fastfuse.nn.ConvLayer(3, 4)
    conv_e = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(4),
                           nn.ReLU())
    conv_e.load_state_dict(conv_f.state_dict())
    return [
        ("TabularModel", tab_f, tab_e, (x_cat, torch.randn(12, 2))),
        ("LinBnDrop", lin_f, lin_e, (torch.randn(12, 6),)),
        ("ConvLayer", conv_f, conv_e, (torch.randn(2, 3, 7, 6),)),
        ("BatchNorm2d", fastfuse.fuse(nn.BatchNorm2d(3)), nn.BatchNorm2d(3),
         (torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last),)),
        ("ReflectConv2d", fastfuse.nn.ReflectConv2d(3, 4, 3, padding=1), None, (torch.randn(2, 3, 6, 6),)),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("which", range(5))
def test_modules_under_inference_mode(backend, training, which):
    name, fused, twin, inputs = _twins()[which]
    if backend == "triton" and name in ("TabularModel", "LinBnDrop"):
        pytest.skip("slow in the interpreter; the C++ path is the one with worker threads")
    if twin is None:  # ReflectConv2d: nn.Conv2d(padding_mode='reflect') with its weights
        twin = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        twin.load_state_dict(fused.state_dict())
    fused.train(training), twin.train(training)
    with torch.inference_mode(), fastfuse.use_backend(backend):
        y = fused(*inputs)
        y_ref = twin(*inputs)
    assert y.is_inference()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for (key, a), b in zip(fused.state_dict().items(), twin.state_dict().values()):  # running stats updated alike
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)
