"""Runs csrc/cuda/*.cu on the CPU, for a machine without a GPU: each .cu file is rewritten (launches
`k<<<grid, block, smem, stream>>>(args)` -> `emu::launch(grid, block, smem, stream, k, args)`, is_cuda() ->
is_cpu(), the public ops' CUDA kernels registered as the CPU kernels of namespace fastfuse_emu instead), compiled
with stand-ins for the CUDA headers (inc/, cuda_emu_runtime.h) into the module ffemu, and
tests/test_cuda_kernels.py is run with its tensors on the CPU and the "cuda" backend routed to fastfuse_emu
(emu_patch.py), against the real C++ CPU kernels.

    python tests/cuda_emu/run.py [pytest args]     (from the repository root, fastfuse._C built in place)

It checks host code, index arithmetic, launch configurations and tails, not the GPU: no memory model, warps,
cuDNN/cuBLAS numerics, device-vs-host pointer mix-ups or speed. The test over 2^31 elements and the CUDA-graph
tests are left out.

No host synchronisation inside an op. The emulated device is the CPU, so a copy between host and device, or a
read of device data by the host, would go unnoticed; two checks make such code fail here as it would fail (or
stall) on a GPU under torch.cuda.set_sync_debug_mode("error") or CUDA-graph capture:
- in the rewrite, the first argument of every `.to(...)` in the .cu files goes through emu::to_arg
  (cuda_emu_runtime.h), and `.cpu()` / `.cuda()` become `.to(emu::to_arg(<device type>))`: a dtype passes, a
  device (or TensorOptions with one) raises "a copy between host and device";
- emu_patch.py runs each emulated op under a dispatcher mode that raises on the ATen calls the op's own code
  (csrc/cuda/*.cu and the headers it uses) makes that read device data on the host: item /
  _local_scalar_dense (also `if (tensor)`), is_nonzero, equal, nonzero, masked_select, unique, and a copy
  between devices. Calls inside ATen's own kernels are not inspected (on a GPU they are cuDNN's, cuBLAS's...).
Not caught: `dst.copy_(host_tensor)` and raw data_ptr reads of a device tensor on the host (the emulated device
memory is host memory). A device-side assert (CUDA_KERNEL_ASSERT) raises a RuntimeError with the message the
failing thread printed."""
import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD = os.path.join(HERE, "build")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\(", re.S)


def _wrap_to_args(src):
    """`.to(a, ...)` -> `.to(emu::to_arg(a), ...)`: the first argument, up to a top-level comma or the call's
    closing parenthesis."""
    out, i = [], 0
    while (j := src.find(".to(", i)) >= 0:
        k, depth = j + 4, 0
        while depth or src[k] not in ",)":
            depth += (src[k] in "([{") - (src[k] in ")]}")
            k += 1
        out.append(src[i:j + 4] + "emu::to_arg(" + src[j + 4:k] + ")")
        i = k
    return "".join(out) + src[i:]


def transform(src):
    src = src.replace(".is_cuda()", ".is_cpu()")
    src = src.replace(".cpu()", ".to(c10::DeviceType::CPU)").replace(".cuda()", ".to(c10::DeviceType::CUDA)")
    src = _wrap_to_args(src)
    src = re.sub(r"\bCUDA_KERNEL_ASSERT\(", "EMU_KERNEL_ASSERT(", src)
    src = re.sub(r"(?<![\w:])printf\(", "emu::device_printf(", src)
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
            ("if not CUDA:\n        yield\n        return", "if True:\n        yield\n        return"),
            ("_EMULATED = False", "_EMULATED = True")]
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
