"""Shared start-up of the command-line tools: logging, quiet libraries, offline and CPU-only."""
from __future__ import annotations

import logging
import os
import warnings


def setup_cpu_tool() -> None:
    """Logging for a tool that runs in one CPU process (the checkpoint converters).

    Hides GPUs (the conversion runs on the CPU), disables torch.compile and hub access, and
    silences the deprecation / no-CUDA notices megatron, torch and transformers print on import.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for quiet in ("megatron", "torch.utils.cpp_extension"):
        logging.getLogger(quiet).setLevel(logging.ERROR)
    for noisy in ("torch.distributed", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"(megatron|torch|transformers)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)  # ShardedTensor deprecation
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
