"""fastai's TabularModel: the fused one (TabularModel) and its eager twin (EagerTabularModel, plain torch
layers in fastai's exact structure). Both have fastai.tabular.model.TabularModel's signature, semantics and
state_dict keys, so checkpoints move between the three and give the same eval outputs."""
import torch
from torch import nn

from .. import nn as ffnn
from ..nn.tabular import Embedding


def emb_sz_rule(n_cat: int) -> int:
    """fastai's rule of thumb for the embedding width of a column with n_cat categories."""
    return min(600, round(1.6 * n_cat ** 0.56))


class SigmoidRange(nn.Module):
    """sigmoid(x) scaled to (low, high), as fastai's SigmoidRange (no parameters)."""

    def __init__(self, low, high):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x):
        return torch.sigmoid(x) * (self.high - self.low) + self.low

    def extra_repr(self):  # fastai's repr: SigmoidRange(low=0, high=5.5)
        return f"low={self.low!r}, high={self.high!r}"


class _EagerLinBnDrop(nn.Sequential):
    """fastai's LinBnDrop with plain torch layers (BatchNorm init as fastai's BatchNorm: weight 1, bias 1e-3)."""

    def __init__(self, n_in, n_out, bn=True, p=0.0, act=None, lin_first=False):
        layers = [nn.BatchNorm1d(n_out if lin_first else n_in)] if bn else []
        if bn:
            layers[0].bias.data.fill_(1e-3)
        if p != 0:
            layers.append(nn.Dropout(p))
        lin = [nn.Linear(n_in, n_out, bias=not bn)]
        if act is not None:
            lin.append(act)
        super().__init__(*(lin + layers if lin_first else layers + lin))


def _head(n_in, out_sz, layers, ps, y_range, use_bn, bn_final, act_cls, lin_first, block):
    """fastai's layer stack: LinBnDrop per hidden size, a final LinBnDrop without act, then SigmoidRange."""
    if ps is None:
        ps = [0] * len(layers)
    elif not isinstance(ps, (list, tuple)):
        ps = [ps] * len(layers)
    ps = list(ps)
    sizes = [n_in] + list(layers) + [out_sz]
    actns = [act_cls for _ in range(len(sizes) - 2)] + [None]
    mods = [block(sizes[i], sizes[i + 1], bn=use_bn and (i != len(actns) - 1 or bn_final), p=p, act=a,
                  lin_first=lin_first) for i, (p, a) in enumerate(zip(ps + [0.0], actns))]
    if y_range is not None:
        mods.append(SigmoidRange(*y_range))
    return nn.Sequential(*mods)


def _embed_p(embed_p, emb_drop):
    """The lesson's older keyword emb_drop= is accepted for embed_p."""
    if emb_drop is not None:
        if embed_p:
            raise TypeError("TabularModel: pass embed_p or its older name emb_drop, not both")
        return emb_drop
    return embed_p


class TabularModel(ffnn.TabularEmbedding):
    """fastai.tabular.model.TabularModel with a fused input layer (fastfuse.nn.TabularEmbedding, whose
    children embeds / emb_drop / bn_cont it is) and fastfuse.nn.LinBnDrop blocks."""

    def __init__(self, emb_szs, n_cont, out_sz, layers, ps=None, embed_p=0.0, y_range=None, use_bn=True,
                 bn_final=False, bn_cont=True, act_cls=nn.ReLU(inplace=True), lin_first=True, *, emb_drop=None):
        super().__init__(emb_szs, n_cont, _embed_p(embed_p, emb_drop), bn_cont)
        self.layers = _head(self.n_emb + n_cont, out_sz, layers, ps, y_range, use_bn, bn_final, act_cls,
                            lin_first, ffnn.LinBnDrop)

    def forward(self, x_cat, x_cont=None):
        return self.layers(super().forward(x_cat, x_cont))


class EagerTabularModel(nn.Module):
    """The eager twin: fastai's TabularModel line for line, on plain torch layers (the baseline)."""

    def __init__(self, emb_szs, n_cont, out_sz, layers, ps=None, embed_p=0.0, y_range=None, use_bn=True,
                 bn_final=False, bn_cont=True, act_cls=nn.ReLU(inplace=True), lin_first=True, *, emb_drop=None):
        super().__init__()
        self.embeds = nn.ModuleList([Embedding(ni, nf) for ni, nf in emb_szs])
        self.emb_drop = nn.Dropout(_embed_p(embed_p, emb_drop))
        self.bn_cont = nn.BatchNorm1d(n_cont) if bn_cont else None
        self.n_emb, self.n_cont = sum(e.embedding_dim for e in self.embeds), n_cont
        self.layers = _head(self.n_emb + n_cont, out_sz, layers, ps, y_range, use_bn, bn_final, act_cls,
                            lin_first, _EagerLinBnDrop)

    def forward(self, x_cat, x_cont=None):
        if self.n_emb != 0:
            x = torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1)
            x = self.emb_drop(x)
        if self.n_cont != 0:
            if self.bn_cont is not None:
                x_cont = self.bn_cont(x_cont)
            x = torch.cat([x, x_cont], 1) if self.n_emb != 0 else x_cont
        return self.layers(x)
