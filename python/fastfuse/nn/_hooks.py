"""Hooks on the children of a fused block. fastai's Learner.summary, ActivationStats and hook_outputs register
forward hooks on layers; a fused call skips its children's own calls, so their hooks would not run (or, on the
batch norm that a fused call goes through, would see the block's output instead of the norm's). A block whose
children, or the global registry, have hooks therefore calls its children one by one: the hooks see exactly what
they see in torch."""
from torch.nn.modules import module as _mm


def hooked(mods) -> bool:
    """True when any module in `mods` (or the global registry) has a forward, forward-pre or backward hook."""
    if (_mm._global_forward_hooks or _mm._global_forward_pre_hooks or _mm._global_backward_hooks
            or _mm._global_backward_pre_hooks):
        return True
    return any(m is not None and has_own_hooks(m) for m in mods)


def has_own_hooks(m) -> bool:
    """True when module m itself (not the global registry) has a forward, forward-pre or backward hook."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
