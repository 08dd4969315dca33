"""Builds this rank's model chunk, its DDP wrapper, the Megatron optimizer and the LR schedule."""
from __future__ import annotations

import logging
import math
import os

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_sphinx.config import SphinxConfig
from megatron_sphinx.model import wgrad_fusion
from megatron_sphinx.model.llm import ParallelSizes, transformer_config
from megatron_sphinx.model.sphinx import SphinxModel
from megatron_sphinx.train import adam as fused_adam
from megatron_sphinx.train.run_config import ADAM_FORMS, VisionRun

log = logging.getLogger(__name__)


def build_model(cfg: SphinxConfig, par: ParallelSizes, pg_collection, *, backend: str,
                dtype: torch.dtype, on_gpu: bool, recompute: str | None = None,
                fp8: bool = False, overlap_grad_reduce: bool = True,
                overlap_param_gather: bool = True, vision: VisionRun = VisionRun()) -> list:
    """This rank's SPHINX-X stage wrapped in Megatron's DDP (distributed optimizer layout).

    With ``overlap_grad_reduce`` the gradient reduce-scatter of each bucket starts during the
    backward pass, as soon as the bucket's gradients are ready, instead of after it (the result
    is the same; the communication hides behind the backward of the layers below).

    With ``overlap_param_gather`` the optimizer step does not all-gather the updated parameters;
    the next forward pass gathers each bucket just before its first layer runs and starts the
    next one behind it. Until then every rank holds only its own shard up to date:
    :func:`sync_params` completes the gather where full weights are read outside a forward pass
    (a checkpoint save).

    With ``par.vpp`` > 1 the rank holds ``vpp`` model chunks of ``layers / (pp * vpp)`` layers
    each, run by Megatron's interleaved schedule; the first chunk of the first pipeline rank
    holds the encoders, the projector and the embeddings, the last chunk of the last rank the
    output layer.

    ``vision`` says how the frozen encoders run in the training step (:class:`VisionRun`:
    the step's views as one stream of fixed-size calls, CUDA graphs, a second CUDA stream, the
    GELU's form; :func:`~megatron_sphinx.train.step.encoded_ahead`).

    Returns:
        This rank's model chunks (one without interleaving), as Megatron's schedules expect.
    """
    vision.check_device(on_gpu)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if vision.dwconv == "triton":
        _check_dwconv(device, dtype)
    tcfg = transformer_config(cfg.llm, par, dtype=dtype, on_gpu=on_gpu, backend=backend,
                              recompute=recompute, fp8=fp8,
                              wgrad_fusion=wgrad_fusion.choose(device, dtype)[0])
    pp = pg_collection.pp
    interleaved = par.vpp > 1
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather, use_distributed_optimizer=True,
        # interleaved: the schedule starts each chunk's parameter gather (param_sync_func below)
        align_param_gather=overlap_param_gather and interleaved,
        check_for_nan_in_grad=True, bucket_size=None)
    # On GPUs, modules that do not place their parameters themselves (timm encoders, the
    # projector) are created and initialised on the device directly.
    chunks = []
    for vp_stage in range(par.vpp):
        with device:
            model = SphinxModel(
                cfg, tcfg, backend, pg_collection=pg_collection,
                pre_process=pp.rank() == 0 and vp_stage == 0,
                post_process=pp.rank() == pp.size() - 1 and vp_stage == par.vpp - 1,
                vp_stage=vp_stage if interleaved else None)
        model.vision_batch = vision.batch
        model.vision_overlap = vision.overlap
        if model.pre_process:
            model.vision.cuda_graphs = vision.cuda_graphs
            model.vision.cudnn_benchmark = vision.cudnn_benchmark
            if (vision.gelu, vision.dwconv) != ("exact", "torch"):  # how they are built
                model.vision.set_fusions(vision.gelu, vision.dwconv)
        if dtype != torch.float32:
            model = Float16Module(tcfg, model)
        # As Megatron's training does: one bucket for every chunk after the first, whose
        # reduce the interleaved schedule starts when the chunk's last backward is done.
        chunks.append(DistributedDataParallel(tcfg, ddp_cfg, model, disable_bucketing=vp_stage > 0,
                                              pg_collection=pg_collection))
    # The schedules take one function per chunk when interleaved, else a function.
    one_or_list = (lambda fns: fns) if interleaved else (lambda fns: fns[0])
    tcfg.no_sync_func = one_or_list([c.no_sync for c in chunks])
    if overlap_grad_reduce and interleaved:
        tcfg.grad_sync_func = [c.start_grad_sync for c in chunks]
    if overlap_param_gather and interleaved:
        tcfg.param_sync_func = [c.start_param_sync for c in chunks]
    tcfg.finalize_model_grads_func = finalize_model_grads
    return chunks


def _check_dwconv(device: torch.device, dtype: torch.dtype) -> None:
    """``--vision-dwconv triton``: the kernel against the torch ops on this device, once.

    Raises:
        RuntimeError: It does not match them here (the reason, and what to change).
    """
    from kernels import fused_layers

    why = fused_layers.self_check("dwconv", device, dtype)
    if why:
        raise RuntimeError(f"--vision-dwconv triton: the kernel failed its start-up check on "
                           f"{device} ({dtype}): {why}; drop the flag")


def sync_params(model_chunks: list) -> None:
    """Completes the parameter all-gather that ``overlap_param_gather`` leaves to the next
    forward pass, so that every rank holds the full updated weights (a no-op without it).

    The next forward pass then finds every bucket gathered and gathers nothing again. Chunks
    without a DDP wrapper (a model built for conversion) hold full weights already.
    """
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            with torch.no_grad():
                chunk.start_param_sync(force_sync=True)


def unwrap(chunk) -> SphinxModel:
    """The :class:`SphinxModel` inside DDP / Float16Module wrappers."""
    while not isinstance(chunk, SphinxModel):
        chunk = chunk.module
    return chunk


def build_optimizer(cfg: SphinxConfig, model_chunks: list, pg_collection, *,
                    dtype: torch.dtype, total_steps: int, adam: str = "fused"):
    """Megatron's distributed AdamW and the warm-up + cosine schedule of the recipe.

    Args:
        adam: Where Megatron falls back to torch's AdamW (no Apex or TE), ``fused`` runs its
            step as one kernel (:mod:`megatron_sphinx.train.adam`), ``foreach`` as torch's
            multi-tensor ops.

    Returns:
        ``(optimizer, scheduler)``.
    """
    if adam not in ADAM_FORMS:
        raise ValueError(f"--adam {adam}: choose {' or '.join(ADAM_FORMS)}")
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=1e-8, clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, use_distributed_optimizer=True,
        # as the DDP wrappers do (the optimizer reads it only for MXFP8 parameter buffers)
        overlap_param_gather=any(c.ddp_config.overlap_param_gather for c in model_chunks))
    optimizer = get_megatron_optimizer(ocfg, model_chunks, use_gloo_process_groups=False,
                                       pg_collection=pg_collection)
    if adam == "fused":
        fused_adam.use_fused(optimizer)
    for chunk in model_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    warmup = int(math.ceil(t.warmup_fraction * total_steps))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1), lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        # The schedule follows this run's --steps; a checkpoint only supplies the step count.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return optimizer, scheduler


def rope_choice(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The rotary embedding the layers run on ``device``: Transformer Engine's fused one with its
    layers; else Megatron's per-sample loop on CPUs (faster there) and on GPUs the one gather
    with tables kept per micro-batch (``upstream_fixes``), its rotation the fused Triton kernel
    unless ``MEGATRON_SPHINX_ROPE=torch`` or the kernel fails its start-up check
    (:mod:`kernels.fused_layers`).

    Raises:
        ValueError: A bad ``MEGATRON_SPHINX_ROPE``, or ``triton`` asked for where it does not
            import.
        RuntimeError: ``triton`` asked for and the kernel fails its check here.
    """
    from kernels import fused_layers
    from kernels.settings import settings

    settings()  # checks the value everywhere
    if backend == "te":
        return "Transformer Engine fused"
    if device.type != "cuda":
        return "Megatron's per-sample loop"
    fused, why = fused_layers.choice("rope", device, dtype)
    return f"one gather, tables kept, {'triton fused' if fused else 'torch ops'} ({why})"


def swiglu_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The MLP's SwiGLU on ``device``: unfused torch ops on CPUs (no ``bias_activation_fusion``);
    on GPUs Megatron's fused function, as the Triton kernel unless ``MEGATRON_SPHINX_SWIGLU=torch``
    or the kernel fails its start-up check, else as torch ops (``torch.compile``'d with
    ``--compile-fusions``). Raises as :func:`rope_choice`."""
    from kernels import fused_layers
    from kernels.settings import settings

    settings()
    if device.type != "cuda":
        return "torch ops"
    fused, why = fused_layers.choice("swiglu", device, dtype)
    if fused:
        return f"triton fused ({why})"
    compiled = os.environ.get("TORCH_COMPILE_DISABLE", "0") in ("", "0")
    return f"Megatron's, {'torch.compile' if compiled else 'eager'} ({why})"


def loss_choice(device: torch.device, dtype: torch.dtype) -> str:
    """The LLM's cross-entropy on ``device``: on GPUs the fused Triton kernel unless
    ``MEGATRON_SPHINX_CE=torch`` or it fails its start-up check
    (:mod:`megatron_sphinx.model.fused_loss`), else Megatron's. Raises as :func:`rope_choice`."""
    from kernels import fused_layers
    from kernels.settings import settings

    settings()
    if device.type != "cuda":
        return "Megatron's"
    fused, why = fused_layers.choice("ce", device, dtype)
    return f"triton fused ({why})" if fused else f"Megatron's ({why})"


def kernel_choices(cfg: SphinxConfig, *, backend: str, dtype: torch.dtype,
                   device: torch.device, fp8: bool = False, images: str | None = None,
                   vision: VisionRun = VisionRun(), optimizer=None) -> dict:
    """Which implementation backs each performance-critical part on this rank, resolved now
    (so that a forced choice that cannot run fails at start-up, not at the first step).

    Args:
        cfg: The recipe.
        backend: ``te`` or ``local`` layers.
        dtype: Activation dtype.
        device: The rank's device.
        fp8: FP8 GEMMs in the TE layers.
        images: Where images are decoded (``gpu``/``cpu``), None when no images are decoded.
        vision: How the frozen encoders run.
        optimizer: The Megatron optimizer built (None: the class Megatron chooses).
    """
    from megatron.core import optimizer as megatron_optimizer

    from kernels import resolve_impl
    from megatron_sphinx.model.attention import choose_kernel

    head_dim = cfg.llm.hidden_size // cfg.llm.num_attention_heads
    if backend == "te":
        attention = "Transformer Engine fused THD"
    else:
        probe = torch.empty(0, 1, head_dim, device=device, dtype=dtype)
        attention = choose_kernel(probe, 0.0, head_dim ** -0.5)
    if optimizer is not None:
        adam = fused_adam.describe(optimizer)
    else:
        cls = megatron_optimizer.Adam
        adam = f"{cls.__module__.split('.')[0]} {cls.__name__}"
    return {"layers": backend + (" fp8" if fp8 else ""), "attention": attention,
            "rope": rope_choice(backend, device, dtype),
            "swiglu": swiglu_choice(device, dtype),
            "loss": loss_choice(device, dtype),
            "wgrad": wgrad_fusion.choose(device, dtype)[1],
            "pack_tokens": resolve_impl(None, device, dtype),
            "images": f"DALI {images}" if images else "none decoded (synthetic data)",
            "vision": vision.describe(device.type == "cuda"),
            "adam": adam,
            "communication": torch.distributed.get_backend()}
