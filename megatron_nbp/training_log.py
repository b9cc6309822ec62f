"""Megatron-style iteration log lines and TensorBoard scalars for the training loop."""

from __future__ import annotations

import math
from datetime import datetime

from megatron_nbp.config import NBPConfig


class TrainingLogger:
    """Prints a Megatron-LM-style line every ``log_interval`` iterations and writes TensorBoard
    scalars (lm-loss, learning-rate, grad-norm, iteration-time, tokens-per-second) every iteration.

    Args:
        cfg: the run config (log interval, global batch, sequence length, tensorboard_dir).
        enabled: False on ranks that do not log (all but the last).
    """

    def __init__(self, cfg: NBPConfig, enabled: bool) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.writer = None
        self.skipped = 0
        self.nan = 0
        self._window: list[tuple[float, float]] = []
        if enabled and cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=cfg.tensorboard_dir)

    def log(self, iteration: int, loss: float, lr: float, grad_norm: float, update_ok: bool,
            seconds: float, consumed_samples: int) -> None:
        """Record one iteration (loss in nats per video token, seconds of wall time)."""
        if not self.enabled:
            return
        self.skipped += 0 if update_ok else 1
        self.nan += 1 if math.isnan(loss) or math.isinf(loss) else 0
        t = self.cfg.train
        tokens_per_s = t.global_batch_size * self.cfg.model.seq_length / max(seconds, 1e-9)
        self._window.append((loss, seconds))
        if self.writer is not None:
            for name, value in (("lm-loss", loss), ("learning-rate", lr), ("grad-norm", grad_norm),
                                ("iteration-time", seconds), ("tokens-per-second", tokens_per_s)):
                self.writer.add_scalar(name, value, iteration)
        if iteration % t.log_interval == 0 or iteration == t.train_iters:
            losses = [l for l, _ in self._window]
            ms = 1000.0 * sum(s for _, s in self._window) / len(self._window)
            self._window.clear()
            print(
                f" [{datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{t.train_iters:8d} |"
                f" consumed samples: {consumed_samples:12d} |"
                f" elapsed time per iteration (ms): {ms:.1f} |"
                f" learning rate: {lr:.6E} |"
                f" global batch size: {t.global_batch_size:5d} |"
                f" lm loss: {sum(losses) / len(losses):.6E} |"
                f" grad norm: {grad_norm:.3f} |"
                f" number of skipped iterations: {self.skipped:3d} |"
                f" number of nan iterations: {self.nan:3d} |"
                f" tokens per second: {t.global_batch_size * self.cfg.model.seq_length * 1000.0 / ms:.1f} |",
                flush=True,
            )

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()
