"""Initialise SPHINX-X training from a Hugging Face LLM plus local vision-encoder weights.

    python tools/convert_from_hf.py --hf HF_DIR --recipe NAME --out CKPT_DIR \\
        [--tp N --pp N --ep N] [--clip-convnext PATH] [--dinov2 PATH] [--random-encoders] \\
        [--dtype auto|bf16|fp32] [--seed N] [--overwrite]

``--hf`` is a local LLaMA-2 / TinyLlama / Mixtral / InternLM2 (packed ``wqkv``) checkpoint
directory (safetensors or ``.bin``; no remote code runs), or a SPHINX-X directory written by
``tools/convert_to_hf.py`` (then the encoders, projector and image embeddings come from it too).
Its config must match the recipe's LLM (layers, widths, heads, groups, vocabulary, RoPE base,
norm eps, experts, top-k); otherwise one line says what differs and names the recipe that fits.
Encoder weights: ``--clip-convnext`` (open_clip ConvNeXt-XXL ``visual.trunk.*`` or timm file)
and ``--dinov2`` (timm or the original DINOv2 release), read by
:meth:`megatron_sphinx.model.vision.FrozenEncoder.load_pretrained`; without them an encoder keeps
random weights only with ``--random-encoders`` (tests, debug recipes). The projector and the
start/end/skip embeddings start from the recipe's seeded random init (``--seed``).

The result is a weights-only checkpoint (``meta.json`` ``has_optimizer: false``, step 0) that

    python -m megatron_sphinx.train --recipe NAME --load CKPT_DIR --tp N --pp N --ep N

starts from. Megatron dist checkpoints are layout-agnostic, so the conversion itself runs in one
CPU process at TP1/PP1/EP1 and the training run reshards on load; ``--tp/--pp/--ep`` are only
validated against the model (``ParallelDims.validate_model``) and recorded in
``CKPT_DIR/conversion.json`` with the command to run. The output appears only when complete.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert_to_hf import (ConversionError, build_tp1_model, check_output_dir,  # noqa: E402
                           set_default_mode, single_process_world, torch_dtype)

log = logging.getLogger("convert_from_hf")

#: LLMConfig fields that must agree between the HF checkpoint and the recipe.
MATCHED_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "vocab_size", "rope_base", "norm_eps", "num_experts",
                  "moe_router_topk")
#: Encoder ``kind`` -> the command-line flag giving its weights.
ENCODER_FLAGS = {"convnext": "clip_convnext", "vit": "dinov2"}


def llm_mismatches(recipe_llm, hf_llm) -> list[str]:
    """``field HF != recipe`` for every architecture field that differs."""
    out = []
    for name in MATCHED_FIELDS:
        a, b = getattr(hf_llm, name), getattr(recipe_llm, name)
        same = (a == b if not isinstance(a, float) or not isinstance(b, float)
                else math.isclose(a, b, rel_tol=1e-6))
        if not same:
            out.append(f"{name} {a} (HF) != {b} (recipe)")
    return out


def check_llm_matches(recipe, hf_llm, hf_dir: str) -> None:
    """Raises :class:`ConversionError` (one line) unless the HF LLM is the recipe's LLM."""
    from megatron_sphinx.config import RECIPES

    diffs = llm_mismatches(recipe.llm, hf_llm)
    if not diffs:
        return
    fits = [name for name, fn in RECIPES.items() if not llm_mismatches(fn().llm, hf_llm)]
    hint = (f"use --recipe {' or '.join(fits)}" if fits
            else "pass the recipe's base LLM checkpoint")
    raise ConversionError(f"{hf_dir} does not match recipe {recipe.name} "
                          f"({recipe.llm.name}): {'; '.join(diffs)}: {hint}")


def read_source(hf_dir: str) -> dict:
    """Reads ``--hf``: ``{"kind", "config", "llm_dir"}`` (kind ``llm`` or ``sphinx_x``).

    Raises:
        ConversionError: Not a directory, no config, an unsupported architecture.
    """
    from megatron_sphinx.model.hf_io import CheckpointError, read_hf_config

    path = Path(hf_dir)
    cfg_file = path / "config.json"
    raw = None
    if cfg_file.is_file():
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{cfg_file} is not valid JSON ({exc})") from None
    if raw is not None and raw.get("model_type") == "sphinx_x":
        from megatron_sphinx.model.hf_sphinx import LANGUAGE_MODEL_FOLDER, MULTIMODAL_WEIGHTS

        llm_dir = path / raw.get("language_model_folder", LANGUAGE_MODEL_FOLDER)
        if not (path / MULTIMODAL_WEIGHTS).is_file():
            raise ConversionError(f"{path} is a SPHINX-X directory without {MULTIMODAL_WEIGHTS}")
        kind = "sphinx_x"
    else:
        llm_dir, kind = path, "llm"
    try:
        config = read_hf_config(llm_dir)
    except CheckpointError as exc:
        raise ConversionError(f"--hf: {exc}") from None
    return {"kind": kind, "config": config, "llm_dir": llm_dir, "sphinx": raw}


def check_sphinx_vision(recipe, sphinx_config: dict, hf_dir: str) -> None:
    """A SPHINX-X source must have the recipe's image layout and encoders."""
    from megatron_sphinx.model.hf_sphinx import vision_to_dict

    ours, theirs = vision_to_dict(recipe.vision), sphinx_config.get("vision") or {}
    for key in ("image_size", "grid", "view_size", "tokens_per_view"):
        if ours.get(key) != theirs.get(key):
            raise ConversionError(f"{hf_dir}: vision {key} {theirs.get(key)} != recipe "
                                  f"{recipe.name}'s {ours.get(key)}: choose the matching recipe")
    enc = [(e["timm_name"], e["channels"]) for e in theirs.get("encoders", [])]
    want = [(e["timm_name"], e["channels"]) for e in ours["encoders"]]
    if enc != want:
        raise ConversionError(f"{hf_dir}: encoders {enc} != recipe {recipe.name}'s {want}")


def encoder_plan(recipe, args, from_sphinx: bool) -> list[str | None]:
    """Per encoder of the recipe: the weights file to load, or None (keep what it has).

    Raises:
        ConversionError: A missing file, or an encoder without weights and no --random-encoders.
    """
    plan: list[str | None] = []
    for enc in recipe.vision.encoders:
        flag = ENCODER_FLAGS[enc.kind]
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            what = "is a directory" if Path(path).is_dir() else "does not exist"
            raise ConversionError(f"--{flag.replace('_', '-')} {path} {what}: pass the "
                                  "encoder's weights file (.safetensors / .bin / .pt)")
        covered = path is not None or enc.weights is not None or from_sphinx
        if not covered and not args.random_encoders:
            raise ConversionError(
                f"no weights for encoder {enc.timm_name}: pass --{flag.replace('_', '-')} PATH "
                "(local file), or --random-encoders to keep random weights")
        plan.append(path)
    return plan


def auto_dtype(hf_config: dict) -> str:
    """``--dtype auto``: bf16 / fp32 as stored; anything else (fp16) converts exactly to fp32."""
    stored = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if stored in ("bfloat16", "float32"):
        return stored
    log.info("HF dtype %s: the checkpoint is written in float32 (exact); pass --dtype to "
             "choose", stored)
    return "float32"


def convert(args: argparse.Namespace) -> Path:
    """Writes the weights-only checkpoint; see the module docstring.

    Must run in a process without a torch.distributed group (it starts a world-size-1 one).
    """
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.model.hf_mapping import MappingError, llm_config_from_hf
    from megatron_sphinx.parallel_dims import ParallelDims

    recipe = get_recipe(args.recipe)
    llm = recipe.llm
    dims = ParallelDims(world_size=args.tp * args.pp * args.ep, tp=args.tp, pp=args.pp,
                        ep=args.ep, sequence_parallel=llm.is_moe and args.tp > 1)
    dims.validate_model(num_layers=llm.num_layers, num_heads=llm.num_attention_heads,
                        num_kv_heads=llm.num_query_groups, num_experts=llm.num_experts,
                        model_name=recipe.name)
    source = read_source(args.hf)
    try:
        hf_llm = llm_config_from_hf(source["config"], name=llm.name)
    except MappingError as exc:
        raise ConversionError(f"--hf {args.hf}: {exc}") from None
    check_llm_matches(recipe, hf_llm, args.hf)
    if source["kind"] == "sphinx_x":
        check_sphinx_vision(recipe, source["sphinx"], args.hf)
    plan = encoder_plan(recipe, args, source["kind"] == "sphinx_x")
    check_output_dir(args.out, args.overwrite, source=args.hf, source_flag="--hf")

    import torch

    from megatron_sphinx import cpu_compat, distributed
    from megatron_sphinx.model.hf_io import atomic_output_dir, load_hf_state
    from megatron_sphinx.model.hf_mapping import hf_to_megatron, load_megatron_state
    from megatron_sphinx.train import checkpoint as ckpt_lib
    from megatron_sphinx.train.loop import run_identity

    dtype = torch_dtype(args.dtype if args.dtype != "auto" else auto_dtype(source["config"]))
    seed = recipe.train.seed if args.seed is None else args.seed
    log.info("%s (%s) -> recipe %s in %s; layout to train: %s", args.hf, source["kind"],
             recipe.name, dtype, dims.describe())
    log.info("reading the LLM weights of %s", source["llm_dir"])
    hf_state = load_hf_state(source["llm_dir"], dtype=dtype)  # a damaged file: CheckpointError
    log.info("mapping %d tensors to Megatron names", len(hf_state))
    mcore = hf_to_megatron(hf_state, llm, "local")
    del hf_state
    multimodal = None
    if source["kind"] == "sphinx_x":
        from megatron_sphinx.model.hf_io import read_tensor_file
        from megatron_sphinx.model.hf_sphinx import MULTIMODAL_WEIGHTS

        multimodal = read_tensor_file(Path(args.hf) / MULTIMODAL_WEIGHTS)
    groups = single_process_world(seed)
    try:
        with cpu_compat.cpu_device_mode(), torch.no_grad():
            torch.manual_seed(seed)
            log.info("building recipe %s at TP1/PP1/EP1 on the CPU", recipe.name)
            model = build_tp1_model(recipe, groups, dtype, initialise=False)
            load_megatron_state(model.language_model, mcore)
            del mcore
            if multimodal is not None:
                _load_multimodal(model, multimodal, args.hf)
            for enc, path in zip(model.vision.encoders, plan):
                if path is not None:
                    log.info("reading encoder weights %s", path)
                    enc.load_pretrained(path)  # a ValueError names a damaged or foreign file
            meta = ckpt_lib.CheckpointMeta(
                step=0, recipe=recipe.name, layout={"tp": 1, "pp": 1, "ep": 1, "dp": 1},
                code_version=ckpt_lib.code_version(), consumed={}, has_optimizer=False)
            log.info("writing the checkpoint to %s", args.out)
            with atomic_output_dir(args.out, args.overwrite) as tmp:
                ckpt_lib.save_checkpoint(tmp, 0, [model], None, None, groups.collection,
                                         meta=meta, common={})
                (tmp / "run.json").write_text(json.dumps(run_identity(recipe), indent=1))
                (tmp / "conversion.json").write_text(json.dumps({
                    "source": str(Path(args.hf).resolve()), "source_kind": source["kind"],
                    "recipe": recipe.name, "dtype": str(dtype).replace("torch.", ""),
                    "seed": seed, "encoder_weights": plan,
                    "layout": {"tp": args.tp, "pp": args.pp, "ep": args.ep},
                    "train_command": (f"python -m megatron_sphinx.train --recipe {recipe.name} "
                                      f"--load {args.out} --tp {args.tp} --pp {args.pp} "
                                      f"--ep {args.ep}"),
                }, indent=1) + "\n")
    finally:
        distributed.shutdown()
    set_default_mode(args.out)
    log.info("wrote %s: start training with python -m megatron_sphinx.train --recipe %s "
             "--load %s --tp %d --pp %d --ep %d", args.out, recipe.name, args.out, args.tp,
             args.pp, args.ep)
    return Path(args.out)


def _load_multimodal(model, state: dict, hf_dir: str) -> None:
    """Copies a SPHINX-X export's encoders, projector and image embeddings into the model."""
    own = {k: v for k, v in model.state_dict().items()
           if not k.startswith("language_model.") and not k.endswith("_extra_state")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ConversionError(
            f"{hf_dir}: multimodal weights do not fit the recipe: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(bad)} with another shape (e.g. {bad[:2]})")
    for key, value in own.items():
        value.copy_(state[key])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(
        description="Write a weights-only megatron_sphinx checkpoint from a Hugging Face LLM "
                    "(or an exported SPHINX-X directory) plus local encoder weights. The "
                    "conversion runs in one CPU process at TP1/PP1/EP1: Megatron dist checkpoints "
                    "are layout-agnostic, so --tp/--pp/--ep are only validated against the model "
                    "and recorded; the training run reshards the checkpoint when it loads it.")
    p.add_argument("--hf", required=True, help="local HF checkpoint or SPHINX-X directory")
    p.add_argument("--recipe", required=True, help="recipe to train (see megatron_sphinx.config)")
    p.add_argument("--out", required=True, help="checkpoint directory to create (absent or empty)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size of the training run (default 1)")
    p.add_argument("--pp", type=int, default=1,
                   help="pipeline-parallel size of the training run (default 1)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size of the training run (default 1)")
    p.add_argument("--clip-convnext", default=None,
                   help="open_clip / timm ConvNeXt-XXL weights (.bin / .pt / .safetensors)")
    p.add_argument("--dinov2", default=None, help="timm or original DINOv2 ViT-g/14 weights")
    p.add_argument("--random-encoders", action="store_true",
                   help="allow encoders without weights to keep random init (tests, debug recipes)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="checkpoint dtype; auto: bf16 / fp32 as stored, fp16 as fp32 (exact)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the projector / image-embedding init (default: the recipe's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier conversion at --out (never the --hf source, never "
                        "a directory no conversion wrote)")
    args = p.parse_args(argv)
    for name in ("tp", "pp", "ep"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one line on stderr on bad input."""
    from megatron_sphinx.cli import setup_cpu_tool

    setup_cpu_tool()  # one CPU process (see the docstring), quiet library notices
    args = parse_args(argv)
    from megatron_sphinx.cli import fail

    try:
        convert(args)
    except (ValueError, FileNotFoundError) as exc:  # ConversionError, MappingError, CheckpointError
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
