"""ParallelDims: layout arithmetic and Megatron-Core 0.19's divisibility rules, no processes."""

import dataclasses

import pytest

from megatron_sphinx.parallel_dims import ParallelDims


@pytest.mark.parametrize("kwargs,dp,edp", [
    (dict(world_size=1), 1, 1),
    (dict(world_size=8, tp=2, pp=2), 2, 2),
    (dict(world_size=8, tp=2, ep=2, sequence_parallel=True), 4, 2),  # etp = tp = 2
    (dict(world_size=8, tp=2, ep=4, etp=1, sequence_parallel=True), 4, 2),
    (dict(world_size=64, tp=1, pp=4, ep=8), 16, 2),  # Mixtral guidance TP1 EP8 PP4
    (dict(world_size=4, pp=2, vpp=2), 2, 2),
])
def test_derived_sizes(kwargs, dp, edp):
    dims = ParallelDims(**kwargs)
    assert dims.dp == dp
    assert dims.expert_dp == edp
    assert dims.tp * dims.pp * dims.dp == dims.world_size
    assert dims.expert_tp * dims.ep * dims.expert_dp * dims.pp == dims.world_size


def test_frozen_and_dp_not_an_argument():
    dims = ParallelDims(world_size=4, tp=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.tp = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        ParallelDims(world_size=4, dp=2)  # type: ignore[call-arg]


def test_describe():
    assert ParallelDims(world_size=8, tp=2, pp=2, sequence_parallel=True).describe() == \
        "tp2.pp2.dp2.ep1+sp"
    assert ParallelDims(world_size=4, pp=2, vpp=3).describe() == "tp1.pp2.dp2.ep1.vpp3"


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=6, tp=4), "world size 6 is not divisible by tp\\*pp = 4\\*1 = 4"),
    (dict(world_size=8, tp=2, pp=3), "choose tp and pp whose product divides 8"),
    (dict(world_size=0), "world_size must be a positive integer"),
    (dict(world_size=2, tp=0), "tp must be a positive integer"),
    (dict(world_size=2, tp=True), "tp must be a positive integer"),
    (dict(world_size=4, ep=8), "etp\\*ep = 1\\*8 = 8 to divide dp\\*tp = 4\\*1 = 4"),
    (dict(world_size=4, tp=2, ep=2, pp=2), "choose an ep that divides 1"),
    (dict(world_size=4, vpp=2), "vpp 2 needs pipeline parallelism: set pp >= 2"),
    (dict(world_size=4, pp=2, vpp=1), "vpp must be >= 2"),
    (dict(world_size=2, sequence_parallel=True), "sequence_parallel needs tp >= 2"),
])
def test_layout_errors_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_error_messages_are_one_line():
    with pytest.raises(ValueError) as info:
        ParallelDims(world_size=6, tp=4)
    assert "\n" not in str(info.value)


TINY = dict(num_layers=22, num_heads=32, num_kv_heads=4, model_name="sphinx-tiny")


def test_model_fits():
    ParallelDims(world_size=8, tp=2).validate_model(**TINY, seq_length=4096)
    ParallelDims(world_size=8, tp=8).validate_model(**TINY)  # tp a multiple of the 4 kv heads
    ParallelDims(world_size=64, pp=4, ep=8).validate_model(
        num_layers=32, num_heads=32, num_kv_heads=8, num_experts=8, model_name="sphinx-moe")


@pytest.mark.parametrize("kwargs,model,message", [
    (dict(world_size=3, tp=3), TINY,
     "--tp 3 does not divide the 32 attention heads of sphinx-tiny: choose a tp that divides 32"),
    (dict(world_size=8, tp=8), dict(TINY, num_kv_heads=3, num_heads=24),
     "--tp 8 and the 3 key/value heads of sphinx-tiny do not divide one another"),
    (dict(world_size=4, pp=4), TINY,
     "--pp 4 does not divide the 22 layers of sphinx-tiny: choose a pp that divides 22"),
    (dict(world_size=4, pp=2, vpp=2), dict(TINY, num_layers=22),
     "pp\\*vpp = 2\\*2 does not divide the 22 layers"),
    (dict(world_size=2, ep=2), TINY, "--ep 2 but sphinx-tiny is dense"),
    (dict(world_size=8, ep=8), dict(TINY, num_experts=4),
     "--ep 8 does not divide the 4 experts"),
    (dict(world_size=2, tp=2), dict(TINY, num_experts=8), "enable sequence_parallel"),
    (dict(world_size=4, tp=4, sequence_parallel=True), dict(TINY, seq_length=4098),
     "choose a sequence length divisible by 4"),
    (dict(world_size=4, pp=2, vpp=2), dict(TINY, num_layers=24, num_microbatches=3),
     "micro-batches to be a multiple of pp 2"),
])
def test_model_errors_say_what_to_change(kwargs, model, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs).validate_model(**model)


def test_plain_pipeline_takes_any_microbatch_count():
    ParallelDims(world_size=4, pp=4).validate_model(num_layers=8, num_heads=8,
                                                    num_microbatches=3)


def test_moe_with_tp_under_sequence_parallel_fits():
    ParallelDims(world_size=4, tp=2, ep=2, sequence_parallel=True).validate_model(
        num_layers=4, num_heads=4, num_kv_heads=2, num_experts=4, seq_length=64,
        model_name="debug-moe")


def test_describe_names_expert_tp():
    assert ParallelDims(world_size=8, tp=2, ep=4, etp=1, sequence_parallel=True).describe() == \
        "tp2.pp1.dp4.ep4.etp1+sp"


@pytest.mark.parametrize("kwargs,message", [
    (dict(world_size=4, etp=0), "etp must be a positive integer"),
    (dict(world_size=4, pp=2, vpp=0), "vpp must be a positive integer"),
    (dict(world_size=4, ep=-2), "ep must be a positive integer"),
    (dict(world_size=4, pp=2.0), "pp must be a positive integer"),
])
def test_optional_sizes_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_model_parallel_size_is_one_model_copy():
    dims = ParallelDims(world_size=16, tp=2, pp=4)
    assert dims.model_parallel_size == 8
    assert dims.model_parallel_size * dims.dp == dims.world_size
