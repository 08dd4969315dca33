"""The optimizer step as one fused kernel per parameter group where Megatron falls back to torch.

Without Apex or Transformer Engine (always on CPUs; on GPU images without TE), Megatron's
distributed optimizer runs ``torch.optim.AdamW`` in its multi-tensor form: about ten
``_foreach`` passes over the fp32 main parameters, their gradients and both moments per step
(H100 run 2: ~22 ms of ``multi_tensor_apply`` kernels in a sphinx-tiny step). torch's
``fused=True`` form does the same update in one pass: it reads parameter, gradient and moments
once and writes them once. Its results equal the multi-tensor form's up to fp32 rounding.

The fused form keeps Adam's ``step`` counters on the parameters' device (the multi-tensor form
keeps them on the CPU), and torch's ``load_state_dict`` takes the kernel flags from the
*checkpoint's* parameter groups. :func:`use_fused` therefore also registers a load pre-hook
that keeps the fused form across a resume, from checkpoints of either form, and
:mod:`megatron_sphinx.upstream_fixes` creates a fresh state's ``step`` where torch would.
Apex's and TE's ``FusedAdam`` (chosen by Megatron when they import) are fused already.
"""
from __future__ import annotations

import torch


def inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch (or Apex / TE) optimizers under a Megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    parts = chained if chained is not None else [optimizer]
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def _is_torch_adam(inner: torch.optim.Optimizer) -> bool:
    return type(inner) in (torch.optim.Adam, torch.optim.AdamW)


def _fused_flags(group: dict) -> None:
    group["fused"] = True
    group["foreach"] = False


def _keep_fused_on_load(inner: torch.optim.Optimizer, state_dict: dict) -> dict:
    """Load pre-hook: the loaded groups keep the fused flags, so that torch's loader moves each
    ``step`` to its parameter's device in fp32, as the fused kernel reads it."""
    state_dict = dict(state_dict)
    state_dict["param_groups"] = [dict(g) for g in state_dict["param_groups"]]
    for group in state_dict["param_groups"]:
        _fused_flags(group)
    return state_dict


def use_fused(optimizer) -> None:
    """Switches every torch ``Adam``/``AdamW`` under ``optimizer`` (a Megatron optimizer) to
    torch's fused form, before or after its first step, and keeps it fused when a checkpoint is
    loaded into it. Others (Apex's, TE's) are left as they are.

    Raises:
        ValueError: A parameter on a device (or of a dtype) torch's fused kernel does not take.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    for inner in inner_optimizers(optimizer):
        if not _is_torch_adam(inner):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if p.device.type not in devices or not torch.is_floating_point(p):
                    raise ValueError(f"--adam fused: torch's fused AdamW does not take {p.dtype} "
                                     f"parameters on {p.device.type}; use --adam foreach")
        for group in inner.param_groups:
            if group.get("differentiable"):
                raise ValueError("--adam fused: the optimizer is differentiable; use --adam "
                                 "foreach")
            _fused_flags(group)
            for p in group["params"]:
                step = inner.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    inner.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
        _fused_flags(inner.defaults)
        inner._step_supports_amp_scaling = True  # as torch's constructor sets for fused=True
        inner.register_load_state_dict_pre_hook(_keep_fused_on_load)


def describe(optimizer) -> str:
    """The ``adam`` entry of the start-up ``kernels:`` line: the optimizer class that runs the
    step and, for torch's, its form."""
    inners = inner_optimizers(optimizer)
    if not inners:
        return "none on this rank"
    inner = inners[0]
    name = f"{type(inner).__module__.split('.')[0]} {type(inner).__name__}"
    if not _is_torch_adam(inner):
        return name
    fused = all(g.get("fused") for i in inners for g in i.param_groups)
    return f"{name}, {'fused (one kernel)' if fused else 'multi-tensor (foreach)'}"
