"""Proof of the CPU compatibility layer: Megatron-Core layouts equal the single-process run.

A tiny LLaMA-style GPTModel (local spec: RMSNorm, SwiGLU, RoPE, GQA, no linear biases, fp32,
``use_cpu_initialization``) is built dense and MoE (4 experts, top-2, alltoall dispatcher). The
world-size-1 run saves its initial weights as a Megatron dist checkpoint; every layout loads them
(so loading also reshards) and trains 3 steps with Megatron's schedules, DDP, the distributed
optimizer (Adam, grad clipping) and token-weighted losses. Losses and grad norms must equal the
world-size-1 run within 1e-5 relative. A resume test checks that a model+optimizer checkpoint
saved mid-run continues exactly like the uninterrupted run.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

# Imported here, in the parent, so that forked ranks start without re-importing megatron.
from megatron.core import dist_checkpointing
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_sphinx import cpu_compat
from megatron_sphinx.distributed import init_distributed
from megatron_sphinx.parallel_dims import ParallelDims
from tests.dist_harness import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU compat layer is a no-op with CUDA; GPU runs use NCCL")

SEQ = 16
VOCAB = 128
GLOBAL_MICROBATCHES = 8  # micro-batches of one sequence per step, over all DP ranks
STEPS = 3
RTOL = 1e-5
TIMEOUT = 120.0


# ------------------------------------------------------------------------------------------
# Model, optimizer, data and one training step (kept here: train/step.py belongs to the lead)
# ------------------------------------------------------------------------------------------


def tiny_config(dims: ParallelDims, moe: bool, **overrides):
    """TransformerConfig with every CUDA-only fusion off (see the flags below)."""
    kwargs = dict(
        num_layers=2 if moe else 4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.05,
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        expert_model_parallel_size=dims.ep,
        sequence_parallel=dims.sequence_parallel,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=True,
        # Megatron rejects variable_seq_lengths with the default allgather dispatcher, even
        # for a dense model; alltoall is what the MoE models use anyway.
        moe_token_dispatcher_type="alltoall",
        # CPU: no apex/TE/CUDA kernels behind these fusions.
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if moe:
        kwargs.update(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                      moe_aux_loss_coeff=1e-2,
                      moe_grouped_gemm=False, moe_permute_fusion=False)
    if dims.vpp is not None:  # interleaved PP: batched p2p is wrong at PP=2 (see module notes)
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build(dims: ParallelDims, groups, moe: bool, init_ckpt: str | None, **overrides):
    """Model chunks (DDP-wrapped, weights from ``init_ckpt``) and the distributed Adam."""
    pgs = groups.collection
    config = tiny_config(dims, moe, **overrides)
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None, normalization="RMSNorm")
    pp_rank, pp_size = pgs.pp.rank(), pgs.pp.size()
    chunks = []
    for vp_stage in range(dims.vpp or 1):
        first = pp_rank == 0 and vp_stage == 0
        last = pp_rank == pp_size - 1 and vp_stage == (dims.vpp or 1) - 1
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=VOCAB,
            max_sequence_length=SEQ, pre_process=first, post_process=last,
            share_embeddings_and_output_weights=False, position_embedding_type="rope",
            pg_collection=pgs, vp_stage=vp_stage if dims.vpp else None))
    if init_ckpt is not None:  # one load for all chunks: the access check wants whole tensors
        state = dist_checkpointing.load({i: c.sharded_state_dict() for i, c in enumerate(chunks)},
                                        init_ckpt)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[i])
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True,
                                               overlap_grad_reduce=False, bucket_size=None)
    chunks = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pgs)
              for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    opt_config = OptimizerConfig(optimizer="adam", lr=5e-3, weight_decay=0.01, adam_beta1=0.9,
                                 adam_beta2=0.95, clip_grad=0.5, use_distributed_optimizer=True,
                                 params_dtype=torch.float32)
    optimizer = get_megatron_optimizer(opt_config, chunks, use_gloo_process_groups=False,
                                       pg_collection=pgs)
    return chunks, optimizer


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The step's global batch: GLOBAL_MICROBATCHES sequences of SEQ tokens, fixed by ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_MICROBATCHES, SEQ + 1), generator=gen)
    mask = (torch.rand(GLOBAL_MICROBATCHES, SEQ, generator=gen) < 0.7).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask}


def token_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token loss -> (sum, count, report) for ``calculate_per_token_loss=True``."""
    mask = loss_mask.reshape(-1)
    loss_sum = torch.sum(output.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    """Megatron forward-step function for one micro-batch ``[1, SEQ]``."""
    batch = next(data_iterator)
    position_ids = torch.arange(SEQ).unsqueeze(0)
    output = model(batch["tokens"], position_ids, None, labels=batch["labels"])  # [b, s]
    return output, functools.partial(token_loss, batch["loss_mask"])


def train_step(chunks, optimizer, groups, step: int) -> tuple[float, float]:
    """One optimizer step on this rank's share of the global batch; (loss, grad_norm)."""
    pgs = groups.collection
    dp_rank, dp_size = pgs.dp.rank(), pgs.dp.size()
    per_rank = GLOBAL_MICROBATCHES // dp_size
    batch = global_batch(step)
    mine = [{k: v[i : i + 1] for k, v in batch.items()}
            for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    config = chunks[0].config
    pp_size = pgs.pp.size()
    schedule = get_forward_backward_func(pp_size=pp_size,
                                         vp_size=len(chunks) if len(chunks) > 1 else None)
    extra = {"pg_collection": pgs}
    if pp_size > 1:
        extra["p2p_communicator"] = P2PCommunicator(pp_group=pgs.pp, config=config)
    data = [iter(mine) for _ in chunks] if len(chunks) > 1 else iter(mine)
    reports = schedule(forward_step_func=forward_step, data_iterator=data,
                       model=chunks if len(chunks) > 1 else chunks[0],
                       num_microbatches=per_rank, seq_length=SEQ, micro_batch_size=1,
                       forward_only=False, **extra)
    ok, grad_norm, _ = optimizer.step()
    assert ok, "optimizer skipped the update"
    totals = torch.zeros(2, dtype=torch.float64)
    for report in reports:  # non-empty on the last pipeline stage only
        totals += report["lm loss"].to(torch.float64)
    torch.distributed.all_reduce(totals, group=pgs.dp_cp)
    if pp_size > 1:
        last = torch.distributed.get_global_rank(pgs.pp, pp_size - 1)
        torch.distributed.broadcast(totals, src=last, group=pgs.pp)
    return float(totals[0] / totals[1]), float(grad_norm)


# ------------------------------------------------------------------------------------------
# Rank functions (run in forked processes by the harness)
# ------------------------------------------------------------------------------------------


def _reference(rank: int, world_size: int, moe: bool, ckpt: str) -> list[tuple[float, float]]:
    """World size 1: save the initial weights to ``ckpt``, then train STEPS steps."""
    dims = ParallelDims(world_size=1)
    groups = init_distributed(dims, timeout_s=60, seed=7)
    with cpu_compat.cpu_device_mode():
        chunks, optimizer = build(dims, groups, moe, init_ckpt=None)
        dist_checkpointing.save(chunks[0].module.sharded_state_dict(), ckpt)
        return [train_step(chunks, optimizer, groups, s) for s in range(STEPS)]


def _layout(rank: int, world_size: int, dims_kwargs: dict, moe: bool, ckpt: str,
            overrides: dict | None = None) -> list[tuple[float, float]]:
    dims = ParallelDims(world_size=world_size, **dims_kwargs)
    groups = init_distributed(dims, timeout_s=60, seed=11 + rank)  # weights come from ckpt
    with cpu_compat.cpu_device_mode():
        chunks, optimizer = build(dims, groups, moe, init_ckpt=ckpt, **(overrides or {}))
        return [train_step(chunks, optimizer, groups, s) for s in range(STEPS)]


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, tuple[str, list]]:
    """Per model kind: (init checkpoint dir, world-size-1 [(loss, grad_norm)] * STEPS)."""
    out = {}
    for kind in ("dense", "moe"):
        ckpt = str(tmp_path_factory.mktemp(f"init_{kind}"))
        out[kind] = (ckpt, run_ranks(_reference, 1, kind == "moe", ckpt, timeout=TIMEOUT)[0])
    return out


def _assert_matches(got: list, want: list, label: str) -> None:
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got, want)):
        assert math.isclose(loss, ref_loss, rel_tol=RTOL), (
            f"{label} step {step}: loss {loss!r} != single-process {ref_loss!r}")
        assert math.isclose(norm, ref_norm, rel_tol=RTOL), (
            f"{label} step {step}: grad norm {norm!r} != single-process {ref_norm!r}")


LAYOUTS = [
    # id, world size, ParallelDims kwargs, moe, TransformerConfig overrides
    ("tp2", 2, dict(tp=2), False, None),
    ("tp2_sp", 2, dict(tp=2, sequence_parallel=True), False, None),
    ("pp2_1f1b", 2, dict(pp=2), False, dict(variable_seq_lengths=True)),
    ("dp2_distopt", 2, {}, False, None),
    # world size 1 again, selective recompute: norms (CheckpointWithoutOutput), MoE, attention
    ("recompute_moe", 1, {}, True, dict(recompute_granularity="selective",
                                        recompute_modules=["layernorm", "moe", "core_attn"])),
    ("ep2_moe", 2, dict(ep=2), True, None),
    ("pp2_vpp2_interleaved", 2, dict(pp=2, vpp=2), False, None),
    ("tp2_pp2", 4, dict(tp=2, pp=2), False, None),
    ("tp2_ep2_moe", 4, dict(tp=2, ep=2, sequence_parallel=True), True, None),
]


@pytest.mark.parametrize("world_size,dims_kwargs,moe,overrides",
                         [case[1:] for case in LAYOUTS], ids=[case[0] for case in LAYOUTS])
def test_layout_matches_single_process(references, world_size, dims_kwargs, moe, overrides):
    ckpt, want = references["moe" if moe else "dense"]
    per_rank = run_ranks(_layout, world_size, dims_kwargs, moe, ckpt, overrides,
                         timeout=TIMEOUT)
    for rank, got in enumerate(per_rank):
        _assert_matches(got, want, f"{dims_kwargs} rank {rank}")
    assert want[0][0] != want[-1][0], "training did not change the loss: the check is vacuous"


# ------------------------------------------------------------------------------------------
# Resume: model + distributed-optimizer checkpoint at step 2 continues like the unbroken run
# ------------------------------------------------------------------------------------------

OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _full_state(chunks, optimizer, is_loading: bool) -> dict:
    model_sd = chunks[0].module.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                      metadata=OPT_METADATA)}


def _adam_steps(optimizer) -> list[torch.Tensor]:
    inner = [optimizer] if not hasattr(optimizer, "chained_optimizers") else \
        optimizer.chained_optimizers
    return [state["step"] for opt in inner for state in opt.optimizer.state.values()]


def _run_then_save(rank: int, world_size: int, init_ckpt: str, save_dir: str):
    """Steps 0-1, save model+optimizer, steps 2-3 (the uninterrupted reference)."""
    dims = ParallelDims(world_size=world_size)
    groups = init_distributed(dims, timeout_s=60, seed=3)
    with cpu_compat.cpu_device_mode():
        chunks, optimizer = build(dims, groups, False, init_ckpt=init_ckpt)
        for s in range(2):
            train_step(chunks, optimizer, groups, s)
        dist_checkpointing.save(_full_state(chunks, optimizer, is_loading=False), save_dir)
        return [train_step(chunks, optimizer, groups, s) for s in range(2, 4)]


def _load_then_run(rank: int, world_size: int, save_dir: str):
    """Fresh processes: load the step-2 checkpoint, then steps 2-3."""
    dims = ParallelDims(world_size=world_size)
    groups = init_distributed(dims, timeout_s=60, seed=5)
    with cpu_compat.cpu_device_mode():
        chunks, optimizer = build(dims, groups, False, init_ckpt=None)
        state = dist_checkpointing.load(_full_state(chunks, optimizer, is_loading=True),
                                        save_dir)
        chunks[0].module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        steps = _adam_steps(optimizer)
        distinct = len({id(t) for t in steps}) == len(steps)
        values = sorted({float(t) for t in steps})
        return distinct, values, [train_step(chunks, optimizer, groups, s) for s in range(2, 4)]


def test_resume_matches_uninterrupted_run(references, tmp_path):
    init_ckpt, _ = references["dense"]
    save_dir = tmp_path / "step2"
    save_dir.mkdir()
    save_dir = str(save_dir)
    want = run_ranks(_run_then_save, 2, init_ckpt, save_dir, timeout=TIMEOUT)
    got = run_ranks(_load_then_run, 2, save_dir, timeout=TIMEOUT)
    for rank in range(2):
        distinct, values, losses = got[rank]
        assert distinct, "Adam 'step' tensors are shared between parameters after load"
        assert values == [2.0], f"Adam step after load is {values}, expected [2.0]"
        assert losses == want[rank], (
            f"rank {rank}: resumed (loss, grad_norm) {losses} != uninterrupted {want[rank]}")


# ------------------------------------------------------------------------------------------
# The compat layer's mechanisms, one by one (in forked ranks: the test process stays unpatched)
# ------------------------------------------------------------------------------------------


class _CudaAllocatingBackward(torch.autograd.Function):
    """Like Megatron's TP mappings: allocates on the 'current CUDA device' in backward."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty(grad.shape, device=torch.cuda.current_device())
        out.copy_(grad * 2)
        return out


def _mechanisms(rank: int, world_size: int) -> dict:
    from megatron.core import tensor_parallel

    names = cpu_compat.apply()
    out = {"names": names, "again": cpu_compat.apply()}
    try:
        torch.empty(1, device="cuda")
        out["cuda_outside_mode"] = "allocated"
    except (RuntimeError, AssertionError) as exc:  # no driver: the mode is what redirects
        out["cuda_outside_mode"] = type(exc).__name__
    with cpu_compat.cpu_device_mode():
        x = torch.ones(3, device="cuda")
        out["devices"] = [str(t.device) for t in (
            x, torch.zeros(2, device=torch.cuda.current_device()), x.cuda(),
            x.to("cuda:0"), x.to(torch.device("cuda"), torch.float64),
            torch.empty(2, pin_memory=True), x.pin_memory())]
        out["cuda_is_self"] = x.cuda() is x
        out["type"] = x.type()
        out["type_convert"] = str(x.type("torch.cuda.DoubleTensor").dtype)
        with cpu_compat.cpu_device_mode():  # re-entrant: still one mode on the stack
            out["nested_modes"] = sum(isinstance(m, cpu_compat._CpuDeviceMode) for m in
                                      torch.overrides._get_current_function_mode_stack())
        grads = []
        for run_backward in (lambda y: y.sum().backward(),
                             lambda y: torch.autograd.backward([y.sum()]),
                             lambda y: torch.autograd.backward(y, grad_tensors=torch.ones(3))):
            leaf = torch.ones(3, requires_grad=True)
            run_backward(_CudaAllocatingBackward.apply(leaf))
            grads.append(leaf.grad.tolist())
        out["grads"] = grads
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            event = stream.record_event()
        event.synchronize()
        torch.cuda.synchronize()
        # RNG tracker on the CPU generator: forked draws repeat after re-seeding and leave the
        # default stream of random numbers untouched.
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        before = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(4)
        out["default_rng_restored"] = bool(torch.equal(before, torch.get_rng_state()))
        tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        with tracker.fork():
            second = torch.rand(4)
        out["fork_repeats"] = bool(torch.equal(first, second))
        out["fork_differs_from_default"] = not torch.equal(first, torch.rand(4))
    return out


def test_compat_mechanisms_in_one_process():
    out = run_ranks(_mechanisms, 1, timeout=TIMEOUT)[0]
    assert out["names"] == out["again"] and len(out["names"]) >= 6
    assert out["cuda_outside_mode"] != "allocated", "no CUDA here: the test premise is wrong"
    assert out["devices"] == ["cpu"] * 7
    assert out["cuda_is_self"]
    assert out["type"] == "torch.cuda.FloatTensor"
    assert out["type_convert"] == "torch.float64"
    assert out["nested_modes"] == 1
    assert out["grads"] == [[2.0, 2.0, 2.0]] * 3
    assert out["default_rng_restored"] and out["fork_repeats"]
    assert out["fork_differs_from_default"]


def _gloo_collectives(rank: int, world_size: int) -> dict:
    cpu_compat.apply()
    from megatron_sphinx.distributed import detect_launch_env

    env = detect_launch_env()
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=rank,
        world_size=world_size)
    # all_to_all_single with split sizes as tensors (the MoE alltoall dispatcher on CPU)
    send = [torch.tensor([10.0, 11.0, 12.0]), torch.tensor([20.0])][rank]
    in_splits = [torch.tensor([2, 1]), torch.tensor([0, 1])][rank]
    out_splits = [torch.tensor([2, 0]), torch.tensor([1, 1])][rank]
    recv = torch.empty(int(out_splits.sum()))
    torch.distributed.all_to_all_single(recv, send, output_split_sizes=out_splits,
                                        input_split_sizes=in_splits)
    # list-form all_gather with unequal sizes (TP + SP gathers of routing data)
    mine = torch.arange(rank + 2, dtype=torch.float32) + 100 * rank
    outs = [torch.empty(2), torch.empty(3)]
    torch.distributed.all_gather(outs, mine)
    return {"a2a": recv.tolist(), "gather": [t.tolist() for t in outs]}


def test_gloo_collectives_with_tensor_splits_and_uneven_sizes():
    results = run_ranks(_gloo_collectives, 2, timeout=TIMEOUT)
    assert results[0]["a2a"] == [10.0, 11.0]
    assert results[1]["a2a"] == [12.0, 20.0]
    for r in results:
        assert r["gather"] == [[0.0, 1.0], [100.0, 101.0, 102.0]]


def test_version_pin_refuses_other_megatron(monkeypatch):
    monkeypatch.setattr(cpu_compat.importlib.metadata, "version", lambda name: "0.20.0")
    with pytest.raises(RuntimeError, match="written for megatron-core==0.19.2 but 0.20.0"):
        cpu_compat._check_megatron_version()
