"""Runs csrc/cuda/*.cu on the CPU, for a machine without a GPU: each .cu file is rewritten (launches
`k<<<grid, block, smem, stream>>>(args)` -> `emu::launch(grid, block, smem, stream, k, args)`, is_cuda() ->
is_cpu(), the public ops' CUDA kernels registered as the CPU kernels of namespace fastfuse_emu instead), compiled
with stand-ins for the CUDA headers (inc/, cuda_emu_runtime.h) into the module ffemu, and
tests/test_cuda_kernels.py is run with its tensors on the CPU and the "cuda" backend routed to fastfuse_emu
(emu_patch.py), against the real C++ CPU kernels.

    python tests/cuda_emu/run.py [pytest args]     (from the repository root, fastfuse._C built in place)

It checks host code, index arithmetic, launch configurations and tails, not the GPU: no memory model, warps,
cuDNN/cuBLAS numerics, device-vs-host pointer mix-ups or speed. The test over 2^31 elements is left out."""
import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\(", re.S)


def transform(src):
    src = src.replace(".is_cuda()", ".is_cpu()")
    src = re.sub(r"TORCH_LIBRARY_IMPL\(fastfuse_C, CUDA, m\) \{.*?\n\}\n", "", src, flags=re.S)
    src = src.replace("TORCH_LIBRARY_IMPL(fastfuse, CUDA, m)", "TORCH_LIBRARY_IMPL(fastfuse_emu, CPU, m)")
    src, n = LAUNCH.subn(lambda m: f"emu::launch({m.group(2)}, {m.group(1)}, ", src)
    assert n and "<<<" not in src, "a launch the rewrite did not catch"
    return '#include "cuda_emu_runtime.h"\n' + src


def build():
    os.makedirs(os.path.join(BUILD, "gen"), exist_ok=True)
    sources = [os.path.join(HERE, "harness.cpp"), os.path.join(ROOT, "csrc", "backend.cpp")]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        out = os.path.join(BUILD, "gen", os.path.basename(cu)[:-3] + "_emu.cpp")
        text = transform(open(cu).read())
        if not os.path.exists(out) or open(out).read() != text:  # unchanged files keep their objects
            open(out, "w").write(text)
        sources.append(out)
    from torch.utils.cpp_extension import load
    os.environ.setdefault("MAX_JOBS", "2")
    load("ffemu", sources, extra_include_paths=[os.path.join(HERE, "inc"), HERE, os.path.join(ROOT, "csrc")],
         extra_cflags=["-DFASTFUSE_WITH_CUDA", "-std=c++20", "-O1", "-Wno-unknown-pragmas"],
         build_directory=BUILD, verbose=False)


def test_module():
    s = open(os.path.join(ROOT, "tests", "test_cuda_kernels.py")).read()
    subs = [("pytestmark = [pytest.mark.cuda, ", "import emu_patch  # noqa\npytestmark = ["),
            ('device="cuda"', 'device="cpu"'), (".cuda()", ".cpu()"), ('("cuda", "cuda")', '("cpu", "cuda")'),
            ('("cuda", None)', '("cpu", None)'), ("torch.cuda.synchronize()", "pass"),
            ("if not CUDA:\n        yield\n        return", "if True:\n        yield\n        return")]
    for a, b in subs:
        assert a in s, f"tests/test_cuda_kernels.py changed: {a!r} not found"
        s = s.replace(a, b)
    path = os.path.join(BUILD, "emu_cuda_tests.py")  # not test_*.py: `pytest tests` must not collect it
    open(path, "w").write(s)
    return path


if __name__ == "__main__":
    build()
    test = test_module()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BUILD, HERE, os.path.join(ROOT, "tests"),
                                                       os.path.join(ROOT, "python")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", BUILD, test,
           "-k", "not 2_pow_31"] + sys.argv[1:]
    sys.exit(subprocess.call(cmd, env=env, cwd=BUILD))
