"""Crash-safe, layout-agnostic checkpoints through Megatron's ``dist_checkpointing``.

Layout of a save directory::

    DIR/run.json            what run this directory belongs to (recipe, architecture)
    DIR/latest              name of the newest complete checkpoint (replaced atomically)
    DIR/iter_0000010/       a complete checkpoint: Megatron torch_dist shards + meta.json
    DIR/iter_0000020.tmp/   a save in progress (or a crashed one): never loaded

Reading one (:func:`start_point`, :func:`read_meta`, :func:`check_complete`) needs no
Megatron import, so the training command checks what it will load before building anything.

A save writes into ``iter_N.tmp``; only when every rank has finished does rank 0 write
``meta.json``, rename the directory to ``iter_N`` and then point ``latest`` at it. A crash at any
moment leaves ``latest`` on a complete checkpoint. Model and optimizer tensors are saved sharded
and ``fully_reshardable``, so a checkpoint loads onto any TP/PP/EP/DP layout.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_sphinx.cli import one_line

log = logging.getLogger(__name__)

OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class _NoAsyncNotice(logging.Filter):
    """megatron-core 0.19's synchronous ``torch_dist`` save runs its deprecated async path
    inside and warns "MCore's async save is deprecated" on every rank: no save here is async."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "async save is deprecated" not in record.getMessage()


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
    _NoAsyncNotice())


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked (message says what to change)."""


@dataclass
class CheckpointMeta:
    """What ``meta.json`` records about one checkpoint."""

    step: int
    """Optimizer steps completed."""
    recipe: str
    """Recipe name."""
    layout: dict
    """Parallel layout it was saved from (tp, pp, vpp, ep, dp)."""
    code_version: str
    """Git commit of the code that saved it (or ``unknown``)."""
    consumed: dict
    """Data position (the loader's state summary)."""
    has_optimizer: bool = True
    """False for weights-only checkpoints (initial weights, conversions from Hugging Face)."""


def code_version() -> str:
    """The git commit of this checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def iter_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` steps."""
    return f"iter_{step:07d}"


def list_complete(save_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``save_dir`` (with ``meta.json``), oldest first."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")
             and (p / "meta.json").exists()]
    return sorted(found, key=lambda p: p.name)


_warned_pointers: set[Path] = set()


def find_latest(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint: ``latest`` if it names one, else the highest step."""
    d = Path(save_dir)
    pointer = d / "latest"
    if pointer.is_file():
        target = d / pointer.read_text().strip()
        if (target / "meta.json").exists():
            return target
        if pointer.resolve() not in _warned_pointers:  # once per process, however often asked
            _warned_pointers.add(pointer.resolve())
            log.warning("%s names an incomplete checkpoint; scanning %s", pointer, d)
    done = list_complete(d)
    return done[-1] if done else None


def read_meta(ckpt: str | Path) -> CheckpointMeta:
    """Reads a checkpoint's ``meta.json``.

    Raises:
        CheckpointError: If ``ckpt`` is not a checkpoint folder or its ``meta.json`` is damaged.
    """
    path = Path(ckpt) / "meta.json"
    if not path.exists():
        raise CheckpointError(f"{ckpt} is not a megatron_sphinx checkpoint (no meta.json): "
                              "pass a save directory or one of its iter_* folders")
    try:
        return CheckpointMeta(**json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as exc:
        detail = one_line(exc)
        raise CheckpointError(f"{path} is unreadable ({detail}): restore it from a copy or use "
                              "another checkpoint") from None


def resolve_load(path: str | Path) -> Path:
    """A ``--load`` argument (save directory or checkpoint folder) -> checkpoint folder.

    Raises:
        CheckpointError: If nothing loadable is there.
    """
    p = Path(path)
    if (p / "meta.json").exists():
        return p
    if not p.exists():
        raise CheckpointError(f"--load {path} does not exist: pass a directory written by "
                              "--save or one of its iter_* folders")
    latest = find_latest(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"--load {path} holds no complete checkpoint: pass a directory "
                              "written by --save (it holds iter_*/meta.json) or one of its "
                              "iter_* folders")
    return latest


def start_point(save: str | Path | None, load: str | Path | None) -> Path | None:
    """The checkpoint a run starts from: the newest in ``save`` (a resume needs no flag), else
    ``--load``'s, else None.

    Raises:
        CheckpointError: ``load`` is given (and ``save`` holds none) but nothing loadable is there.
    """
    if save:
        found = find_latest(save)
        if found is not None:
            return found
    return resolve_load(load) if load else None


def check_complete(ckpt: str | Path) -> CheckpointMeta:
    """Checks that a checkpoint folder is whole, before anything is built; returns its meta.

    ``meta.json`` must be readable, and every file the torch_dist ``.metadata`` names must be
    there and at least as long as the bytes it holds (a copy cut short, a lost shard).

    Raises:
        CheckpointError: Naming the file that is missing, truncated or unreadable.
    """
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    for name in (".metadata", "metadata.json"):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint {ckpt} has no {name}: it is not a complete "
                                  "Megatron torch_dist checkpoint: use another checkpoint")
    try:
        md = FileSystemReader(str(ckpt)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - unreadable metadata of any kind
        detail = one_line(exc)[:200]
        raise CheckpointError(f"checkpoint {ckpt}: cannot read .metadata ({detail}): use "
                              "another checkpoint") from None
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(need.items()):
        f = ckpt / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing shard {rel} (listed in "
                                  f".metadata, {len(need)} shard files in all): copy it back")
        if f.stat().st_size < end:
            raise CheckpointError(f"checkpoint {ckpt}: shard {rel} is truncated "
                                  f"({f.stat().st_size} of at least {end} bytes): copy it again")
    return meta


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _core(chunk):
    """The model inside DDP / Float16Module wrappers (checkpoint keys carry no wrapper prefix)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _chunk_names(model_chunks) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _sharded_state(model_chunks, optimizer, pgs, *, is_loading: bool, with_optimizer: bool,
                   with_rng: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # Megatron's naming: "model", or "model0", "model1", ... for interleaved chunks. Tensors are
    # keyed by their global names (a chunk's layers by their global layer number), so the
    # nesting does not tie a checkpoint to a layout.
    state = {name: _core(chunk).sharded_state_dict()
             for name, chunk in zip(_chunk_names(model_chunks), model_chunks)}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading,
                                                          metadata=OPT_METADATA)
    if with_rng:
        # One RNG state per (pp, tp, ep) coordinate; its expert-data-parallel replicas match.
        state["rng"] = ShardedObject(
            "rng_state", None if is_loading else _rng_state(),
            (pgs.pp.size(), pgs.tp.size(), pgs.ep.size()),
            (pgs.pp.rank(), pgs.tp.rank(), pgs.ep.rank()), replica_id=pgs.expt_dp.rank())
    return state


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def save_checkpoint(save_dir: str | Path, step: int, model_chunks, optimizer, scheduler, pgs,
                    *, meta: CheckpointMeta, common: dict, keep_last: int = 0) -> Path:
    """Saves a complete checkpoint after ``step`` steps; all ranks call this.

    Args:
        save_dir: The run's save directory.
        step: Steps completed.
        model_chunks: DDP-wrapped model chunks.
        optimizer: Megatron optimizer.
        scheduler: LR scheduler (its state goes into the common state).
        pgs: Process groups (for RNG sharding).
        meta: What ``meta.json`` will record.
        common: Picklable state identical on all ranks (e.g. the loader's state).
        keep_last: Keep only this many complete checkpoints (0 keeps all).

    Returns:
        The checkpoint folder.
    """
    from megatron.core import dist_checkpointing

    from megatron_sphinx.train.build import sync_params

    sync_params(model_chunks)  # overlapped parameter gather: the full weights, not stale shards
    d = Path(save_dir)
    final = d / iter_name(step)
    tmp = d / (iter_name(step) + ".tmp")
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    with_opt = meta.has_optimizer
    state = _sharded_state(model_chunks, optimizer, pgs, is_loading=False,
                           with_optimizer=with_opt, with_rng=with_opt)
    state["state"] = {"step": step, "common": common,
                      "scheduler": scheduler.state_dict() if with_opt else None}
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if rank0:
        (tmp / "meta.json").write_text(json.dumps(meta.__dict__, indent=1))
        if final.exists():  # an older save of the same step: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = d / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, d / "latest")
        if keep_last > 0:
            for old in list_complete(d)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    _barrier()
    return final


def load_checkpoint(ckpt: str | Path, model_chunks, optimizer, scheduler, pgs, *,
                    weights_only: bool = False) -> dict:
    """Loads a checkpoint onto this run's layout; returns its common state.

    Model weights always load (Megatron reshards them onto any TP/PP/EP/DP layout). Optimizer
    and scheduler state load when the checkpoint has them and ``weights_only`` is False
    (weights-only checkpoints start a fresh optimizer at step 0; ``weights_only`` keeps the
    checkpoint's step). RNG states load only onto the layout they were saved from.
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    same_layout = meta.layout.get("tp") == pgs.tp.size() and meta.layout.get(
        "pp") == pgs.pp.size() and meta.layout.get("ep") == pgs.ep.size()
    with_optimizer = meta.has_optimizer and not weights_only
    state = _sharded_state(model_chunks, optimizer, pgs, is_loading=True,
                           with_optimizer=with_optimizer, with_rng=with_optimizer and same_layout)
    loaded = dist_checkpointing.load(state, str(ckpt))
    common = dist_checkpointing.load_common_state_dict(str(ckpt))["state"]
    for name, chunk in zip(_chunk_names(model_chunks), model_chunks):
        _core(chunk).load_state_dict(loaded[name], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if "rng" in loaded:
            _set_rng_state(loaded["rng"])
    elif not meta.has_optimizer:
        common = dict(common, step=0)
    return common
