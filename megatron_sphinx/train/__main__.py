"""``python -m megatron_sphinx.train``: train a SPHINX-X recipe (single process, torchrun, srun)."""
from __future__ import annotations

import logging
import os
import sys

from megatron_sphinx.config import VISION_DWCONV_FORMS, VISION_GELU_FORMS
from megatron_sphinx.train.run_config import ADAM_FORMS, RunConfig


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Command line -> :class:`RunConfig`."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(prog="python -m megatron_sphinx.train",
                       description="Train a SPHINX-X recipe on Megatron-Core.")
    p.add_argument("--recipe", default="debug", help="recipe name (default: debug)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=1,
                   help="virtual pipeline stages per pipeline rank: > 1 runs Megatron's "
                   "interleaved schedule, a smaller pipeline bubble; pp * vpp must divide the "
                   "layers and pp the micro-batches per step (default 1)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    p.add_argument("--sp", dest="sequence_parallel", action="store_true",
                   help="sequence parallelism within the TP group")
    p.add_argument("--steps", type=int, default=20, help="total optimizer steps (default 20)")
    p.add_argument("--data", default=None,
                   help="preprocessed store; 'synthetic' for random data; default: sample data")
    p.add_argument("--save", default=None, help="save directory (resumes if it has checkpoints)")
    p.add_argument("--load", default=None, help="checkpoint or save directory to start from")
    p.add_argument("--save-interval", type=int, default=0,
                   help="save every N steps (default 0: at the end and on a stop only)")
    p.add_argument("--keep-last", type=int, default=0,
                   help="keep the newest N checkpoints (default 0: keep all)")
    p.add_argument("--no-final-save", dest="final_save", action="store_false",
                   help="no checkpoint at the last step (benchmarks: metrics.jsonl only)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="packed rows per optimizer step (default: the recipe's)")
    p.add_argument("--seq-length", type=int, default=None,
                   help="positions per packed row (default: the recipe's)")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="packed rows per forward pass, run as one THD sequence (default: the "
                   "recipe's, 1; sphinx-tiny 2)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: the recipe's)")
    p.add_argument("--min-lr", type=float, default=None,
                   help="learning rate at the end of the cosine decay (default: the recipe's, 0)")
    p.add_argument("--warmup-fraction", type=float, default=None,
                   help="fraction of --steps in linear warm-up (default: the recipe's, 0.01)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay (default: the recipe's, 0)")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="gradient-norm clip, 0 = none (default: the recipe's, 1.0)")
    p.add_argument("--adam", default="fused", choices=ADAM_FORMS,
                   help="torch's AdamW step (where Megatron finds no Apex or Transformer "
                   "Engine) as one fused kernel or as multi-tensor ops (default fused)")
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's")
    p.add_argument("--backend", default="auto", choices=["auto", "te", "local"],
                   help="layers: auto = Transformer Engine when it and a GPU are present, else "
                   "Megatron's local ones (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto = bf16 on GPUs, fp32 on CPUs (default auto)")
    p.add_argument("--recompute", default=None, choices=["selective", "full"],
                   help="activation recompute (default: none)")
    p.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false",
                   help="reduce gradients after the backward pass, not during it (debugging)")
    p.add_argument("--no-overlap-param-gather", dest="overlap_param_gather",
                   action="store_false",
                   help="all-gather the updated parameters in the optimizer step, not during "
                   "the next forward pass (debugging)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 GEMMs (Transformer Engine layers on an FP8 GPU such as H100)")
    p.add_argument("--compile-fusions", action="store_true",
                   help="torch.compile Megatron's fused SwiGLU and bias-dropout-add (off by "
                   "default: measured slower on one H100, see docs/PERFORMANCE.md)")
    p.add_argument("--vision-batch", type=int, default=0, metavar="N",
                   help="encode a step's views as one stream, N views per encoder call (a "
                   "multiple of 8), each call queued before the first micro-batch needing it "
                   "(default 0: each micro-batch its own)")
    p.add_argument("--cuda-graph-vision", action="store_true",
                   help="replay the frozen encoders as CUDA graphs, one per call size (GPU; "
                   "needs --vision-batch)")
    p.add_argument("--overlap-vision", action="store_true",
                   help="encode the next micro-batch's views on a second CUDA stream while this "
                   "one trains (GPU; side by side only with CUDA_DEVICE_MAX_CONNECTIONS unset or "
                   "above 1)")
    p.add_argument("--vision-gelu", default="exact", choices=VISION_GELU_FORMS,
                   help="tanh: the encoders' GELU feed-forwards (ConvNeXt's) compute GELU in its "
                   "tanh form in their first GEMM's epilogue on GPUs, one pass over their widest "
                   "activation fewer; tokens differ slightly (default exact)")
    p.add_argument("--vision-dwconv", default="torch", choices=VISION_DWCONV_FORMS,
                   help="triton: ConvNeXt's depthwise convolution and the norm after it as one "
                   "Triton kernel (GPU; checked at start-up; default torch)")
    p.add_argument("--vision-cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms for each new convolution shape of the "
                   "encoders and keep the fastest (GPU; each new call size is timed once: best "
                   "with --vision-batch)")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="one padded sample per sequence (the reference implementation's way)")
    p.add_argument("--no-skip", dest="skip_padded_views", action="store_false",
                   help="encode every sub-image, also fully padded ones")
    p.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit with code 3 when the step is a multiple of N")
    p.add_argument("--exit-after-minutes", type=float, default=None,
                   help="save and exit with code 3 after this much wall time "
                   "(counted from the start, start-up included)")
    p.add_argument("--timeout-minutes", type=float, default=10.0,
                   help="collective timeout: a dead rank ends the job after this (default 10)")
    p.add_argument("--log-interval", type=int, default=1,
                   help="console line every N steps (default 1; metrics.jsonl has every step)")
    p.add_argument("--tensorboard-dir", default=None,
                   help="also write every step's loss, lr, gradient norm, throughput and "
                   "evaluation loss as TensorBoard scalars there (rank 0; default: none)")
    p.add_argument("--eval-data", default=None,
                   help="held-out store (or 'synthetic') for the evaluation loss; default: none")
    p.add_argument("--eval-split", type=float, default=None,
                   help="hold out this fraction of --data (e.g. 0.01) and evaluate on it")
    p.add_argument("--eval-interval", type=int, default=0,
                   help="evaluate every N steps and at the last step (default 0: last step only)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the checkpoint of --load (or --save's newest) once and stop; "
                   "writes nothing")
    p.add_argument("--eval-batches", type=int, default=8,
                   help="global batches per evaluation, the same ones every time (default 8)")
    return RunConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input ends with one line on stderr and exit code 2.

    The arguments, the recipe, the paths (``--data``, ``--save``, the checkpoint to start
    from) and the sequence length are checked before Megatron is imported, so a mistake costs
    seconds, not a model build. Errors found there, and those of the checks against the launch
    (the parallel layout, a ``--save`` directory of another run), are the same on every rank and
    only the first rank prints them; errors after the process groups exist are printed by every
    rank that meets them.
    """
    # Megatron's torch.compile'd fusions: off unless --compile-fusions (RunConfig.compile_fusions
    # says why); torch reads the variable at import, so it is set before that.
    if "--compile-fusions" in (sys.argv[1:] if argv is None else argv):
        os.environ["TORCH_COMPILE_DISABLE"] = "0"
    else:
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("megatron", "megatron.core", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_sphinx.cli import fail, launch_rank, quiet_import_notices
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.checkpoint import find_latest
    from megatron_sphinx.train.run_config import check_run_inputs

    quiet_import_notices()

    try:
        rc = parse_args(argv)
        cfg = get_recipe(rc.recipe)  # an unknown recipe fails before the heavy imports
        check_run_inputs(rc, cfg)
    except (ValueError, FileNotFoundError) as exc:
        return fail(exc) if launch_rank() == 0 else 2
    if rc.save and rc.load and find_latest(rc.save) is not None:
        logging.getLogger("megatron_sphinx.train").warning(
            "--save %s already holds checkpoints: the run resumes from them and --load %s is "
            "not used (pass a new --save to start from --load)", rc.save, rc.load)
    from megatron_sphinx.cli import SameOnEveryRank

    try:
        from megatron_sphinx.train.loop import run

        run(rc)
    except SameOnEveryRank as exc:
        return fail(exc) if launch_rank() == 0 else 2
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError is a ValueError
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
