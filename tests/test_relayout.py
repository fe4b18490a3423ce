"""The AVX-512 relayout (csrc/cpu/relayout.cpp) the direct reflect_conv2d design takes NCHW tensors through: exact
copies between NCHW and channels_last, over shapes that cut its 16x16 tiles and 256 x 64 blocks anywhere."""
import pytest
import torch

import fastfuse
from conftest import CPP

AVX512 = CPP and torch.backends.cpu.get_cpu_capability() == "AVX512"
pytestmark = pytest.mark.skipif(not AVX512, reason="the relayout runs on AVX-512 CPUs only")

SHAPES = [(2, 3, 5, 7), (1, 17, 4, 9), (3, 33, 6, 6), (2, 64, 1, 1), (1, 1, 5, 5), (2, 16, 16, 1), (0, 4, 3, 3),
          (2, 130, 7, 9), (1, 20, 9, 10), (2, 20, 17, 19), (1, 300, 3, 5)]  # the last two: blocks of 256 rows


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relayout_both_ways_is_an_exact_copy(shape):
    x = torch.randn(shape)
    before = x.clone()
    y = fastfuse._C.relayout(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, x)
    z = fastfuse._C.relayout(y, False)
    assert z.is_contiguous() and torch.equal(z, x)
    assert torch.equal(x, before)  # the source is left alone
    # already laid out: a view with the layout's own strides, not a copy
    same = fastfuse._C.relayout(x, False)
    assert same.data_ptr() == x.data_ptr() and same.stride() == x.stride()


def test_relayout_of_a_slice_reads_from_its_offset():
    x = torch.randn(4, 5, 6, 7)[1:3]
    assert torch.equal(fastfuse._C.relayout(x, True), x)
    y = torch.randn(4, 5, 6, 7).to(memory_format=torch.channels_last)[2:]
    assert torch.equal(fastfuse._C.relayout(y, False), y)


def test_relayout_takes_only_dense_fp32():
    assert fastfuse._C.relayout_applies(torch.randn(2, 3, 4, 5))
    assert not fastfuse._C.relayout_applies(torch.randn(2, 3, 4, 5).double())
    assert not fastfuse._C.relayout_applies(torch.randn(2, 3, 4, 5).transpose(2, 3))
    assert not fastfuse._C.relayout_applies(torch.randn(3, 4, 5))
    with pytest.raises(RuntimeError, match="relayout"):
        fastfuse._C.relayout(torch.randn(2, 3, 4, 5).double(), True)
