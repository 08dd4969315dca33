"""Reading and writing Hugging Face checkpoint directories, locally and atomically.

Only local files are read (``config.json``, safetensors shards with an optional
``model.safetensors.index.json``, or legacy ``pytorch_model*.bin`` read with
``weights_only=True``); no remote code runs and the network is never used. Writes go to a
temporary sibling directory that is renamed into place when complete, so an interrupted or
failed conversion leaves nothing half-written at the output path.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_sphinx.cli import one_line
from megatron_sphinx.model.hf_mapping import ARCHITECTURES, hf_architecture_family

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json",
    "chat_template.jinja", "chat_template.json",
)
"""Files copied by :func:`copy_tokenizer_files` (never ``*.py`` remote code)."""


class CheckpointError(ValueError):
    """An HF directory cannot be read or written (the message says what to change)."""


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a supported architecture (no remote code is run).

    Raises:
        CheckpointError: Missing directory / config, or an unsupported architecture.
    """
    path = Path(hf_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: give a local HF checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.json: not an HF checkpoint directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({exc})") from None
    try:
        hf_architecture_family(config)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return config


def _weight_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """Weight files of a directory and, for sharded checkpoints, the index's weight map."""
    for index_name, single in ((SAFE_INDEX, "model.safetensors"),
                               (BIN_INDEX, "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard {missing[0]} listed in {index_name} is "
                                      f"missing ({len(missing)} of {len(shards)} shards)")
            return [path / s for s in shards], weight_map
        if (path / single).is_file():
            return [path / single], None
    raise CheckpointError(f"{path} has no model.safetensors, {SAFE_INDEX}, pytorch_model.bin "
                          f"or {BIN_INDEX}")


def read_tensor_file(file: str | os.PathLike) -> dict:
    """The tensors of one ``.safetensors`` file, or of a torch ``.bin`` / ``.pt`` (weights only).

    Raises:
        CheckpointError: The file is truncated, corrupt or not a weights file (naming it).
    """
    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist: pass an existing weights file") from None
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip errors alike
        detail = one_line(exc)[:200]
        raise CheckpointError(f"{file} cannot be read as weights ({type(exc).__name__}: "
                              f"{detail}): copy it again or pass another file") from None


def load_hf_state(hf_dir: str | os.PathLike,
                  dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a local HF checkpoint (single file or sharded with an index).

    Args:
        hf_dir: The checkpoint directory.
        dtype: Cast floating tensors to this dtype; None keeps the stored dtype.

    Raises:
        CheckpointError: No weights, a shard missing, or a tensor the index lists absent.
    """
    path = Path(hf_dir)
    files, weight_map = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in read_tensor_file(file).items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[key] = value
    if weight_map is not None:
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise CheckpointError(f"{path}: tensor {absent[0]} listed in the index is in no shard")
    logger.info("read %d tensors from %s (%d files)", len(state), path, len(files))
    return state


def load_hf_checkpoint(hf_dir: str | os.PathLike,
                       dtype: torch.dtype | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, tensors)`` of a local checkpoint of a supported architecture."""
    config = read_hf_config(hf_dir)
    return config, load_hf_state(hf_dir, dtype)


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copies the tokenizer / generation files of :data:`TOKENIZER_FILES` that exist.

    Remote-code tokenizers (``tokenization_*.py``, ``auto_map``) are not copied; a warning says
    so, since the result must load with plain ``transformers``.

    Returns:
        Names of the copied files.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if list(src.glob("tokenization_*.py")):
        logger.warning("%s has a remote-code tokenizer: its .py files are not copied; check that "
                       "tokenizer_config.json names a standard transformers tokenizer class", src)
    return copied


def _shards(state: Mapping[str, torch.Tensor],
            max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``out_dir`` only if the block succeeds.

    Args:
        out_dir: Final directory. It may not exist yet, or be empty.
        overwrite: Replace a non-empty ``out_dir`` (the old one is removed only after the new
            one is in place).

    Raises:
        CheckpointError: ``out_dir`` is a non-empty directory (without ``overwrite``) or a file.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: give a directory path for the output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty: choose a new output directory or pass "
                              "overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path) -> None:
    """Renames ``tmp`` to ``out``; a previous non-empty ``out`` is restored if that fails."""
    if not out.is_dir():
        os.rename(tmp, out)
        return
    if not any(out.iterdir()):
        out.rmdir()
        os.rename(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, trash / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash / out.name, out)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash)


def write_hf_files(out: Path, state: Mapping[str, torch.Tensor], config: Any,
                   max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes ``config.json`` and safetensors shards (+ index when more than one) into ``out``,
    with a progress bar over the shards (stderr) when there are several."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    config_dict = config if isinstance(config, Mapping) else config.to_dict()
    config_dict = dict(config_dict)
    rope = config_dict.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config_dict:
        # Readers older than transformers 5 take the base from the top level.
        config_dict["rope_theta"] = rope["rope_theta"]
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(dict(shards[0]), str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(tqdm(shards, desc=f"writing {out.name}", unit="shard",
                                   mininterval=5.0)):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(out / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_hf_checkpoint(out_dir: str | os.PathLike, state: Mapping[str, torch.Tensor],
                       config: Any, *, tokenizer_dir: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Writes a loadable HF checkpoint directory atomically.

    Args:
        out_dir: Output directory (absent or empty unless ``overwrite``).
        state: HF tensors (contiguous, not sharing storage; see ``megatron_to_hf``).
        config: ``transformers`` config or ``config.json`` dict; its ``architectures`` must be
            supported.
        tokenizer_dir: Directory whose tokenizer files are copied alongside.
        max_shard_bytes: Largest safetensors shard; more shards get an index json.
        overwrite: Replace an existing non-empty ``out_dir``.

    Returns:
        The output directory.

    Raises:
        CheckpointError: Unsupported architecture or an occupied output directory.
    """
    config_dict = config if isinstance(config, Mapping) else config.to_dict()
    try:
        hf_architecture_family(config_dict)
    except ValueError as exc:
        raise CheckpointError(f"cannot write {out_dir}: {exc}") from None
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise CheckpointError(f"tokenizer directory {tokenizer_dir} does not exist")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_hf_files(tmp, state, config_dict, max_shard_bytes)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    logger.info("wrote %d tensors to %s", len(state), out_dir)
    return Path(out_dir)


__all__ = [
    "ARCHITECTURES", "CheckpointError", "TOKENIZER_FILES", "atomic_output_dir",
    "copy_tokenizer_files", "load_hf_checkpoint", "load_hf_state", "read_hf_config",
    "read_tensor_file",
    "save_hf_checkpoint", "write_hf_files",
]
