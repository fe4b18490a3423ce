import importlib.util
import os

import pytest
import torch

import fastfuse

CUDA = torch.cuda.is_available()
TRITON_INTERPRET = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
TRITON = TRITON_INTERPRET or (importlib.util.find_spec("triton") is not None and CUDA)
CPP = fastfuse.backends()["cpp"]["available"]

# backends that can run CPU tensors here: Triton only through the interpreter, GPU or not (without
# TRITON_INTERPRET=1 Triton compiles for the GPU and refuses CPU tensors)
CPU_BACKENDS = ["reference"] + (["cpp"] if CPP else []) + (["triton"] if TRITON_INTERPRET else [])


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, for bit-identity checks."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)
