"""The frozen encoders: 257 tokens per view, frozen in eval mode, local pretrained weights."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megatron_sphinx.config import get_recipe
from megatron_sphinx.model.vision import FrozenEncoder, MixtureOfVisualExperts
from tests.encoders import gpu_fusion_run, scaled


@pytest.fixture(scope="module")
def debug_vision():
    return get_recipe("debug").vision


def test_mov_tokens_channels_and_frozen(debug_vision):
    mov = MixtureOfVisualExperts(debug_vision).train()  # asking for train mode changes nothing
    views = torch.rand(3, 3, 224, 224)
    out = mov(views)
    assert out.shape == (3, 257, debug_vision.channels)
    assert not any(p.requires_grad for p in mov.parameters())
    assert not any(m.training for m in mov.modules())
    assert mov.num_views_encoded == 3 and mov.num_calls == 1
    # ConvNeXt's "cls" token is the mean of its 16x16 map
    conv = mov.encoders[0](views)
    torch.testing.assert_close(conv[:, 0], conv[:, 1:].mean(1))


@pytest.mark.parametrize("recipe", ["debug", "sphinx-tiny"])
def test_fused_blocks_are_every_block_of_the_encoders(recipe):
    """Every ConvNeXt block, ViT block and ViT SwiGLU feed-forward of the recipe's encoders runs
    the fused forward (full-size encoders built on the meta device: no memory, no maths)."""
    import timm

    from megatron_sphinx.model.vision_fusions import fuse_frozen_blocks

    for enc in get_recipe(recipe).vision.encoders:
        with torch.device("meta"):
            model = timm.create_model(enc.timm_name, pretrained=False, num_classes=0,
                                      **enc.timm_kwargs)
        blocks = sum(len(s.blocks) for s in model.stages) if enc.kind == "convnext" \
            else len(model.blocks)
        assert blocks >= 1
        want = ({"convnext_block": blocks, "vit_block": 0, "swiglu_mlp": 0}
                if enc.kind == "convnext" else
                {"convnext_block": 0, "vit_block": blocks, "swiglu_mlp": blocks})
        convnext = blocks if enc.kind == "convnext" else 0
        assert fuse_frozen_blocks(model) == {**want, "gelu_mlp_epilogue": 0, "dwconv_norm": 0}
        # tanh GELU: every ConvNeXt feed-forward (Linear, GELU, Linear) too; DINOv2's is SwiGLU
        assert fuse_frozen_blocks(model, gelu="tanh") == {
            **want, "gelu_mlp_epilogue": convnext, "dwconv_norm": 0}
        # every ConvNeXt block's depthwise convolution and norm as one kernel
        assert fuse_frozen_blocks(model, dwconv="triton") == {
            **want, "gelu_mlp_epilogue": 0, "dwconv_norm": convnext}


def test_fused_blocks_give_timms_tokens(debug_vision):
    """Layer scale + residual as one addcmul, the ViT's SwiGLU gate fused: timm's tokens up to
    fp32 rounding, with layer scales far from their tiny initial values, and the same state
    dict names."""
    torch.manual_seed(0)
    mov = scaled(MixtureOfVisualExperts(debug_vision))
    names = [sorted(enc.state_dict()) for enc in mov.encoders]
    views = torch.rand(3, 3, 224, 224)
    fused = mov(views)
    from megatron_sphinx.model.vision_fusions import restore_timm_forwards

    for enc in mov.encoders:
        restore_timm_forwards(enc.model)
    reference = mov(views)
    assert [sorted(enc.state_dict()) for enc in mov.encoders] == names
    assert reference.abs().max() > 1.0
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-5)
    assert not torch.equal(fused, reference)  # the fused path did run (other roundings)


def test_gelu_in_the_gemm_epilogue_gives_timms_tokens_and_undoes(debug_vision):
    """``--vision-gelu tanh``: ConvNeXt's feed-forward as one ``_addmm_activation`` (on CPUs
    torch computes the exact GELU there, so the tokens equal timm's up to fp32 rounding: this
    checks the plumbing; the tanh form is checked on a GPU below); ``exact`` undoes it."""
    torch.manual_seed(0)
    mov = scaled(MixtureOfVisualExperts(debug_vision))
    views = torch.rand(3, 3, 224, 224)
    want = mov(views)
    calls = []
    real = torch._addmm_activation

    def counted(*args, **kwargs):
        calls.append(kwargs.get("use_gelu"))
        return real(*args, **kwargs)

    mov.set_fusions(gelu="tanh")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_addmm_activation", counted)
        got = mov(views)
        assert calls == [True] * 4  # the debug ConvNeXt's four blocks
        mov.set_fusions(gelu="exact")
        torch.testing.assert_close(mov(views), want, atol=0, rtol=0)
        assert len(calls) == 4
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="choose exact or tanh"):
        mov.set_fusions(gelu="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gelu_epilogue_on_a_gpu_drops_the_gelu_kernel_and_tracks_exact_tokens():
    """On a GPU ``--vision-gelu tanh`` computes ConvNeXt's GELU in the first GEMM's epilogue
    (cuBLASLt): no GELU kernel runs; the bf16 tokens stay within bf16 noise of exact GELU's."""
    exact, tanh, kernels = gpu_fusion_run(gelu="tanh")
    assert not any("gelu" in k.lower() and "gemm" not in k.lower() and "nvjet" not in k
                   for k in kernels), kernels
    rel = float((tanh - exact).norm() / exact.norm())
    assert 0 < rel < 2e-2, rel  # the CPU emulation in bf16 (nn.GELU tanh): 0.6%


def test_loads_timm_and_open_clip_weights(debug_vision, tmp_path):
    enc_cfg = debug_vision.encoders[0]
    torch.manual_seed(1)
    src = FrozenEncoder(enc_cfg)
    state = src.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "timm.safetensors")
    torch.save({"state_dict": {f"visual.trunk.{k}": v for k, v in state.items()}},
               tmp_path / "open_clip.pt")
    for path in ("timm.safetensors", "open_clip.pt"):
        torch.manual_seed(2)
        dst = FrozenEncoder(enc_cfg)
        assert not torch.equal(dst.model.stem[0].weight, src.model.stem[0].weight)
        dst.load_pretrained(str(tmp_path / path))
        for k, v in dst.model.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_mismatched_or_missing_weights_say_what_to_change(debug_vision, tmp_path):
    conv_cfg, vit_cfg = debug_vision.encoders
    vit_state = FrozenEncoder(vit_cfg).model.state_dict()
    save_file({k: v.contiguous() for k, v in vit_state.items()}, tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="does not match convnext_xxlarge.*pass the weights"):
        FrozenEncoder(conv_cfg).load_pretrained(str(tmp_path / "vit.safetensors"))
    with pytest.raises(FileNotFoundError, match="not found"):
        FrozenEncoder(conv_cfg).load_pretrained(str(tmp_path / "nope.safetensors"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vit_attention_on_a_gpu_avoids_cudnn_and_matches_the_cpu(debug_vision):
    """On a GPU the ViT's attention runs FlashAttention (or the memory-efficient kernel), not
    cuDNN's, which plans anew for every new number of views; the tokens match the CPU's."""
    from torch.profiler import ProfilerActivity, profile

    enc_cfg = next(e for e in debug_vision.encoders if e.kind == "vit")
    torch.manual_seed(0)
    enc = FrozenEncoder(enc_cfg)
    views = torch.rand(5, 3, 224, 224)
    want = enc(views)
    enc = enc.cuda().to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for v in (5, 3, 7):  # three batch shapes
            enc(torch.rand(v, 3, 224, 224, device="cuda"))
    names = {e.key for e in prof.key_averages()}
    assert not any("cudnn_attention" in n for n in names), sorted(n for n in names if "cudnn" in n)
    assert any("flash" in n or "efficient_attention" in n for n in names), sorted(names)[:40]
    got = enc(views.cuda())
    torch.testing.assert_close(got.float().cpu(), want, atol=5e-2, rtol=5e-2)


def test_encode_in_fixed_size_calls_gives_the_per_call_tokens(debug_vision):
    """``encode_in_calls`` splits any number of views into calls of at most ``max_views``, pads
    the last one with zero views to a multiple of 8, and returns exactly the real views'
    tokens."""
    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision)
    views = torch.rand(21, 3, 224, 224)
    want = mov(views)
    shapes = []
    handle = mov.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape[0]))
    mov.num_views_encoded = 0
    got = torch.cat(list(mov.encode_in_calls(views, max_views=16)))
    handle.remove()
    assert shapes == [16, 8]  # 16 real, then 5 real + 3 padding
    assert mov.num_views_encoded == 21 and mov.num_padding_views == 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert list(mov.encode_in_calls(views[:0], max_views=16)) == []  # no view, no call
    assert shapes == [16, 8]
    with pytest.raises(ValueError, match="give a multiple of 8"):
        list(mov.encode_in_calls(views, max_views=12))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_eager_encoding(debug_vision):
    """With ``cuda_graphs`` each call size is captured once and replayed: the tokens equal
    the eager ones, for new pixels at every call."""
    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision).cuda().to(torch.bfloat16)
    batches = [torch.rand(n, 3, 224, 224, device="cuda") for n in (8, 16, 8, 16)]
    want = [mov(v) for v in batches]
    mov.cuda_graphs = True
    got = [mov(v) for v in batches]
    assert len(mov._graphs) == 2  # one graph per size, captured at its first call
    tol = dict(atol=1e-2, rtol=1e-2)  # the same kernels; bf16 rounding at most
    assert not torch.allclose(want[0], want[2], **tol)  # new pixels, new tokens (none stale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    # sizes 16 and 8 replayed
    out = torch.cat(list(mov.encode_in_calls(torch.cat(batches[:2])[:21], max_views=16)))
    torch.testing.assert_close(out, torch.cat(want[:2])[:21], **tol)
    assert len(mov._graphs) == 2


def test_cudnn_benchmark_is_on_inside_the_encoders_only(debug_vision):
    """``cudnn_benchmark`` turns ``torch.backends.cudnn.benchmark`` on around the encoders'
    calls (where their convolutions run) and back as it was after; the tokens stay the same."""
    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision)
    views = torch.rand(2, 3, 224, 224)
    seen = []
    for enc in mov.encoders:
        enc.register_forward_pre_hook(lambda mod, args: seen.append(
            torch.backends.cudnn.benchmark))
    want = mov(views)
    before = torch.backends.cudnn.benchmark
    mov.cudnn_benchmark = True
    got = mov(views)
    assert seen == [before] * 2 + [True] * 2
    assert torch.backends.cudnn.benchmark == before
    torch.testing.assert_close(got, want)
    mov.encoders[0].register_forward_hook(lambda *a: 1 / 0)  # an error inside: still restored
    with pytest.raises(ZeroDivisionError):
        mov(views)
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_benchmark_with_cuda_graphs_matches_eager_encoding(debug_vision):
    """cuDNN's timed algorithms under CUDA graphs (the warm-up calls before each capture time
    them; the capture then finds them chosen): the tokens of the heuristics' eager calls."""
    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision).cuda().to(torch.bfloat16)
    batches = [torch.rand(n, 3, 224, 224, device="cuda") for n in (8, 16, 8)]
    want = [mov(v) for v in batches]
    mov.cudnn_benchmark, mov.cuda_graphs = True, True
    got = [mov(v) for v in batches]
    assert len(mov._graphs) == 2
    for g, w in zip(got, want):  # other algorithms may sum in another order: bf16 rounding
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


def _first_stage(mov: MixtureOfVisualExperts, vision_batch: int, overlap: bool):
    """A first-stage ``SphinxModel`` holding only what ``encoded_ahead`` reads."""
    from torch import nn

    from megatron_sphinx.model.sphinx import SphinxModel

    model = SphinxModel.__new__(SphinxModel)
    nn.Module.__init__(model)
    model.pre_process, model.vision_batch, model.vision = True, vision_batch, mov
    model.vision_overlap, model.vision_stream = overlap, None
    return model


@pytest.mark.parametrize("vision_batch,overlap", [(8, False), (8, True), (0, True)])
def test_step_views_are_encoded_call_by_call_as_micro_batches_need_them(debug_vision,
                                                                        vision_batch, overlap):
    """``encoded_ahead`` hands out each micro-batch's tokens (equal to its own encoder call's)
    and queues an encoder call only when the first micro-batch holding its views is read (with
    ``vision_overlap``: when the micro-batch before it is read, as a GPU then runs the call on a
    second stream during that micro-batch), so that on a GPU the encoders' work interleaves
    with the LLM's micro-batches. Without ``vision_batch`` each micro-batch is one call."""
    from megatron_sphinx.data.synthetic import SyntheticLoader
    from megatron_sphinx.train.step import encoded_ahead

    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision)
    model = _first_stage(mov, vision_batch, overlap)
    micro = SyntheticLoader(1000, 1400, 448, 2, global_batch_size=6, seed=3).next_step()
    micro[3] = SyntheticLoader(1000, 1400, 448, 2, global_batch_size=1, seed=3,
                               image_fraction=0.0).next_step()[0]  # one without views
    counts = [m.views.shape[0] for m in micro]
    assert sum(counts) > 8 and 0 < min(counts[:2])  # several calls; the first two have views
    assert counts[3] == 0
    want = [mov(m.views) if m.views.shape[0] else None for m in micro]
    mov.num_calls = 0
    ahead = encoded_ahead(model, micro, torch.device("cpu"))
    assert mov.num_calls == 0  # nothing runs before the schedule reads the first micro-batch
    for k, (m, w) in enumerate(zip(ahead, want)):
        last = min(k + overlap, len(micro) - 1)  # the micro-batches whose views are queued
        if vision_batch:
            assert mov.num_calls == -(-sum(counts[:last + 1]) // vision_batch), k
        else:
            assert mov.num_calls == sum(n > 0 for n in counts[:last + 1]), k
        if w is None:
            assert m.features is None
        else:
            torch.testing.assert_close(m.features, w, atol=1e-5, rtol=1e-5)
    model.vision_batch, model.vision_overlap = 0, False  # off: the micro-batches as given, the
    # model encodes them itself
    assert [m.features for m in encoded_ahead(model, micro, torch.device("cpu"))] == [None] * 6


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: the encoders' second stream")
@pytest.mark.parametrize("vision_batch", [0, 8])
def test_overlapped_encoding_on_a_second_stream_gives_the_same_tokens(debug_vision,
                                                                       vision_batch):
    """With ``vision_overlap`` on a GPU the encoders run on a second stream: each micro-batch's
    tokens, read (copied) on the main stream as soon as the schedule gets them, equal its own
    eager call's. A missing wait for the second stream would copy tokens still being written.
    With ``vision_batch`` 8 the calls replay CUDA graphs (sizes differ from the eager calls:
    TF32 convolutions, hence the looser tolerance)."""
    from megatron_sphinx.data.synthetic import SyntheticLoader
    from megatron_sphinx.train.step import encoded_ahead

    torch.manual_seed(0)
    mov = MixtureOfVisualExperts(debug_vision).cuda()
    model = _first_stage(mov, vision_batch, overlap=True)
    micro = SyntheticLoader(1000, 1400, 448, 2, global_batch_size=6, seed=3).next_step()
    want = [mov(m.views.cuda()) for m in micro]
    mov.cuda_graphs = bool(vision_batch)
    got = [m.features.clone() for m in encoded_ahead(model, micro, torch.device("cuda"))]
    assert model.vision_stream is not None and model.vision_stream != torch.cuda.current_stream()
    tol = dict(atol=1e-2, rtol=1e-2) if vision_batch else dict(atol=1e-5, rtol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
