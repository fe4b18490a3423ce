"""Second derivatives. The fused backward kernels are not differentiable themselves, so a backward that runs
with create_graph=True (grad mode is on inside it: gradient penalties, Hessian-vector products,
torch.autograd.gradgradcheck) takes its gradients from autograd through the reference composition instead:
the same math and the same dropout masks, in differentiable torch ops, at reference speed. Every other backward
runs the fused kernels. (Without this, torch warned "autograd kernel was not registered" and returned wrong
second derivatives: zeros or None.)"""
import torch


def wanted() -> bool:
    """True inside a backward that builds a graph (torch.autograd.grad(..., create_graph=True))."""
    return torch.is_grad_enabled()


def grads(forward, inputs, grad_output, need):
    """Gradients of forward(*inputs) against grad_output, as differentiable tensors: one per input, None where
    need is False (or where the input does not reach the output). Inputs that need a gradient but do not
    require one themselves (stand-ins for values the gradient does not depend on) are made leaves here."""
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() if n and not t.requires_grad else t for t, n in zip(inputs, need)]
        wrt = [t for t, n in zip(inputs, need) if n]
        out = forward(*inputs)
        found = iter(torch.autograd.grad(out, wrt, grad_output.to(out.dtype), create_graph=True, allow_unused=True))
    return [next(found) if n else None for n in need]
