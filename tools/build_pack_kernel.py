"""Builds the pack op's CUDA extension ahead of time (e.g. once per node before a Slurm job).

Without a visible GPU pass the target architecture (``--arch 9.0`` for H100/H200, the default
then). The build lands in ``$MEGATRON_SPHINX_EXT_DIR`` or torch's extension cache, where
``kernels.pack_tokens`` finds it on first use. Exit status 1 (with the compiler's reason) if it
fails.

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
