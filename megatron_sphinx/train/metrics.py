"""Per-step metrics: one JSON line per step in ``DIR/metrics.jsonl`` and a readable console line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("megatron_sphinx.train")


class MetricsWriter:
    """Appends step records to ``metrics.jsonl`` (rank 0 only) and logs a console line."""

    def __init__(self, save_dir: str | Path | None, enabled: bool):
        self.enabled = enabled
        self.path = Path(save_dir) / "metrics.jsonl" if save_dir else None
        if enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict, console: bool = True) -> None:
        """Appends one step's record; also logs it when ``console`` (an evaluation result, if
        the record has one, is always logged)."""
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
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
