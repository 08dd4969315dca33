"""Export a megatron_sphinx checkpoint (any TP/PP/EP layout) as Hugging Face models.

    python tools/convert_to_hf.py --load CKPT_DIR --out HF_DIR [--tokenizer DIR] \\
        [--dtype auto|bf16|fp32] [--overwrite] [--max-shard-gb 5]

``--load`` is a save directory (its newest complete checkpoint is used) or one ``iter_*`` folder.
The checkpoint is read in ONE process at TP1/PP1/EP1 on the CPU: Megatron's dist checkpoints
are layout-agnostic, so ``dist_checkpointing`` reshards any saved layout (experts gathered
across EP ranks, TP shards concatenated, pipeline stages joined) into the world-size-1 model of
the recipe named in ``meta.json``. Only model weights are read (optimizer state is ignored).
Memory: about twice the model size in the export dtype.

Output (see :mod:`megatron_sphinx.model.hf_sphinx`)::

    HF_DIR/config.json, multimodal.safetensors, tokenizer files   SPHINX-X (model_type sphinx_x)
    HF_DIR/language_model/                                        plain LlamaForCausalLM or
                                                                  MixtralForCausalLM + tokenizer

``HF_DIR/language_model`` loads with ``transformers`` alone; the whole model loads with
``SphinxXForConditionalGeneration.from_pretrained(HF_DIR)`` after
``import megatron_sphinx.model.hf_sphinx``. The output appears only when complete (written to a
temporary sibling, then renamed); bad input ends with one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("convert_to_hf")

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


class ConversionError(ValueError):
    """Input that cannot be converted (the message says what to change)."""


# ------------------------------------------------------------------- shared with convert_from_hf


def torch_dtype(name: str):
    """``bf16`` / ``fp32`` (or a torch dtype name) -> ``torch.dtype``."""
    import torch

    return getattr(torch, DTYPES.get(name, name))


def check_output_dir(out: str | Path, overwrite: bool, source: str | Path | None = None,
                     source_flag: str = "--load") -> None:
    """Refuses an output directory that would lose data, before any work is done.

    ``out`` must be absent, empty, or (with ``overwrite``) an earlier output of a converter
    (it holds ``conversion.json``); it may not be the source nor hold it, and it must be
    writable.

    Raises:
        ConversionError: Saying what to change.
    """
    from megatron_sphinx.cli import check_output_dir as check_writable_dir
    from megatron_sphinx.cli import same_or_inside

    p = Path(out)
    try:
        check_writable_dir(p, "--out")
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    if source is not None and Path(source).exists() and same_or_inside(source, p):
        raise ConversionError(f"--out {out} is or holds the {source_flag} source {source}: "
                              "choose another --out (the source would be replaced)")
    if p.is_dir() and any(p.iterdir()):
        if not overwrite:
            raise ConversionError(f"--out {out} is not empty: choose a new directory or pass "
                                  "--overwrite")
        if not (p / "conversion.json").is_file():
            raise ConversionError(f"--out {out} holds files that no conversion wrote (no "
                                  "conversion.json): --overwrite replaces only an earlier "
                                  "conversion; choose a new directory")


def check_shards(ckpt: Path) -> None:
    """Checks that every file a torch_dist checkpoint's ``.metadata`` names is there and whole.

    Raises:
        ConversionError: Naming the first missing or truncated shard file.
    """
    from megatron_sphinx.train.checkpoint import check_complete

    try:
        check_complete(ckpt)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def set_default_mode(path: str | Path) -> None:
    """Gives a committed output directory the umask's permissions (``mkdtemp`` makes it 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def stored_dtype(ckpt: Path, key: str = "language_model.embedding.word_embeddings.weight"):
    """The dtype a torch_dist checkpoint stored ``key`` in (None when absent)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    entry = md.state_dict_metadata.get(key)
    return getattr(getattr(entry, "properties", None), "dtype", None)


def single_process_world(seed: int = 1234):
    """Starts a world-size-1 gloo process group (CPU) for Megatron; returns its ProcessGroups.

    The launcher's variables are ignored (a conversion is one process even inside an srun step).
    """
    from megatron_sphinx.distributed import free_port, init_distributed
    from megatron_sphinx.parallel_dims import ParallelDims

    environ = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return init_distributed(ParallelDims(world_size=1), timeout_s=1800, seed=seed,
                            environ=environ)


def build_tp1_model(cfg, groups, dtype, initialise: bool):
    """The whole SPHINX-X model of recipe ``cfg`` at TP1/PP1/EP1 on the CPU (local spec).

    Args:
        cfg: The recipe.
        groups: From :func:`single_process_world`.
        dtype: Parameter dtype of the LLM, projector and image embeddings.
        initialise: Run Megatron's random init (False when every weight is loaded afterwards).
    """
    from megatron_sphinx.model.llm import ParallelSizes, transformer_config
    from megatron_sphinx.model.sphinx import SphinxModel

    tcfg = transformer_config(cfg.llm, ParallelSizes(), dtype=dtype, on_gpu=False)
    if not initialise:
        tcfg = dataclasses.replace(tcfg, perform_initialization=False)
    return SphinxModel(cfg, tcfg, "local", pre_process=True, post_process=True,
                       pg_collection=groups.collection).eval()


def tokenizer_ids(tokenizer_dir: str | None) -> dict:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` of a local tokenizer (or {})."""
    if tokenizer_dir is None:
        return {}
    from megatron_sphinx.data.tokenizer import TokenizerNotFound, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_dir)
    except TokenizerNotFound as exc:
        raise ConversionError(str(exc)) from None
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}


# ---------------------------------------------------------------------------------- export


def load_model_weights(model, ckpt: Path) -> None:
    """Reads the model part of a checkpoint into a TP1 model (Megatron reshards on load)."""
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt))
        model.load_state_dict(loaded["model"], strict=True)
    except Exception as exc:  # noqa: BLE001 - Megatron raises many kinds; one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot load the model weights of {ckpt} into recipe "
                              f"{model.cfg.name}: {first[:300]}") from exc


def export_states(model, out_dtype) -> tuple[dict, dict]:
    """``(HF LLM tensors, multimodal tensors)`` of a loaded TP1 model, cast to ``out_dtype``."""
    from megatron_sphinx.model.hf_mapping import megatron_to_hf

    state = model.state_dict()
    llm = megatron_to_hf(state, model.cfg.llm, prefix="language_model.")
    multimodal = {k: v.detach().clone().contiguous() for k, v in state.items()
                  if not k.startswith("language_model.") and not k.endswith("_extra_state")}
    cast = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in llm.items()}
    mm = {k: v.to(out_dtype) if v.is_floating_point() else v for k, v in multimodal.items()}
    return cast, mm


def write_hf_dir(tmp: Path, cfg, llm_state: dict, mm_state: dict, out_dtype, *,
                 tokenizer_dir: str | None, token_ids: dict, max_shard_bytes: int,
                 provenance: dict) -> None:
    """Writes the SPHINX-X directory layout into ``tmp`` (an empty directory)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from megatron_sphinx.model.hf_io import copy_tokenizer_files, write_hf_files
    from megatron_sphinx.model.hf_mapping import hf_config_from_llm
    from megatron_sphinx.model.hf_sphinx import (LANGUAGE_MODEL_FOLDER, MULTIMODAL_WEIGHTS,
                                                 SphinxXConfig, vision_to_dict)

    hf_config = hf_config_from_llm(cfg.llm, dtype=out_dtype, **token_ids)
    lm_dir = tmp / LANGUAGE_MODEL_FOLDER
    lm_dir.mkdir()
    write_hf_files(lm_dir, llm_state, hf_config, max_shard_bytes)
    copied: list[str] = []
    if tokenizer_dir is not None:
        copied = copy_tokenizer_files(tokenizer_dir, lm_dir)
        copy_tokenizer_files(tokenizer_dir, tmp)
    if "generation_config.json" not in copied:
        GenerationConfig(**token_ids).save_pretrained(lm_dir)
    sx = SphinxXConfig(text_config=hf_config.to_dict(), vision=vision_to_dict(cfg.vision),
                       recipe=cfg.name, architectures=["SphinxXForConditionalGeneration"],
                       dtype=out_dtype, **token_ids)
    sx.save_pretrained(tmp)
    save_file(mm_state, str(tmp / MULTIMODAL_WEIGHTS), metadata={"format": "pt"})
    (tmp / "conversion.json").write_text(json.dumps(provenance, indent=1) + "\n")


def locate_checkpoint(load: str | Path) -> Path:
    """The checkpoint folder of ``--load`` (a folder with ``meta.json`` or a save directory).

    Resolved without importing Megatron (bad input fails fast), as training resolves it: the
    folder itself, else the one ``latest`` names, else the newest complete ``iter_*``.

    Raises:
        ConversionError: Nothing loadable there.
    """
    from megatron_sphinx.train.checkpoint import resolve_load

    try:
        return resolve_load(load)
    except ValueError as exc:  # CheckpointError
        raise ConversionError(str(exc)) from None


def convert(load: str, out: str, *, tokenizer: str | None = None, dtype: str = "auto",
            overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Exports the checkpoint at ``load`` to ``out``; see the module docstring.

    Must run in a process without a torch.distributed group (it starts a world-size-1 one).

    Raises:
        ConversionError: Unknown recipe, missing shard, occupied output, missing tokenizer...
    """
    from megatron_sphinx.cli import check_input_dir
    from megatron_sphinx.config import get_recipe
    from megatron_sphinx.train.checkpoint import read_meta

    if max_shard_bytes <= 0:
        raise ConversionError("--max-shard-gb must be positive: give the largest shard size "
                              "in GiB (default 5)")
    ckpt = locate_checkpoint(load)
    try:
        meta = read_meta(ckpt)
    except ValueError as exc:  # CheckpointError
        raise ConversionError(str(exc)) from None
    recipe = meta.recipe
    try:
        cfg = get_recipe(recipe)
    except ValueError as exc:
        raise ConversionError(f"{ckpt}/meta.json: {exc}") from None
    check_output_dir(out, overwrite, source=ckpt)
    if tokenizer is not None:
        try:
            check_input_dir(tokenizer, "--tokenizer", "Hugging Face tokenizer directory")
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
    check_shards(ckpt)
    token_ids = tokenizer_ids(tokenizer)
    if tokenizer is None:
        log.warning("no --tokenizer: the export has no tokenizer files (generate() will need "
                    "one passed in)")

    import torch

    from megatron_sphinx import cpu_compat, distributed
    from megatron_sphinx.model.hf_io import atomic_output_dir

    saved = stored_dtype(ckpt)
    out_dtype = (saved or torch.float32) if dtype == "auto" else torch_dtype(dtype)
    log.info("checkpoint %s: recipe %s, step %d, saved at layout %s, stored %s -> export %s",
             ckpt, cfg.name, meta.step, meta.layout, saved, out_dtype)
    groups = single_process_world(cfg.train.seed)
    try:
        with cpu_compat.cpu_device_mode(), torch.no_grad():
            model = build_tp1_model(cfg, groups, out_dtype, initialise=False)
            log.info("reading the checkpoint's weights (resharded to one process)")
            load_model_weights(model, ckpt)
            log.info("mapping %d tensors to Hugging Face names", len(model.state_dict()))
            llm_state, mm_state = export_states(model, out_dtype)
            del model
    finally:
        distributed.shutdown()
    provenance = {"source": str(Path(ckpt).resolve()), "recipe": cfg.name, "step": meta.step,
                  "saved_layout": meta.layout, "code_version": meta.code_version,
                  "dtype": str(out_dtype).replace("torch.", "")}
    with atomic_output_dir(out, overwrite) as tmp:
        write_hf_dir(tmp, cfg, llm_state, mm_state, out_dtype, tokenizer_dir=tokenizer,
                     token_ids=token_ids, max_shard_bytes=max_shard_bytes, provenance=provenance)
    set_default_mode(out)
    log.info("wrote %s (%d LLM tensors in language_model/, %d multimodal tensors)", out,
             len(llm_state), len(mm_state))
    return Path(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from megatron_sphinx.cli import ArgumentParser

    p = ArgumentParser(
        description="Export a megatron_sphinx checkpoint (any TP/PP/EP layout) as a Hugging Face "
                    "SPHINX-X model with a plain transformers LLM in OUT/language_model. Runs in "
                    "one CPU process: Megatron reshards the checkpoint to TP1/PP1/EP1 on load.")
    p.add_argument("--load", required=True,
                   help="save directory (newest complete checkpoint) or an iter_* folder")
    p.add_argument("--out", required=True, help="output directory (absent or empty)")
    p.add_argument("--tokenizer", default=None,
                   help="local HF tokenizer directory to ship with the model (recommended)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="export dtype; auto = the dtype the checkpoint stored")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="largest safetensors shard of the LLM, GiB (default 5)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export at --out (only once the new export is "
                        "complete); a directory no conversion wrote is never replaced")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one line on stderr on bad input."""
    from megatron_sphinx.cli import setup_cpu_tool

    setup_cpu_tool()  # one CPU process (see the docstring), quiet library notices
    args = parse_args(argv)
    from megatron_sphinx.cli import fail

    if not 0 < args.max_shard_gb < float("inf"):
        return fail(f"--max-shard-gb {args.max_shard_gb}: give a positive size in GiB")
    try:
        convert(args.load, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                overwrite=args.overwrite, max_shard_bytes=max(1, int(args.max_shard_gb * 2**30)))
    except (ValueError, FileNotFoundError) as exc:  # ConversionError, hf_io.CheckpointError
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
