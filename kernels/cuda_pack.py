"""CUDA C++ implementation of the pack op: building, loading and the backend.

The extension (``kernels/csrc/pack_tokens.{cpp,cu}``) is compiled with
``torch.utils.cpp_extension.load`` on first use into a cache directory (``$MEGATRON_SPHINX_EXT_DIR``
if set, else torch's ``$TORCH_EXTENSIONS_DIR`` / ``~/.cache/torch_extensions``); torch rebuilds it
when the sources change and serialises concurrent builds with a lock file, so many ranks may call
it at once. When CUDA or a compiler is missing, :func:`available` says why and the selection falls
back to Triton or the reference.

``python -m kernels.cuda_pack`` builds it ahead of time (``--arch 9.0`` when no GPU is visible).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from kernels.reference import PackPlan, PackTokensFunction, alloc
from kernels.settings import settings

logger = logging.getLogger(__name__)

EXT_NAME = "megatron_sphinx_pack_tokens"
#: Environment variable naming the build directory.
BUILD_DIR_ENV = "MEGATRON_SPHINX_EXT_DIR"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "pack_tokens.cpp", CSRC / "pack_tokens.cu"]
#: Positions per stage-1 chunk of the special-row reduction.
CHUNK = 32

_module: ModuleType | None = None
_reason: str | None = None


def _valid_cuda_home(path: str | None) -> bool:
    return bool(path) and (Path(path) / "include" / "cuda_runtime.h").is_file() and \
        (Path(path) / "bin" / "nvcc").exists()


def find_cuda_home() -> str | None:
    """A CUDA toolkit root with ``bin/nvcc`` and ``include/cuda_runtime.h``, or None.

    torch guesses the root from ``which nvcc``, which is wrong when ``nvcc`` is a wrapper script
    (here ``/usr/local/bin/nvcc``); known locations are tried after the environment.
    """
    from torch.utils import cpp_extension
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  cpp_extension.CUDA_HOME, "/usr/local/cuda",
                  str(Path(nvcc).resolve().parents[1]) if nvcc else None]
    return next((c for c in candidates if _valid_cuda_home(c)), None)


@contextlib.contextmanager
def _env(key: str, value: str | None):
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def build(verbose: bool = False, arch: str | None = None) -> ModuleType:
    """Compiles (or loads the cached build of) the extension and returns the module.

    Args:
        verbose: Show the compiler's output.
        arch: ``TORCH_CUDA_ARCH_LIST`` for this build (e.g. ``"9.0"``); None = the environment's,
            or torch's detection of the visible GPUs.

    Raises:
        RuntimeError: If torch has no CUDA build or no CUDA toolkit is found.
        Exception: Whatever the compiler raises.
    """
    from torch.utils import cpp_extension
    if not torch.version.cuda:
        raise RuntimeError("this torch build has no CUDA support")
    home = find_cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc and cuda_runtime.h): set CUDA_HOME")
    if cpp_extension.CUDA_HOME != home:
        logger.info("pack_tokens: using CUDA toolkit %s (torch guessed %s)", home,
                    cpp_extension.CUDA_HOME)
        cpp_extension.CUDA_HOME = home
    build_dir = os.environ.get(BUILD_DIR_ENV)
    if build_dir:
        build_dir = str(Path(build_dir) / EXT_NAME)
        Path(build_dir).mkdir(parents=True, exist_ok=True)
    with _env("TORCH_CUDA_ARCH_LIST", arch):
        return cpp_extension.load(
            name=EXT_NAME, sources=[str(s) for s in SOURCES], build_directory=build_dir,
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--use_fast_math"], verbose=verbose)


def load_extension() -> ModuleType | None:
    """The built extension, building it on first call; None (see :func:`available`) on failure."""
    global _module, _reason
    if _module is None and _reason is None:
        try:
            _module = build()
        except Exception as exc:  # any build failure just makes the extension unavailable
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _reason = f"the CUDA extension did not build: {first}"
            logger.warning("pack_tokens: %s", _reason)
    return _module


def available() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here, and why (not). Builds the extension if needed."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    if load_extension() is None:
        return False, _reason or "the CUDA extension did not build"
    return True, "CUDA extension built"


class CudaBackend:
    """The CUDA extension's kernels behind :class:`~kernels.reference.PackTokensFunction`."""

    name = "cuda"
    needs_plan_forward = False

    def __init__(self) -> None:
        ext = load_extension()
        if ext is None:
            raise RuntimeError(f"pack_tokens CUDA backend unavailable: {_reason}")
        self.ext = ext

    def forward(self, out: torch.Tensor, text: torch.Tensor, visual: torch.Tensor,
                special: torch.Tensor, index: torch.Tensor, plan: PackPlan | None) -> None:
        """Writes ``out[i] = table[index[i]]``."""
        self.ext.forward(out, text, visual, special, index)

    def autograd_apply(self, text: torch.Tensor, visual: torch.Tensor, special: torch.Tensor,
                       index: torch.Tensor) -> torch.Tensor:
        """The op with its autograd node: the extension's C++ function (allocation, launch,
        node, and in backward plan + gradient kernels, no Python per call), or with
        ``MEGATRON_SPHINX_PACK_CUDA_AUTOGRAD=python`` the shared ``PackTokensFunction``."""
        env = settings()
        if env.cuda_autograd == "python":
            return PackTokensFunction.apply(text, visual, special, index, self)
        return self.ext.pack_tokens(text, visual, special, index, CHUNK, env.debug)

    def backward(self, grad_out: torch.Tensor, plan: PackPlan, needs: tuple[bool, bool, bool]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of text, visual and special (None where not needed)."""
        t, r, k = plan.num_text, plan.num_visual, plan.num_special
        h = grad_out.shape[1]
        grads: list[torch.Tensor | None] = []
        for need, base, rows in ((needs[0], 0, t), (needs[1], t, r)):
            g = None
            if need:
                g = alloc((rows, h), grad_out)
                self.ext.gather_rows(g, grad_out, plan.order, plan.offsets, base)
            grads.append(g)
        g_sp = None
        if needs[2]:
            g_sp = alloc((k, h), grad_out)
            self.ext.special_grad(g_sp, grad_out, plan.order, plan.offsets, t + r, CHUNK)
        return grads[0], grads[1], g_sp


def main(argv: list[str] | None = None) -> int:
    """Builds the extension ahead of time; exit 1 with the reason if it fails."""
    from megatron_sphinx.cli import ArgumentParser  # the tools' one-line argument errors

    p = ArgumentParser(description="Build the pack_tokens CUDA extension.")
    p.add_argument("--arch", default=None,
                   help='TORCH_CUDA_ARCH_LIST, e.g. "9.0" (default: $TORCH_CUDA_ARCH_LIST, else '
                   "the visible GPU's, else 9.0)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    arch = args.arch
    if arch is None and not os.environ.get("TORCH_CUDA_ARCH_LIST") and \
            not torch.cuda.is_available():
        arch = "9.0"
    try:
        mod = build(verbose=args.verbose, arch=arch)
    except Exception as exc:
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {mod.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
