"""TabularEmbedding and TabularModel: fastai's structure and state_dict keys, outputs and gradients equal to
the eager twin (fastai's forward on plain torch layers) with the same weights."""
import copy

import pytest
import torch

import fastfuse
from fastfuse.models import EagerTabularModel, SigmoidRange, TabularModel, emb_sz_rule

from conftest import CPP


BACKEND = "cpp" if CPP else "reference"

EMB_SZS = [(5, 3), (2, 2), (11, 4)]
# The keys of fastai.tabular.model.TabularModel(EMB_SZS, 2, 1, [8, 6], ps=[0.1, 0.2], y_range=(0, 3)),
# written out from fastai's code: embeds ModuleList, bn_cont BatchNorm1d, then per LinBnDrop(lin_first=True)
# [Linear(bias=False), ReLU, BatchNorm1d, Dropout], a last LinBnDrop [Linear] and SigmoidRange (no state).
BN = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
FASTAI_KEYS = (["embeds.0.weight", "embeds.1.weight", "embeds.2.weight"] + [f"bn_cont.{k}" for k in BN]
               + ["layers.0.0.weight"] + [f"layers.0.2.{k}" for k in BN]
               + ["layers.1.0.weight"] + [f"layers.1.2.{k}" for k in BN]
               + ["layers.2.0.weight", "layers.2.0.bias"])


def _pair(**kw):
    args = dict(emb_szs=EMB_SZS, n_cont=2, out_sz=1, layers=[8, 6], ps=[0.1, 0.2], y_range=(0, 3))
    args.update(kw)
    eager = EagerTabularModel(**args)
    fused = TabularModel(**args)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _batch(B=16):
    x = torch.stack([torch.randint(0, n, (B,)) for n, _ in EMB_SZS], 1)
    return x, torch.randn(B, 2)


def test_state_dict_keys_are_fastais():
    eager, fused = _pair()
    assert list(fused.state_dict().keys()) == FASTAI_KEYS
    assert list(eager.state_dict().keys()) == FASTAI_KEYS
    assert isinstance(fused.layers[3], SigmoidRange) and len(fused.layers) == 4
    assert repr(fused.layers[3]) == "SigmoidRange(low=0, high=3)"  # fastai's (fastcore's basic_repr)
    assert type(fused.layers[0]) is fastfuse.nn.LinBnDrop
    emb = fastfuse.nn.TabularEmbedding(EMB_SZS, 2)
    assert list(emb.state_dict().keys()) == FASTAI_KEYS[:8]  # embeds.*, bn_cont.*


def test_structure_and_init():
    _, fused = _pair(bn_final=True, ps=0.5)
    assert [type(m).__name__ for m in fused.layers[0]] == ["Linear", "ReLU", "BatchNorm1d", "Dropout"]
    assert [type(m).__name__ for m in fused.layers[2]] == ["Linear", "BatchNorm1d"]  # bn_final, no act
    assert fused.layers[0][3].p == 0.5 and fused.layers[1][3].p == 0.5  # a scalar ps repeats
    w = TabularModel([(1000, 50)], 0, 1, [4]).embeds[0].weight
    assert w.abs().max() <= 0.02 and 0.007 < w.std() < 0.011  # fastai's trunc-normal, std 0.01, cut at 2 std
    assert TabularModel(EMB_SZS, 2, 1, [4], emb_drop=0.3).emb_drop.p == 0.3  # the lesson's older name
    with pytest.raises(TypeError):
        TabularModel(EMB_SZS, 2, 1, [4], embed_p=0.1, emb_drop=0.3)


def test_emb_sz_rule():
    assert [emb_sz_rule(n) for n in (2, 3, 10, 1116, 10**6)] == [2, 3, 6, 81, 600]


@pytest.mark.parametrize("B", [1, 16])
def test_checkpoint_loads_and_eval_outputs_match(B):
    eager, fused = _pair()
    eager.train()
    x, c = _batch(32)
    with torch.no_grad():
        eager(x, c)  # move the running statistics away from their init
    fused.load_state_dict(eager.state_dict())
    eager.eval(), fused.eval()
    x, c = _batch(B)
    with fastfuse.use_backend(BACKEND):
        got = fused(x, c)
    torch.testing.assert_close(got, eager(x, c))


def test_training_step_matches_eager_without_dropout():
    eager, fused = _pair(ps=None, embed_p=0.0)
    x, c = _batch(24)
    y = torch.rand(24, 1) * 3
    with fastfuse.use_backend(BACKEND):
        loss_f = torch.nn.functional.mse_loss(fused(x, c), y)
        loss_f.backward()
    loss_e = torch.nn.functional.mse_loss(eager(x, c), y)
    loss_e.backward()
    torch.testing.assert_close(loss_f, loss_e)
    pe = dict(eager.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, pe[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, b in eager.named_buffers():
        torch.testing.assert_close(dict(fused.named_buffers())[name], b, msg=name)


def test_embedding_dropout_is_the_reference_mask():
    emb = fastfuse.nn.TabularEmbedding(EMB_SZS, 2, embed_p=0.5)
    x, c = _batch(40)
    torch.manual_seed(11)
    out = emb(x, c)
    torch.manual_seed(11)
    key, off = fastfuse._rng.new_seed().tolist()
    keep = fastfuse.reference.embedding_concat_keep_mask(40, 9, 0.5, key, off)
    rows = torch.cat([e.weight[x[:, t]] for t, e in enumerate(emb.embeds)], 1)
    torch.testing.assert_close(out[:, :9], torch.where(keep, rows * 2, torch.zeros(())))
    emb.eval()
    torch.testing.assert_close(emb(x, c)[:, :9], rows)


def test_only_categorical_or_only_continuous():
    e1, f1 = _pair(n_cont=0, bn_cont=False)
    x, _ = _batch(8)
    e1.eval(), f1.eval()
    with fastfuse.use_backend(BACKEND):
        torch.testing.assert_close(f1(x), e1(x))
    e2, f2 = _pair(emb_szs=[])
    e2.eval(), f2.eval()
    c = torch.randn(8, 2)
    with fastfuse.use_backend(BACKEND):
        no_cat = torch.zeros(8, 0, dtype=torch.long)
        torch.testing.assert_close(f2(no_cat, c), e2(no_cat, c))


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_compile_tabular_model_fullgraph():
    """The whole TabularModel (fused input layer with bn_cont, LinBnDrop blocks with dropout, SigmoidRange) under
    torch.compile(fullgraph=True): no graph break, forward and backward, and for the same seed the same masks,
    outputs, gradients and running statistics as eager (seeds come from torch's generator either way)."""
    _, fused = _pair(embed_p=0.2)
    ref = copy.deepcopy(fused)
    x, c = _batch(12)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    results = []
    for m in (compiled, ref):
        torch.manual_seed(4)
        y = m(x, c)
        results.append((y, torch.autograd.grad(y.sum(), list(m.parameters()))))
    (y, g), (yr, gr) = results
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CPP, reason="fastfuse._C not built")
def test_tabular_model_takes_fastais_sigmoid_range(monkeypatch):
    """A fastai TabularModel made ours by fastfuse.fuse keeps fastai's SigmoidRange (fastai.layers, stood in for
    here: CI has no fastai)."""
    import sys
    import types
    fake = types.ModuleType("fastai.layers")

    class FastaiSigmoidRange(torch.nn.Module):
        def __init__(self, low, high):
            super().__init__()
            self.low, self.high = low, high

        def forward(self, x):
            return torch.sigmoid(x) * (self.high - self.low) + self.low

    fake.SigmoidRange = FastaiSigmoidRange
    monkeypatch.setitem(sys.modules, "fastai.layers", fake)
    eager, fused = _pair(y_range=(-1, 2))
    fused.layers[3] = FastaiSigmoidRange(-1, 2)
    x, c = _batch(8)
    fused.eval(), eager.eval()
    torch.testing.assert_close(fused(x, c), eager(x, c))
