"""TabularEmbedding: fast.ai TabularModel's input layer (embeds, emb_drop, bn_cont; same state_dict keys)
running as one fastfuse.embedding_concat_dropout call."""
import torch

from ..ops.embedding_concat_dropout import tensor_tables_forward
from ._hooks import hooked


def trunc_normal_(x: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """fastai's truncated normal: N(0, 1) folded into (-2, 2) by fmod, then scaled (in place)."""
    with torch.no_grad():
        return x.normal_().fmod_(2).mul_(std).add_(mean)


class Embedding(torch.nn.Embedding):
    """fastai's Embedding: nn.Embedding with trunc-normal init, std 0.01."""

    def __init__(self, ni: int, nf: int, std: float = 0.01):
        super().__init__(ni, nf)
        trunc_normal_(self.weight.data, std=std)


_EMBEDDINGS = (torch.nn.Embedding, Embedding)


class TabularEmbedding(torch.nn.Module):
    """One embedding per categorical column, concatenated, embedding dropout, then the continuous columns
    (batch-normed when bn_cont): the first half of fastai's TabularModel.forward, fused.

    Children are named as in fastai's TabularModel (embeds, emb_drop, bn_cont), so their state_dict keys match."""

    def __init__(self, emb_szs, n_cont: int, embed_p: float = 0.0, bn_cont: bool = True):
        super().__init__()
        self.embeds = torch.nn.ModuleList([Embedding(ni, nf) for ni, nf in emb_szs])
        self.emb_drop = torch.nn.Dropout(embed_p)
        self.bn_cont = torch.nn.BatchNorm1d(n_cont) if bn_cont else None
        self.n_emb = sum(e.embedding_dim for e in self.embeds)
        self.n_cont = n_cont

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor = None) -> torch.Tensor:
        if self.n_cont != 0 and x_cont is None:
            raise ValueError(f"{type(self).__name__} has {self.n_cont} continuous columns: pass x_cont")
        if self.n_emb == 0:  # continuous columns only (x_cat may be (B, 0) or None)
            return self.bn_cont(x_cont) if self.bn_cont is not None else x_cont
        if hooked([*self.embeds._modules.values(), self.emb_drop, self.bn_cont]):
            return self._children_forward(x_cat, x_cont)  # so that their hooks run (see _hooks)
        return tensor_tables_forward(x_cat, self._tables(), self.emb_drop.p, self.training,
                                     x_cont if self.n_cont != 0 else None, self.bn_cont, True)

    def _children_forward(self, x_cat, x_cont):
        """fastai's TabularModel.forward up to the head, through the children's own calls (torch's dropout mask)."""
        x = self.emb_drop(torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1))
        if self.n_cont != 0:
            x_cont = self.bn_cont(x_cont) if self.bn_cont is not None else x_cont
            x = torch.cat([x, x_cont.to(x.dtype)], 1)
        return x

    def _tables(self):
        # an Embedding's weight straight from its _parameters: a Module.__getattr__ per table costs as much as the
        # fused kernel's gather at small batches
        return [e._parameters["weight"] if type(e) in _EMBEDDINGS and e._parameters.get("weight") is not None
                else e.weight for e in self.embeds._modules.values()]
