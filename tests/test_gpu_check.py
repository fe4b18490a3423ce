"""`.ci/gpu check`, the one command for a lent GPU machine: its non-GPU parts run here (argument parsing, the test and
benchmark selection, the time plan), and the benchmark's parts that make a stopped run useful (each op's rows
written as it finishes) and that turn its rows into the CUDA defaults."""
import json
import os
import subprocess
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".ci", "gpu")


def _check(*args, timeout=300):
    return subprocess.run([GPU, "check", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OUT=os.environ.get("TMPDIR", "/tmp")))


def test_dry_run_prints_the_plan_and_the_selection():
    r = _check("--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    plan = {w[0]: int(w[1][:-1]) for w in map(str.split, out.splitlines())
            if w[:1] in (["build"], ["tests"], ["benchmark"], ["summary"]) and w[1][:-1].isdigit()}
    assert set(plan) == {"build", "tests", "benchmark", "summary"}
    assert sum(plan.values()) == 540 and plan["benchmark"] >= 60
    n_tests = int(out.split("tests selected: ")[1].split()[0])
    assert n_tests >= 5  # the CUDA-marked tests across the suite
    from fastfuse.bench.__main__ import available_ops
    bench_line = next(ln for ln in out.splitlines() if ln.startswith("bench plan:"))
    assert "device cuda, quick" in bench_line and all(op in bench_line for op in available_ops())
    assert "dry run: nothing built or run" in out


def test_bad_arguments_are_refused():
    r = _check("--budget", "100")
    assert r.returncode == 2 and "leaves" in r.stderr
    r = _check("--fast")
    assert r.returncode == 2 and "unknown argument" in r.stderr


def _row(op, provider, ms, shape="8", mode="fwd+bwd"):
    return dict(op=op, shape=shape, dtype="float32", provider=provider, mode=mode, ms_p50=ms)


def test_each_op_is_written_as_it_finishes(tmp_path, monkeypatch):
    """A run stopped in its second op keeps the first op's rows in --out."""
    import fastfuse.bench.__main__ as bm
    mods = {f"fastfuse.benchmarks.bench_{op}": types.SimpleNamespace(cases=lambda device, quick, op=op: op)
            for op in ("dropout", "batch_norm")}

    def fake_run(cases, device, **kw):
        if cases == "batch_norm":
            raise KeyboardInterrupt  # timeout --signal=INT in .ci/gpu check
        return [_row(cases, "cpp", 1.0)]

    monkeypatch.setattr(bm, "available_ops", lambda: ["dropout", "batch_norm"])
    monkeypatch.setattr(bm, "importlib", types.SimpleNamespace(import_module=mods.__getitem__))
    monkeypatch.setattr(bm, "run", fake_run)
    monkeypatch.setattr(bm, "print_table", lambda rows: None)
    out = tmp_path / "cuda_x.json"
    with pytest.raises(KeyboardInterrupt):
        bm.main(["--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == [_row("dropout", "cpp", 1.0)]


def test_choose_defaults():
    from fastfuse.bench import choose_defaults
    rows = {
        # cuda twice as fast on one case, 1.5x slower on the other: geometric mean 0.87 of the reference's time
        "dropout": [_row("dropout", "cuda", 1.0, "a"), _row("dropout", "reference", 2.0, "a"),
                    _row("dropout", "cuda", 3.0, "b"), _row("dropout", "reference", 2.0, "b"),
                    _row("dropout", "cuda", 0.1, "a", mode="fwd"), _row("dropout", "eager", 0.1, "a")],
        "batch_norm": [_row("bn2d", "cuda", 2.0), _row("bn2d", "triton", 3.0), _row("bn2d", "reference", 2.0)],
        "reflect_conv2d": [_row("reflect_conv2d", "cuda", 1.0)],  # no reference timed: unmeasured
        "cnn_step": [_row("cnn_step", "cuda", 1.0), _row("cnn_step", "reference", 2.0)],  # not an op
    }
    assert choose_defaults(rows) == {"dropout": ["cuda", "reference"],
                                     "batch_norm": ["reference", "cuda", "triton"]}  # a tie: the reference
