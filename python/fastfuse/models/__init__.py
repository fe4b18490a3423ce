"""Models with fastai's signatures and state_dict keys, built from fastfuse's fused layers."""
from .tabular import EagerTabularModel, SigmoidRange, TabularModel, emb_sz_rule

__all__ = ["EagerTabularModel", "SigmoidRange", "TabularModel", "emb_sz_rule"]
