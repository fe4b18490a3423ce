"""Each op's default backend per device: a process-wide table in C++ (csrc/backend.*) that Python sets at import.
CUDA tensors get the fastest backend in the committed GPU results, and the reference where none was measured; CPU
tensors get the C++ kernels. Here (no GPU) the mechanism is checked by forcing a CPU default."""
import json
import threading

import pytest
import torch

import fastfuse
from fastfuse import _backends
from conftest import CPP, bits

pytestmark = pytest.mark.skipif(not CPP, reason="fastfuse._C not built")


def test_unmeasured_cuda_defaults_are_the_reference():
    measured = _backends.read_cuda_defaults()
    info = fastfuse.backends()["default"]
    assert info["cpu"] == "cpp"
    for op in _backends.OPS:
        assert info["cuda"][op] == measured.get(op, "reference") == _backends.default(op, "cuda")
    assert info["cuda_unmeasured"] == [op for op in _backends.OPS if op not in measured]


@pytest.fixture
def counted_reference(monkeypatch):
    """Counts the calls of dropout's reference backend (forward and backward), which _route looks up per call."""
    calls = []
    for name in ("dropout", "dropout_backward"):
        impls = dict(_backends._IMPLS[name])
        inner = impls["reference"]
        impls["reference"] = lambda *a, inner=inner, name=name: calls.append(name) or inner(*a)
        monkeypatch.setitem(_backends._IMPLS, name, impls)
    return calls


def test_a_forced_cpu_default_runs_forward_and_backward_everywhere(counted_reference):
    x = torch.randn(5, 300, requires_grad=True)
    seed = torch.tensor([3, 9])

    def step():
        y = torch.ops.fastfuse.dropout(x, 0.4, seed)
        return y, torch.autograd.grad(y, x, torch.ones_like(y))[0]

    y_cpp, g_cpp = step()
    assert counted_reference == []
    prev = _backends.set_default("dropout", "cpu", "reference")
    try:
        assert prev == "cpp" and _backends.default("dropout", "cpu") == "reference"
        y, g = step()
        assert counted_reference == ["dropout", "dropout_backward"]
        assert torch.equal(bits(y), bits(y_cpp)) and torch.equal(g, g_cpp)  # same Philox masks
        box = []  # process-wide: another thread (as the autograd engine's) sees it too
        t = threading.Thread(target=lambda: box.append(torch.ops.fastfuse.dropout(x.detach(), 0.4, seed)))
        t.start()
        t.join()
        assert counted_reference[-1] == "dropout" and len(counted_reference) == 3
        with fastfuse.use_backend("cpp"):  # an override beats the default
            step()
        assert len(counted_reference) == 3
        assert _backends.default("batch_norm", "cpu") == "cpp"  # per op
    finally:
        _backends.set_default("dropout", "cpu", prev)
    step()
    assert len(counted_reference) == 3 and _backends.default("dropout", "cpu") == "cpp"


def test_set_default_refuses_what_cannot_run():
    with pytest.raises(RuntimeError, match="runs CUDA tensors only"):
        _backends.set_default("dropout", "cpu", "cuda")
    with pytest.raises(RuntimeError, match="runs CPU tensors only"):
        _backends.set_default("dropout", "cuda", "cpp")
    with pytest.raises(ValueError, match="unknown fastfuse op"):
        _backends.set_default("conv", "cpu", "reference")
    with pytest.raises(ValueError, match="unknown fastfuse backend"):
        _backends.set_default("dropout", "cpu", "fast")
    assert _backends.default("dropout", "cpu") == "cpp" and _backends.default("dropout", "cuda") != "cpp"


def test_committed_results_set_the_cuda_defaults(tmp_path, monkeypatch):
    path = tmp_path / "_cuda_defaults.json"
    path.write_text(json.dumps({"ranking": {"dropout": ["triton", "cuda", "reference"],
                                            "batch_norm": ["reference", "cuda"], "not_an_op": ["cuda"]}}))
    has_triton = _backends.importlib.util.find_spec("triton") is not None
    assert _backends.read_cuda_defaults(str(path)) == {"dropout": "triton" if has_triton else "cuda",
                                                       "batch_norm": "reference"}
    monkeypatch.setattr(_backends.importlib.util, "find_spec", lambda name: None)  # no triton: the runner-up
    assert _backends.read_cuda_defaults(str(path))["dropout"] == "cuda"
    monkeypatch.undo()
    assert _backends.read_cuda_defaults(str(tmp_path / "missing.json")) == {}
    try:
        _backends._set_cuda_defaults(str(path))
        assert _backends.default("batch_norm", "cuda") == "reference"
        assert _backends.default("dropout", "cuda") == ("triton" if has_triton else "cuda")
        assert _backends.default("reflect_conv2d", "cuda") == _backends.UNMEASURED
        assert fastfuse.backends()["default"]["cuda_unmeasured"] == ["embedding_concat_dropout", "reflect_conv2d"]
    finally:
        _backends._set_cuda_defaults()
