"""Per-step metrics: one JSON line per step in ``DIR/metrics.jsonl``, a readable console line and,
with ``--tensorboard-dir``, TensorBoard scalars."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("megatron_sphinx.train")


#: Record keys written to TensorBoard, under ``train/`` (``eval_*`` keys go under ``eval/``);
#: the per-source losses go to ``train/loss_by_source/NAME`` and ``eval/loss_by_source/NAME``.
TENSORBOARD_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "tflops_per_gpu",
                    "mfu", "packing_efficiency", "skipped_views", "loss_tokens", "samples",
                    "eval_loss", "eval_time_s")


class MetricsWriter:
    """Appends step records to ``metrics.jsonl`` (rank 0 only), logs a console line and, with a
    ``tensorboard_dir``, adds the numbers of :data:`TENSORBOARD_KEYS` as TensorBoard scalars.

    Args:
        save_dir: Where ``metrics.jsonl`` goes (None: no file).
        enabled: This rank writes (rank 0).
        tensorboard_dir: TensorBoard event files go there (None: none).
        first_step: The first step this run writes: the records (and TensorBoard events) of a
            stopped run from this step on are dropped, as a resume repeats the steps after its
            checkpoint. None keeps everything.
    """

    def __init__(self, save_dir: str | Path | None, enabled: bool,
                 tensorboard_dir: str | Path | None = None, first_step: int | None = None):
        self.enabled = enabled
        self.path = Path(save_dir) / "metrics.jsonl" if save_dir else None
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if first_step is not None:
                self._drop_from(first_step)
        self.tensorboard = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(tensorboard_dir), purge_step=first_step)

    def _drop_from(self, first_step: int) -> None:
        """Drops the records of steps >= ``first_step`` (a stopped run's steps after the
        checkpoint this run resumes from, which this run computes again) and a last line that
        a killed run left unfinished."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        whole = lines if not lines or lines[-1].endswith("\n") else lines[:-1]  # a torn write
        keep = [line for line in whole if _step_of(line) < first_step]
        if len(keep) == len(lines):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, self.path)
        log.info("metrics.jsonl: dropped %d records of steps from %d on, which this run repeats",
                 len(lines) - len(keep), first_step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer (safe to call twice)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _scalars(self, record: dict) -> None:
        for key in TENSORBOARD_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.tensorboard.add_scalar(tag, value, record["step"])
        for key, group in (("source_loss", "train"), ("eval_source_loss", "eval")):
            for name, value in record.get(key, {}).items():
                self.tensorboard.add_scalar(f"{group}/loss_by_source/{name}", value,
                                            record["step"])

    def write(self, record: dict, console: bool = True) -> None:
        """Appends one step's record; also logs it when ``console`` (an evaluation result, if
        the record has one, is always logged)."""
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self._scalars(record)
        if console:
            log.info(
                "step %5d/%d | loss %.4f | lr %.3e | grad_norm %s | tokens %d | %.0f tok/s | "
                "%.3f s/step | %.2f TFLOP/s/gpu", record["step"], record["total_steps"],
                record["loss"], record["lr"],
                "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
                record["tokens"],
                record["tokens_per_s"], record["step_time_s"], record.get("tflops_per_gpu", 0.0))
        if "eval_loss" in record:
            log.info("step %5d/%d | eval loss %.4f | %d tokens | %.2f s", record["step"],
                     record["total_steps"], record["eval_loss"], record["eval_loss_tokens"],
                     record["eval_time_s"])


def _step_of(line: str) -> float:
    """The step of a ``metrics.jsonl`` line (a line that is not a record counts as step 0:
    it is kept)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 0
