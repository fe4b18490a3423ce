"""The benchmark machinery. The memory column: saved_mb counts what autograd keeps for backward, each storage
once, leaves that require grad (parameters, the benchmark input) left out. And dynamo's recompile limit, which
would turn "compile" rows into eager ones."""
import torch

from fastfuse.bench import saved_mb


def test_saved_mb():
    a = torch.randn(256, 1024, requires_grad=True)  # 1 MB
    assert saved_mb(lambda: a.sin()) == 0.0  # sin saves its input: a leaf
    assert saved_mb(lambda: (a * 2).relu()) == 1.0  # relu saves its output; mul by a number saves nothing
    assert saved_mb(lambda: (a * 2).relu().relu()) == 2.0  # two outputs, two storages
    b = (a * 2).detach().requires_grad_(False)
    assert saved_mb(lambda: (a * b) * b) == 1.0  # both muls save b (for the grad of their other factor): once


def test_bench_compiles_past_dynamo_recompile_limit():
    # every compiled module shares one code object: without fastfuse.bench lifting dynamo's limit, modules past
    # the 8th run eagerly without a word and the "compile" rows time eager (backend="eager": dynamo only, cheap)
    import fastfuse.bench  # noqa: F401  (lifts the limit on import)
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    mods = [torch.compile(torch.nn.Linear(i + 1, 2), backend="eager") for i in range(10)]
    for i, m in enumerate(mods):
        m(torch.randn(3, i + 1))
    assert counters["stats"]["unique_graphs"] == 10
    torch._dynamo.reset()
