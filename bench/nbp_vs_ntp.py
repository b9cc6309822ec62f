#!/usr/bin/env python
"""Generation speed of NBP (block 1x1x16, L = 16) vs NTP (block 1x1x1, L = 1) at equal model size.

Two decoders of the same architecture (layers / hidden / heads / FFN / padded vocabulary; only the
learned position tables differ by L - 1 rows in the frame-prediction layout) are built from an
``ModelConfig`` with random weights: speed does not depend on the weights, but the generated
videos are noise. Both generate the same clips of 17 x 128 x 128 pixels = 5 x 16 x 16 latents, through
the project's KV-cache generation code, with the paper's sampling (top-k 16000, top-p 0.9):

* ``--layout frame_prediction`` (K600 protocol): encode the first 5 pixel frames (2 latent frames),
  generate the other 768 tokens (48 NBP vs 768 NTP forward steps), decode the 5 latent frames;
  12 new pixel frames per clip.
* ``--layout hybrid`` (UCF-101, class-conditional, 101 classes): generate all 1280 tokens from a class
  id (95 NBP vs 1280 NTP steps), decode; 17 new pixel frames per clip.

frames/s counts new pixel frames over tokenizer encode + generation + decode; tokens/s counts
generated tokens over generation alone. One warm-up run per model and decode mode, then ``--repeats``
timed runs (time.perf_counter, CUDA synchronised). The prefill line splits generation into the prefill
(frame prediction: the 512 condition tokens in one forward pass, the same work for NBP and NTP) and the
steps after it. The tokenizer (fp32) is a randomly initialised configs/tokenizer/tiny.yaml unless
``--tokenizer PATH.safetensors``.

The main table uses the default decode mode of the device (megatron_nbp.inference.static_decode:
"cuda_graph" on a GPU, "eager" on the CPU). The step table then gives, per method, the time of one step
after the prefill in every ``--decode-modes`` mode (generation only), the graph vs eager speed-up ("n/a"
without CUDA), and the sampler's share of a step: the step time with the real sampler minus that with a
sampler that returns zeros at once (no filtering, no host synchronisation), over the former, in the
default mode.

    python bench/nbp_vs_ntp.py                                     # CPU, 4 x 256 x 4, frame prediction
    python bench/nbp_vs_ntp.py --layout hybrid --repeats 1
    python bench/nbp_vs_ntp.py --config configs/model/nbp_xl.yaml --dtype bf16   # CPU, the paper's shape (~5 min)
    python bench/nbp_vs_ntp.py --config configs/model/nbp_xl.yaml --device cuda --dtype bf16 --batch-size 8 \\
        --tokenizer TOK.safetensors                                # GPU, the paper's 700M shape
    python bench/nbp_vs_ntp.py --decode-modes eager static compile # CPU, the static step eager and compiled
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

from data_prep.tokenizer import TokenizerConfig, VideoTokenizer, load_tokenizer
from megatron_nbp.config import ModelConfig
from megatron_nbp.inference.generate import generate_frame_prediction, generate_hybrid
from megatron_nbp.inference.model import NBPDecoder
from megatron_nbp.inference.sampling import SamplingConfig
from megatron_nbp.inference.static_decode import DECODE_MODES, resolve_decode_mode

LATENT = [5, 16, 16]          # 17 x 128 x 128 pixels
FRAMES, RES, COND_FRAMES, COND_LATENT = 17, 128, 5, 2
VOCAB, CLASSES = 64000, 101


# What a --config file may set here: the architecture (the layout, shapes and vocabulary are this benchmark's).
ARCHITECTURE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "layernorm_epsilon",
                "normalization", "activation", "add_bias_linear", "untie_embeddings_and_output_weights",
                "share_embeddings_and_output_weights",  # the inverse, read from older files
                "position_embedding_type", "rotary_base")


def model_config(args: argparse.Namespace, L: int) -> ModelConfig:
    """The decoder for block 1x1xL; every other field is shared by NBP and NTP."""
    shape = dict(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                 ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size)
    if args.config:
        data = yaml.safe_load(Path(args.config).read_text()) or {}
        shape.update({k: v for k, v in data.get("model", data).items() if k in ARCHITECTURE})
    if args.layout == "frame_prediction":
        return ModelConfig(**shape, vocab_size=VOCAB, latent_shape=LATENT, block_shape=[1, 1, L])
    # hybrid: ids = [L special (BOV, MBOS_1..L-1)] [101 classes] [64000 codes], padded to a multiple of 128:
    # the same vocabulary rows for L = 16 (NBP) and L = 1 (NTP).
    return ModelConfig(**shape, vocab_size=VOCAB, latent_shape=LATENT, block_shape=[1, 1, L], layout="hybrid",
                       condition_labels=[str(i) for i in range(CLASSES)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def no_sampling(logits: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A sampler that costs nothing: zeros int64 [...] for logits [..., V] (any further arguments ignored)."""
    return torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)


def run_once(args, model, tokenizer, video, device, decode_mode: str, sampler=None, tokenizer_too: bool = True) -> dict:
    """Encode (frame prediction) -> generate -> decode one batch in ``decode_mode``; returns the timings and
    step count. ``sampler`` replaces the real sampler; ``tokenizer_too=False`` times generation alone (the
    prompt still comes from the tokenizer, outside the clock)."""
    sampling = SamplingConfig(top_k=16000, top_p=0.9)
    gen = torch.Generator(device=device).manual_seed(0)
    extra = dict(decode_mode=decode_mode, **({"sampler": sampler} if sampler is not None else {}))
    B = video.shape[0]
    sync(device)
    t0 = time.perf_counter()
    if args.layout == "frame_prediction":
        prompt = tokenizer.encode(video[:, :, :COND_FRAMES]).reshape(B, -1)   # [B, 2*16*16]
        sync(device)
        t1 = time.perf_counter()
        result = generate_frame_prediction(model, prompt, sampling, gen, **extra)
        new_tokens, new_frames = result.tokens.shape[1] - prompt.shape[1], FRAMES - COND_FRAMES
    else:
        t1 = t0
        condition = torch.randint(0, CLASSES, (B, 1), generator=gen, device=device)
        result = generate_hybrid(model, condition, None, sampling, gen, **extra)
        new_tokens, new_frames = result.tokens.shape[1], FRAMES
    sync(device)
    t2 = time.perf_counter()
    if tokenizer_too:
        pixels = tokenizer.decode(result.tokens.reshape(B, *LATENT))
        assert pixels.shape[2:] == (FRAMES, RES, RES), pixels.shape
    sync(device)
    t3 = time.perf_counter()
    return dict(steps=result.steps, encode=t1 - t0, generate=t2 - t1, prefill=result.prefill_seconds,
                decode=t3 - t2, total=t3 - t0, tokens=B * new_tokens, frames=B * new_frames,
                step_ms=1000 * (result.seconds - result.prefill_seconds) / max(result.steps - 1, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["frame_prediction", "hybrid"], default="frame_prediction")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden-size", type=int, help="default 4 x hidden")
    p.add_argument("--config", help="model YAML (e.g. configs/model/nbp_xl.yaml): its shape overrides the flags")
    p.add_argument("--tokenizer", help="tokenizer .safetensors (default: random configs/tokenizer/tiny.yaml)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="transformer dtype")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--decode-modes", nargs="+", choices=DECODE_MODES,
                   help="decode modes of the step table (default: eager and cuda_graph on a GPU, eager on the CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    main_mode = resolve_decode_mode(None, device)
    modes = args.decode_modes or (["eager", "cuda_graph"] if device.type == "cuda" else ["eager"])
    for mode in modes:
        try:
            resolve_decode_mode(mode, device)             # refuses cuda_graph without CUDA, by name
        except ValueError as exc:
            p.error(str(exc))
    modes = list(dict.fromkeys([*modes, main_mode]))      # the main table's mode is measured too

    torch.manual_seed(0)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer, device=device)
    else:
        tokenizer = VideoTokenizer(TokenizerConfig.from_yaml(REPO / "configs/tokenizer/tiny.yaml")).to(device).eval()
    video = torch.rand(args.batch_size, 3, FRAMES, RES, RES, device=device) * 2 - 1

    models = {}
    for name, L in (("NBP", 16), ("NTP", 1)):
        torch.manual_seed(0)
        models[name] = (L, NBPDecoder(model_config(args, L)).to(device=device, dtype=dtype).eval())
    runs = {name: [] for name in models}
    steps = {(name, mode, free): [] for name in models for mode in modes for free in (False, True)}
    with torch.inference_mode():
        for name, (_, model) in models.items():
            for mode in modes:                  # warm-up: compiles / captures the graphs of each mode
                run_once(args, model, tokenizer, video, device, mode)
        for _ in range(args.repeats):            # interleaved, so that load drift hits both alike
            for name, (_, model) in models.items():
                runs[name].append(run_once(args, model, tokenizer, video, device, main_mode))
                steps[name, main_mode, False].append(runs[name][-1]["step_ms"])
                for mode in modes:
                    for free in (False, True):
                        if (mode, free) != (main_mode, False):
                            steps[name, mode, free].append(run_once(args, model, tokenizer, video, device, mode,
                                                                    no_sampling if free else None,
                                                                    tokenizer_too=False)["step_ms"])
    rows = []
    for name, (L, model) in models.items():
        mean = {k: sum(r[k] for r in runs[name]) / args.repeats for k in runs[name][0]}
        rows.append((name, L, sum(t.numel() for t in model.parameters()), mean))
    step_ms = {key: sum(v) / len(v) for key, v in steps.items()}

    cfg = model_config(args, 16)
    print(f"# NBP vs NTP | layout {args.layout} | model {cfg.num_layers} x {cfg.hidden_size} x "
          f"{cfg.num_attention_heads} heads (ffn {cfg.ffn_hidden_size}), RANDOM weights | tokenizer "
          f"{args.tokenizer or 'random configs/tokenizer/tiny.yaml'} (fp32) | {FRAMES}x{RES}x{RES} -> "
          f"{'x'.join(map(str, LATENT))} | batch {args.batch_size} | {args.dtype} | "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'cpu ({torch.get_num_threads()} threads)'} | "
          f"torch {torch.__version__} | top-k 16000, top-p 0.9 | mean of {args.repeats} after 1 warm-up | "
          f"decode mode {main_mode}")
    print("| method | L | params | forward steps | encode s | generate s | decode s | total s | "
          "tokens/s (generation) | frames/s (incl. tokenizer) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, L, params, m in rows:
        print(f"| {name} | {L} | {params / 1e6:.2f}M | {m['steps']:.0f} | {m['encode']:.3f} | {m['generate']:.3f} | "
              f"{m['decode']:.3f} | {m['total']:.3f} | {m['tokens'] / m['generate']:.0f} | "
              f"{m['frames'] / m['total']:.2f} |")
    nbp, ntp = rows[0][3], rows[1][3]
    print(f"| NBP / NTP | | | {ntp['steps'] / nbp['steps']:.1f}x fewer | | {ntp['generate'] / nbp['generate']:.2f}x | | "
          f"{ntp['total'] / nbp['total']:.2f}x | {ntp['generate'] / nbp['generate']:.2f}x | "
          f"{ntp['total'] / nbp['total']:.2f}x |")
    print(f"per forward step: NBP {1000 * nbp['generate'] / nbp['steps']:.2f} ms (16 tokens), "
          f"NTP {1000 * ntp['generate'] / ntp['steps']:.2f} ms (1 token)")
    after = {name: 1000 * (m["generate"] - m["prefill"]) / (m["steps"] - 1)
             for name, m in (("NBP", nbp), ("NTP", ntp))}
    print(f"prefill (+ first sampling): NBP {nbp['prefill']:.3f} s, NTP {ntp['prefill']:.3f} s | per step after "
          f"it: NBP {after['NBP']:.2f} ms, NTP {after['NTP']:.2f} ms (cost ratio {after['NBP'] / after['NTP']:.2f})")
    print_step_table(models, modes, main_mode, step_ms, device)


def print_step_table(models: dict, modes: list[str], main_mode: str, step_ms: dict, device: torch.device) -> None:
    """Per method: ms per step after the prefill in each decode mode (generation alone), the graph vs eager
    speed-up, and the sampler's cost and share of a step in ``main_mode`` (real sampler minus a free one)."""
    print(f"\nper step after the prefill (generation alone; sampler share in {main_mode} mode: "
          f"1 - step without sampling / step with it)")
    print("| method | L | " + " | ".join(f"{mode} ms/step" for mode in modes) +
          " | graph vs eager | sampler ms/step | sampler share of a step |")
    print("|---|---|" + "---|" * (len(modes) + 3))
    speedups = {}
    for name, (L, _) in models.items():
        cells = [f"{step_ms[name, mode, False]:.2f}" for mode in modes]
        if "cuda_graph" in modes and "eager" in modes:
            speedups[name] = step_ms[name, "eager", False] / step_ms[name, "cuda_graph", False]
            graph = f"{speedups[name]:.2f}x"
        else:
            graph = "n/a" + ("" if device.type == "cuda" else " (no CUDA)")
        real, free = step_ms[name, main_mode, False], step_ms[name, main_mode, True]
        print(f"| {name} | {L} | " + " | ".join(cells) +
              f" | {graph} | {real - free:.2f} | {100 * (real - free) / real:.1f}% |")
    nbp, ntp = (step_ms[name, main_mode, False] for name in models)
    print(f"NBP step / NTP step in {main_mode} mode: {nbp / ntp:.2f} | graph vs eager: " +
          (", ".join(f"{name} {s:.2f}x" for name, s in speedups.items()) if speedups else "n/a (no CUDA)"))


if __name__ == "__main__":
    main()
