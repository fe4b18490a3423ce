"""Per-call forward + backward of fastfuse::dropout at (64, 100) through the op itself, for the autograd designs
of docs/architecture.md (run with the argument py_autograd to add the Python register_autograd design)."""
import sys
import torch
import torch.utils.benchmark as tb
import fastfuse

x = torch.randn(64, 100, requires_grad=True)
g = torch.randn(64, 100)
seed = torch.tensor([5, 7])

def fb(fn):
    def run():
        torch.autograd.grad(fn(x), x, g)
    return run

cases = {"op": fb(lambda t: torch.ops.fastfuse.dropout(t, 0.5, seed)),
         "torch F.dropout": fb(lambda t: torch.nn.functional.dropout(t, 0.5)),
         "torch x * a": fb(lambda t: t * 0.5)}
if len(sys.argv) > 1 and sys.argv[1] == "py_autograd":
    # option (b): Python register_autograd around the same C++ kernel (a Python-defined op whose CPU kernel
    # calls fastfuse::dropout below autograd)
    lib = torch.library.Library("opt", "DEF")
    lib.define("dropout(Tensor x, float p, Tensor seed) -> Tensor")
    def kern(x, p, seed):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastfuse.dropout(x, p, seed)
    lib.impl("dropout", kern, "CPU")
    torch.library.register_fake("opt::dropout", lambda x, p, s: torch.empty_like(x))
    def setup(ctx, inputs, output):
        ctx.p = inputs[1]; ctx.save_for_backward(inputs[2])
    def bwd(ctx, grad):
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.fastfuse.dropout_backward(grad, ctx.p, ctx.saved_tensors[0]), None, None
    torch.library.register_autograd("opt::dropout", bwd, setup_context=setup)
    cases["python register_autograd + C++ kernel"] = fb(lambda t: torch.ops.opt.dropout(t, 0.5, seed))
for f in cases.values():
    for _ in range(100): f()
res = {k: [] for k in cases}
for _ in range(5):
    for k, f in cases.items():
        res[k].append(tb.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.3).median * 1e6)
for k, v in res.items():
    print(f"{k}: {min(v):.1f} us")
