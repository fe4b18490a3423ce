"""Models with fastai's signatures and state_dict keys, built from fastfuse's fused layers."""
from .tabular import EagerTabularModel, SigmoidRange, TabularModel, emb_sz_rule
from .vision import create_body, create_head, reflect_padding, vision_model
from .xresnet import XResNet, min_input_size, xresnet18, xresnet34, xresnet50, xresnet101

__all__ = ["EagerTabularModel", "SigmoidRange", "TabularModel", "XResNet", "create_body", "create_head", "emb_sz_rule",
           "min_input_size", "reflect_padding", "vision_model", "xresnet18", "xresnet34", "xresnet50", "xresnet101"]
