"""The GPU check (tests/trainer/gpu_check.py) as a test; skipped without CUDA or bitsandbytes."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs a CUDA device and bitsandbytes")


def test_generator_succeeds_where_naive_generate_fails_on_gpu():
    from tests.trainer.gpu_check import main
    assert main() == 0
