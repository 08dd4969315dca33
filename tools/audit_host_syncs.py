"""Lists the places in a training step that read tensor values on the host.

On a GPU every such read (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``,
``.nonzero()``) of a device tensor waits for the GPU to drain its queue, so the host stops running
ahead; a read per layer or per micro-batch costs far more than its own microseconds. This runs
real training steps of a recipe on this machine (CPU is fine: what is read on the CPU here is
read from the GPU there, unless the tensor is a host-side one on both) and prints, for one step
after the first, each call site outside torch with its number of reads.

Usage::

    python tools/audit_host_syncs.py --recipe debug
    python tools/audit_host_syncs.py --recipe debug-moe
"""
from __future__ import annotations

import collections
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")
#: Frames that are wrappers, not the code that asked for the value.
_SKIP = ("/torch/", "cpu_compat.py", "audit_host_syncs.py")


def _site() -> tuple[str, int]:
    for frame in reversed(traceback.extract_stack(limit=16)[:-2]):
        if not any(s in frame.filename for s in _SKIP):
            name = frame.filename.split("site-packages/")[-1]
            return name.replace(str(Path(__file__).resolve().parents[1]) + "/", ""), frame.lineno
    return "?", 0


def main(argv: list[str] | None = None) -> int:
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="debug", help="recipe name (default: debug)")
    p.add_argument("--global-batch-size", type=int, default=2,
                   help="packed rows per step (default 2)")
    args = p.parse_args(argv)

    counts: collections.Counter = collections.Counter()
    state = {"on": False, "depth": 0, "step": 0}

    def wrap(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if state["on"] and state["depth"] == 0 and self.numel() > 0:
                counts[(name, *_site())] += 1
            state["depth"] += 1  # reads made inside another read count once
            try:
                return original(self, *a, **k)
            finally:
                state["depth"] -= 1

        setattr(torch.Tensor, name, read)

    for name in READS:
        wrap(name)

    from megatron_sphinx.train import loop
    from megatron_sphinx.train.__main__ import main as train_main

    train_step = loop.train_step

    def audited_step(*a, **k):
        state["step"] += 1
        state["on"] = state["step"] == 2  # the first step pays lazy imports and set-up
        try:
            return train_step(*a, **k)
        finally:
            state["on"] = False

    loop.train_step = audited_step
    rc = train_main(["--recipe", args.recipe, "--steps", "2", "--data", "synthetic",
                     "--global-batch-size", str(args.global_batch_size)])
    if rc:
        return rc
    print(f"\nhost reads of tensor values in one training step of {args.recipe} "
          f"(global batch {args.global_batch_size}), by call site:")
    print(f"{'reads':>6}  {'how':<10} site")
    for (how, path, line), n in counts.most_common():
        print(f"{n:>6}  {how:<10} {path}:{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
