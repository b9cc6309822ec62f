"""Validation loss during training (Megatron-LM's ``--eval-interval`` / ``--eval-iters``) on a folder of
held-out token shards (``--valid-data``, its manifest checked against the model like ``--data``).

Every evaluation reads the same samples: the first ``eval_iters x global_batch_size`` of the validation
stream (:class:`megatron_nbp.data.TokenClipStream` from its start, its shards in the order the run's seed
gives, no shuffle buffer, read as by a single rank), and position p of those goes to data-parallel rank
``p % DP``, so the set evaluated does not depend on the layout (validation losses of runs on different
TP / PP / DP layouts are comparable). Each rank reads those samples once, at the first evaluation (the
validation set is small: ``eval_iters`` batches), and keeps its share of the clips (not the
micro-batches) in memory. No condition is
dropped (``p_drop_cond`` 0) and no input token corrupted (the model is in eval mode).

The loss is the token-weighted mean NBP cross entropy (nats per video token) over all those samples,
reduced over the data-parallel ranks as the training loss is (the backend's
:meth:`~megatron_nbp.training.backend.TrainingBackend.evaluate`); perplexity is ``exp(loss)`` (capped at
``exp(20)`` as Megatron-LM does). Logged by :meth:`megatron_nbp.training_log.TrainingLogger.log_validation`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from megatron.core import parallel_state

from megatron_nbp.config import NBPConfig
from megatron_nbp.data import TokenClipStream, condition_key, micro_batches
from megatron_nbp.training.backend import TrainingBackend

__all__ = ["Validation", "validation_perplexity", "validation_stream"]

#: Megatron-LM caps the logged perplexity at exp(20)
MAX_LOG_LOSS = 20.0


def validation_perplexity(loss: float) -> float:
    """``exp(min(loss, 20))``, Megatron-LM's perplexity of a mean loss in nats."""
    return math.exp(min(loss, MAX_LOG_LOSS))


def validation_stream(cfg: NBPConfig) -> TokenClipStream:
    """The whole validation stream of ``cfg.valid_data`` (as one rank reads it): from its start, shards
    in the order of ``cfg.train.seed``, no shuffle buffer (module doc).

    Raises:
        DataError: shards that do not fit the model, or no readable sample.
    """
    m = cfg.model
    return TokenClipStream(cfg.valid_data, 0, 1, cfg.train.seed, m.latent_shape, m.vocab_size,
                           shuffle_buffer=1, consumed=0, condition_key=condition_key(m))


class Validation:
    """The validation loss of a training run (module doc).

    Args:
        cfg: the run's config (``valid_data``, ``train.eval_interval`` / ``eval_iters``, batch sizes).
        num_microbatches: micro-batches per iteration on each data-parallel rank (global batch / (micro
            batch x DP)); an evaluation runs ``eval_iters`` times as many.
    """

    def __init__(self, cfg: NBPConfig, num_microbatches: int) -> None:
        self.cfg = cfg
        self.num_microbatches = cfg.train.eval_iters * num_microbatches
        self._samples: list[tuple[np.ndarray, object]] | None = None

    @classmethod
    def from_config(cls, cfg: NBPConfig, num_microbatches: int) -> "Validation | None":
        """The run's validation, or None without ``--valid-data``."""
        return cls(cfg, num_microbatches) if cfg.valid_data else None

    def due(self, iteration: int) -> bool:
        """True after every ``eval_interval``-th iteration and after the last one."""
        t = self.cfg.train
        return iteration == t.train_iters or bool(t.eval_interval and iteration % t.eval_interval == 0)

    def samples(self) -> list[tuple[np.ndarray, object]]:
        """This rank's share of the validation samples, (int64 [N] video tokens, condition) each, read at
        the first call (parallel_state must be initialised)."""
        if self._samples is None:
            dp_rank = parallel_state.get_data_parallel_rank()
            dp_size = parallel_state.get_data_parallel_world_size()
            count = self.num_microbatches * self.cfg.train.micro_batch_size  # this rank's share
            first = itertools.islice(iter(validation_stream(self.cfg)), count * dp_size)
            self._samples = [sample for p, sample in enumerate(first) if p % dp_size == dp_rank]
        return self._samples

    def run(self, backend: TrainingBackend, iteration: int, logger) -> float:
        """Evaluate the current weights and log the result (collective: every rank calls it).

        Returns:
            the validation loss (nats per video token), on every rank.
        """
        batches = micro_batches(self.samples(), self.cfg.train.micro_batch_size, self.cfg.model)
        loss_sum, tokens = backend.evaluate(batches, self.num_microbatches)
        loss = loss_sum / max(tokens, 1.0)
        logger.log_validation(iteration, loss, validation_perplexity(loss))
        return loss
