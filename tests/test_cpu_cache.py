"""The CPU output cache (csrc/cpu/alloc.h): big outputs reuse freed blocks and stay ordinary tensors."""
import pytest
import torch

import fastfuse
from fastfuse import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason="fastfuse._C not built")

BIG = (4, 8, 256, 160)  # 5.2 MB of float32: above the 64 KB cache threshold


def idle():
    return _extension._C.cpu_cache_idle_bytes()


def test_freed_output_is_reused_and_empty_cache_frees_it():
    fastfuse.empty_cpu_cache()
    assert idle() == 0
    x = torch.randn(BIG)
    y = fastfuse.dropout(x, 0.5)
    ptr = y.data_ptr()
    del y
    assert idle() >= x.nbytes  # the block came back to the cache instead of the system
    y2 = fastfuse.dropout(x, 0.5)
    assert y2.data_ptr() == ptr and idle() == 0  # ... and was handed out again
    del y2
    fastfuse.empty_cpu_cache()
    assert idle() == 0


def test_cached_outputs_are_ordinary_tensors():
    x = torch.randn(BIG).to(memory_format=torch.channels_last)
    y = fastfuse.dropout(x, 0.25)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.stride() == x.stride()
    keep = y != 0
    torch.testing.assert_close(y[keep], x[keep] / 0.75)
    y2 = y.clone()
    y.resize_(3 * y.numel())  # storage from the cache stays resizable and keeps its contents (memory order)
    assert torch.equal(y[: y2.numel()], y2.permute(0, 2, 3, 1).reshape(-1))


def test_small_outputs_bypass_the_cache():
    fastfuse.empty_cpu_cache()
    y = fastfuse.dropout(torch.randn(100, 100), 0.5)
    del y
    assert idle() == 0


def test_batch_norm_partials_go_back_to_the_cache():
    """The rows-layout statistics' per-block partials (2 x blocks x C doubles, 4 MB here) come from the cache, so
    empty_cpu_cache() returns them too; the result does not depend on where they came from."""
    x = torch.randn(4096, 1000)
    fastfuse.empty_cpu_cache()
    ref = torch.ops.fastfuse_C.bn_stats(x, False)
    assert idle() >= 2 * (4096 // 16) * 1000 * 8  # freed after the call, held for the next one
    again = torch.ops.fastfuse_C.bn_stats(x, False)
    assert all(torch.equal(a, b) for a, b in zip(ref, again))
    fastfuse.empty_cpu_cache()
    assert idle() == 0
