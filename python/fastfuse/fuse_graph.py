"""fuse()'s second pass: the forward of a model's own blocks (a torchvision BasicBlock, a user's module). Swapping
layers cannot fuse what a forward writes between them, such as `relu(bn2(conv2(out)) + identity)`; torch.compile
does, and won. Here each block that has a batch norm child is traced with torch.fx, one level deep, and every
batch norm whose only use is a ReLU, or a residual add and then a ReLU, becomes one call of the fused batch norm
(its post_act and residual); when the batch norm's input is a convolution used by nothing else, the call also takes
the convolution, so that inference (eval, no autograd) runs the pair folded: one convolution, no batch norm pass
(nn/_fold.py). The block becomes a GraphModule over the very same children (same names, order, state_dict keys,
parameters); a plain nn.Sequential becomes a FusedSequential in place. A block is left as it is when its forward cannot
be traced, traces differently in train and eval mode (it branches on self.training) or takes
optional arguments. The forward is traced when fuse() runs: plain attributes it reads (a flag, a scale) are fixed
then."""
import inspect
import operator
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn.functional as F

from .nn._fold import can_fold, conv_bn
from .nn._hooks import has_own_hooks, hooked
from .nn.batch_norm import is_fused_bn
from .nn.reflect_conv2d import ReflectConv2d
from .nn.fused_sequential import FusedSequential, fused_forward, fuses_any

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_FOLDABLE_CONVS = (torch.nn.Conv2d, ReflectConv2d)


# ---- what the rewritten graphs call ------------------------------------------------------------------------------
# The checks run on every call: hooks may be registered after fuse(), and a residual that broadcasts (or has
# another dtype) is not one the fused kernel takes. Either way the plain composition runs, with the same result.
# `conv`: the graph's convolution module whose only use is the batch norm, with `x` its input (None: x is the batch
# norm's input). In inference (eval, no autograd) that pair runs folded (nn/_fold.py): one convolution, no batch norm.
def bn_relu(bn, relu, x, conv=None):
    """relu(bn(conv(x))), in one fused batch norm call (or folded into conv). relu: the nn.ReLU module of the graph,
    or None (F.relu)."""
    if conv is not None:
        if can_fold(conv, bn) and not hooked((conv, bn, relu)):
            return conv_bn(conv, bn, x, relu=True)
        x = conv(x)
    if hooked((bn, relu)):
        return _relu(relu, bn(x))
    return bn(x, post_act="relu")


def bn_add_relu(bn, relu, x, other, conv=None):
    """relu(bn(conv(x)) + other), in one fused batch norm call (or folded into conv) when `other` is a tensor of the
    output's shape, dtype and device."""
    if conv is not None:
        if can_fold(conv, bn) and not hooked((conv, bn, relu)):
            return conv_bn(conv, bn, x, residual=other, relu=True)
        x = conv(x)
    if (hooked((bn, relu)) or type(other) is not torch.Tensor or other.shape != x.shape or other.dtype != x.dtype
            or other.device != x.device):
        return _relu(relu, bn(x) + other)
    return bn(x, residual=other, post_act="relu")


def _relu(relu, t):
    return F.relu(t) if relu is None else relu(t)


class SwappedSequential(FusedSequential):
    """A plain nn.Sequential after fuse(): FusedSequential's forward, nn.Sequential's repr. In inference (eval, no
    autograd) each [Conv2d, BatchNorm, ReLU?] run runs folded (nn/_fold.py): one convolution (a torchvision
    downsample, [Conv2d, BatchNorm2d], too: fastfuse's eval batch norm is slower than torch's on NCHW maps of a few
    pixels)."""

    def _get_name(self):
        return "Sequential"

    def forward(self, input):
        mods = list(self)
        if torch.is_grad_enabled() or hooked(mods):
            return fused_forward(mods, input)
        x, i, start, n = input, 0, 0, len(mods)
        while i < n - 1:
            if not can_fold(mods[i], mods[i + 1]):
                i += 1
                continue
            if start < i:
                x = fused_forward(mods[start:i], x)
            relu = i + 2 < n and type(mods[i + 2]) is torch.nn.ReLU
            x = conv_bn(mods[i], mods[i + 1], x, relu=relu)
            i = start = i + 2 + relu
        return fused_forward(mods[start:], x) if start < n else x


# ---- finding the patterns ----------------------------------------------------------------------------------------
class _OneLevel(fx.Tracer):
    """Traces a module's own forward only: every submodule call stays one call_module node. The GraphModules keep
    this tracer: unpickling re-traces their code with it, and the helpers above must stay calls (not be inlined)."""

    def __init__(self):
        super().__init__(autowrap_functions=(bn_relu, bn_add_relu))

    def is_leaf_module(self, m, qualname):
        return True


def _plain_signature(module) -> bool:
    """forward takes only required positional tensors: tracing turns `if mask is not None:` on an optional argument
    into a fixed branch, which a call that leaves it out would then break."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def _trace(module):
    """module's forward graph, or None where it cannot be traced or depends on module.training."""
    if not _plain_signature(module):
        return None
    training = module.training
    graphs = []
    try:
        for mode in (True, False):
            module.training = mode
            graphs.append(_OneLevel().trace(module))
    except Exception:  # data-dependent control flow, unsupported calls...: this block is left alone
        return None
    finally:
        module.training = training
    same = graphs[0].python_code("self").src == graphs[1].python_code("self").src
    return graphs[0] if same else None


def _module(node, root):
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(node, root):
    if node.op == "call_module":
        return type(_module(node, root)) is torch.nn.ReLU and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return len(node.args) == 1 or (node.target is F.relu and len(node.args) == 2)  # F.relu(x, inplace)
    return node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs


def _residual(node, bn):
    """The other operand when `node` is bn's output plus a tensor node (no alpha), else None."""
    adds = (node.op == "call_function" and node.target in _ADD_FUNCS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not adds or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    other = b if a is bn else a
    return other if isinstance(other, fx.Node) and other is not bn else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _conv_input(node, root):
    """node when it is a call of a foldable convolution module (torch's Conv2d or fastfuse's ReflectConv2d) on one
    tensor, used only by the batch norm: the rewritten call then takes the conv and its input (see bn_relu)."""
    m = _module(node, root)
    if (type(m) not in _FOLDABLE_CONVS or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node)
            or len(node.users) != 1):
        return None
    return node


def _fuse_patterns(graph, root) -> bool:
    """Rewrite bn -> relu and bn -> add -> relu in place; True when anything changed."""
    changed = False
    for bn in list(graph.nodes):
        m = _module(bn, root)
        if not is_fused_bn(m) or len(bn.args) != 1 or bn.kwargs or not isinstance(bn.args[0], fx.Node):
            continue
        user = _only_user(bn)
        if user is None:
            continue
        add, other, relu = None, None, user
        if not _is_relu(user, root):
            other = _residual(user, bn)
            relu = _only_user(user) if other is not None else None
            if relu is None or not _is_relu(relu, root):
                continue
            add = user
        conv = _conv_input(bn.args[0], root)
        with graph.inserting_before(relu):
            relu_mod = graph.get_attr(relu.target) if relu.op == "call_module" else None
            x = bn.args[0] if conv is None else conv.args[0]
            args = (graph.get_attr(bn.target), relu_mod, x) + (() if add is None else (other,))
            if conv is not None:
                args += (graph.get_attr(conv.target),)
            new = graph.call_function(bn_relu if add is None else bn_add_relu, args)
        relu.replace_all_uses_with(new)
        for dead in (relu, add, bn, conv):
            if dead is not None:
                graph.erase_node(dead)
        changed = True
    return changed


def fused_block(module):
    """module with its forward's patterns fused, as a GraphModule over the same children, parameters and buffers
    (an nn.Sequential becomes a FusedSequential in place); None where there is nothing to fuse or it cannot be done safely."""
    if type(module) is torch.nn.Sequential:
        mods = list(module)
        folds = any(type(a) in _FOLDABLE_CONVS and is_fused_bn(b) for a, b in zip(mods, mods[1:]))
        if not fuses_any(mods) and not folds:
            return None
        module.__class__ = SwappedSequential  # in place: a subclass that only changes forward
        return module
    cls = type(module)
    if (cls.__module__.split(".")[0] in ("torch", "fastfuse") or has_own_hooks(module)
            or not any(is_fused_bn(c) for c in module.children())):
        return None  # torch's and fastfuse's own modules fuse at the layer level; a hooked block keeps its forward
    graph = _trace(module)
    if graph is None or not _fuse_patterns(graph, module):
        return None
    graph.lint()
    new = fx.GraphModule(module, graph, class_name=cls.__name__)
    # every child, parameter and buffer of the original (also those the graph no longer calls, like a ReLU module),
    # in its order: the same state_dict keys and repr
    new._modules = OrderedDict(module._modules)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.train(module.training)
    return new
