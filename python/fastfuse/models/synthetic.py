"""Rossmann-shaped synthetic tabular data for benchmarks: the 24 categorical cardinalities of the Rossmann
store-sales competition (as in fast.ai's lesson), 16 continuous columns and a log-sales-like target."""
import torch

ROSSMANN_CARDINALITIES = (1116, 8, 4, 13, 32, 3, 26, 27, 5, 4, 4, 24, 9, 13, 53, 22, 7, 7, 4, 4, 9, 9, 3, 3)
ROSSMANN_N_CONT = 16
ROSSMANN_LAYERS = [1000, 500]
ROSSMANN_PS = [0.001, 0.01]
ROSSMANN_EMBED_P = 0.04


def rossmann_emb_szs():
    """(cardinality, width) per column by fastai's emb_sz_rule."""
    from .tabular import emb_sz_rule
    return [(n, emb_sz_rule(n)) for n in ROSSMANN_CARDINALITIES]


def rossmann_batch(batch: int, device="cpu", generator: torch.Generator = None):
    """(x_cat int64 (B, 24), x_cont float32 (B, 16), y float32 (B, 1)). Store ids are skewed (a few hot
    stores) like real sales data; y depends on a few columns so a model can learn something."""
    g = generator
    store = (torch.rand(batch, generator=g) ** 2 * ROSSMANN_CARDINALITIES[0]).long()
    rest = [torch.randint(0, n, (batch,), generator=g) for n in ROSSMANN_CARDINALITIES[1:]]
    x_cat = torch.stack([store] + rest, 1)
    x_cont = torch.randn(batch, ROSSMANN_N_CONT, generator=g)
    y = 8 + 0.3 * torch.sin(store.float()) + 0.1 * x_cont[:, :4].sum(1) + 0.05 * (x_cat[:, 1].float() - 4)
    return x_cat.to(device), x_cont.to(device), y[:, None].to(device)


def rossmann_model(cls=None, y_range=(0.0, 12.0)):
    """A TabularModel (or `cls`, e.g. EagerTabularModel) with the lesson's Rossmann hyper-parameters."""
    from .tabular import TabularModel
    cls = cls or TabularModel
    return cls(rossmann_emb_szs(), ROSSMANN_N_CONT, 1, ROSSMANN_LAYERS, ps=ROSSMANN_PS,
               embed_p=ROSSMANN_EMBED_P, y_range=y_range)
