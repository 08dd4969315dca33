"""Builds the pack op's CUDA extension ahead of time (e.g. once per node before a Slurm job).

``--arch`` is the target architecture (``TORCH_CUDA_ARCH_LIST``); without it the environment's
``TORCH_CUDA_ARCH_LIST`` or the visible GPUs' are used, and ``9.0`` (H100/H200) when neither is.
The build lands in ``$MEGATRON_SPHINX_EXT_DIR`` if set, else torch's extension cache
(``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), where ``kernels.pack_tokens`` finds
it on first use. Prints the built file; exit status 1 (with the compiler's reason) if it fails.

Example::

    python tools/build_pack_kernel.py --arch "8.0 9.0"
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.cuda_pack import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
