"""Test-wide environment, set before any test module imports torch or megatron."""

import os

import pytest

# torch.compile-based fusions add seconds to the first CPU step; nothing may touch the network;
# one intra-op thread per process (tests run several ranks on 2 shared cores, and forked workers
# must not inherit a started OpenMP pool).
for _name, _value in {
    "TORCH_COMPILE_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}.items():
    os.environ.setdefault(_name, _value)

# Limited device time (tools/gpu_check.sh sets this): a failing property-based test reports its
# first failing example at once instead of spending minutes shrinking it.
if os.environ.get("MEGATRON_SPHINX_NO_SHRINK") == "1":
    from hypothesis import Phase, settings

    settings.register_profile("no-shrink", phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("no-shrink")


@pytest.fixture
def kernel_env(monkeypatch):
    """Sets a kernel environment variable (``kernel_env(name, value)``) and re-reads the kernel
    settings (read once per process otherwise); the old values come back after the test."""
    from kernels import refresh_settings

    def set_env(name: str, value: str) -> None:
        monkeypatch.setenv(name, value)
        refresh_settings()

    yield set_env
    monkeypatch.undo()
    refresh_settings()


@pytest.fixture
def rope_env(kernel_env):
    """``rope_env(value)`` sets ``MEGATRON_SPHINX_ROPE`` as :func:`kernel_env` does."""
    from kernels.settings import ROPE_ENV

    return lambda value: kernel_env(ROPE_ENV, value)
