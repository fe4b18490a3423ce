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


def test_commit_is_dirty_for_changed_code_anywhere_but_not_for_results(tmp_path, monkeypatch):
    import subprocess

    import fastfuse.bench as fb

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    files = ["python/fastfuse/bench/__init__.py", "tests/test_x.py", "benchmarks/results/cpu.json"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    monkeypatch.setattr(fb, "__file__", str(tmp_path / files[0]))
    head = fb._commit()
    assert head and not head.endswith("+dirty")
    (tmp_path / files[2]).write_text("1\n")  # a run's --out file
    assert fb._commit() == head
    (tmp_path / files[1]).write_text("1\n")  # code outside the package's own folder
    assert fb._commit() == head + "+dirty"
