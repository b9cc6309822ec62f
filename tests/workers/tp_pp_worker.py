"""torchrun worker for the TP/PP equivalence and conversion tests (tests/test_parallel_equivalence.py).

    reference (1 process, TP1 PP1): init weights from a seed, save them, run one forward/backward over
        4 micro-batches of a fixed batch, save the loss and the gradients (as a dist checkpoint).
    parallel  (4 processes, TP2 PP2): load those weights, save a training checkpoint (for conversion),
        compute the logits (forward only, gathered over TP) and the same forward/backward; save loss and
        gradients the same way.
"""

import argparse
import dataclasses
import json
from pathlib import Path


import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_nbp.checkpointing import save_checkpoint, unwrap
from megatron_nbp.config import NBPConfig
from megatron_nbp.data import pad_text_ids
from megatron_nbp.layouts import frame_prediction_batch, hybrid_batch
from megatron_nbp.parallel import destroy_parallel, initialize_parallel
from megatron_nbp.training import MaskCache, build_training_state, reduce_losses
from data_prep.synthetic import synthetic_clips


def micro_batches(cfg):
    """4 fixed micro-batches of 2 clips in the config's layout (hybrid class: class id = clip index
    mod C; hybrid text: clip i has a text of 1 + (i mod P) ids, the rest padding)."""
    m = cfg.model
    clips = torch.from_numpy(synthetic_clips(8, m.latent_shape, vocab=m.vocab_size, seed=7).reshape(8, -1).astype("int64"))
    if m.layout == "hybrid" and m.condition_type == "text":
        texts = [[(7 * i + j) % m.condition_vocab_size for j in range(1 + i % m.num_condition_tokens)]
                 for i in range(8)]
        ids, padding = pad_text_ids(texts, m.num_condition_tokens, m.condition_vocab_size)
        return [hybrid_batch(clips[i:i + 2], ids[i:i + 2], m.block_size, m.condition_vocab_size,
                             padding[i:i + 2], m.latent_shape, m.block_shape) for i in range(0, 8, 2)]
    if m.layout == "hybrid":
        labels = (torch.arange(8) % m.condition_vocab_size).view(8, 1)
        return [hybrid_batch(clips[i:i + 2], labels[i:i + 2], m.block_size, m.condition_vocab_size,
                             latent_shape=m.latent_shape, block_shape=m.block_shape) for i in range(0, 8, 2)]
    return [frame_prediction_batch(clips[i:i + 2], m.block_size, m.latent_shape, m.block_shape) for i in range(0, 8, 2)]


def model_positions(cfg, batch):
    """The position ids the model takes: (t, h, w) coordinates for rope3d, else input positions."""
    return batch.grid_position_ids if cfg.model.position_embedding_type == "rope3d" else batch.position_ids


def save_grads(model, path):
    """Save every parameter's main_grad (fp32, whatever the weights' precision) in megatron's sharded key
    space: each ShardedTensor of the model's sharded state dict with its parameter's gradient as data."""
    grads = {p.data_ptr(): p.main_grad for p in unwrap(model).parameters()}
    state = {}
    for key, item in unwrap(model).sharded_state_dict().items():
        if isinstance(item, ShardedTensor) and item.data.data_ptr() in grads:
            grad = grads[item.data.data_ptr()].detach().float().view(item.data.shape)
            item = dataclasses.replace(item, data=grad, dtype=grad.dtype)
        state[key] = item
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(path))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["reference", "parallel"], required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="parallel mode: train in this precision (the reference is always fp32); bf16 writes "
                             "only the loss and gradients, as {mode}_bf16_*")
    args = parser.parse_args()
    work = Path(args.workdir)
    tp = pp = 1 if args.mode == "reference" else 2
    cfg = NBPConfig.from_yaml(args.config, {"parallel.tensor_model_parallel_size": tp,
                                            "parallel.pipeline_model_parallel_size": pp,
                                            "train.precision": args.precision})
    tag = args.mode if args.precision == "fp32" else f"{args.mode}_{args.precision}"
    initialize_parallel(tp, pp, seed=cfg.train.seed)
    state = build_training_state(cfg)
    model = state.model
    weights = work / "ref_weights"
    if args.mode == "reference":
        weights.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(weights))
    else:
        loaded = dist_checkpointing.load(unwrap(model).sharded_state_dict(), str(weights))
        unwrap(model).load_state_dict(loaded)
        state.optimizer.reload_model_params()  # mixed precision: fp32 main params from the loaded weights
    if args.mode == "parallel" and args.precision == "fp32":
        save_checkpoint(work / "ckpt", 1, model, state.optimizer, state.scheduler, 0, cfg.to_dict()["model"])
        # forward-only logits, gathered across tensor-parallel ranks on the last stage
        masks = MaskCache(cfg.model.attention_backend)

        def logits_step(data_iterator, model):
            batch = next(data_iterator)
            out = model(batch.tokens, model_positions(cfg, batch), masks(batch.block_ids, batch.key_padding))
            return out, lambda out, non_loss_data=True: tensor_parallel.gather_from_tensor_model_parallel_region(out)
        logits = get_forward_backward_func()(
            forward_step_func=logits_step, data_iterator=iter(micro_batches(cfg)), model=[model],
            num_microbatches=4, seq_length=cfg.model.seq_length, micro_batch_size=2,
            forward_only=True, collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(torch.cat(logits), work / "parallel_logits.pt")
    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=state.forward_step, data_iterator=iter(micro_batches(cfg)), model=[model],
        num_microbatches=4, seq_length=cfg.model.seq_length, micro_batch_size=2, forward_only=False)
    loss = reduce_losses(losses)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        (work / f"{tag}_loss.json").write_text(json.dumps({"loss": loss}))
    save_grads(model, work / f"{tag}_grads")
    dist.barrier()
    destroy_parallel()


if __name__ == "__main__":
    main()
