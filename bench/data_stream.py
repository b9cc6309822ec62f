#!/usr/bin/env python
"""Data reading at scale, simulated on one machine: many data-parallel training streams over thousands
of token shards, each reading only its share (:class:`megatron_nbp.data.TokenClipStream`).

Writes ``--shards`` synthetic shards of uneven sizes (``--min-samples`` .. ``--max-samples`` clips each,
seeded) through the real shard format, then for each of ``--ranks`` (data-parallel sizes) builds every
rank's stream in this one process and reads ``--epochs`` epochs of it, counting the bytes each rank reads
through the stream's ``opener`` (shard tars; sidecars; the manifest at start-up). One row per DP size:

* dataset: the shard files' bytes (``.tar``), and the sample bytes in them (sidecar offsets; the rest is
  tar end-of-archive padding, never read);
* per rank per epoch: samples (the same on every rank), tar bytes read (mean, max) and their ratio to
  the sample bytes / DP (the target: within 10%), sidecar bytes read;
* start-up per rank: seconds to build the stream (manifest + one ``stat`` per shard) and bytes read;
* samples/s of one rank's stream (reading, decoding, shuffling; one process, so ranks run one after the
  other: the figure is per rank, not for the job).

For comparison, the stream before this design read every shard at start-up and the whole dataset every
epoch on every rank: ``2 x dataset`` per rank in the first epoch, ``1 x dataset`` in each later one.

    python bench/data_stream.py                                   # 3000 shards, DP 8 and 64
    python bench/data_stream.py --shards 500 --ranks 4,16 --epochs 2
"""

from __future__ import annotations

import argparse
import io
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from data_prep.shards import manifest_entry, read_sidecar, shard_name, write_manifest, write_shard
from data_prep.synthetic import synthetic_clips
from megatron_nbp.data import TokenClipStream


class CountingOpener:
    """``open`` for binary reading that adds the bytes each file's ``read`` returns to a tally per kind
    (``tar``, ``sidecar``, ``manifest``)."""

    def __init__(self) -> None:
        self.bytes = {"tar": 0, "sidecar": 0, "manifest": 0}

    def reset(self) -> None:
        """Zero the tallies."""
        self.bytes = dict.fromkeys(self.bytes, 0)

    def __call__(self, path, mode: str = "rb") -> io.BufferedReader:
        path = Path(path)
        kind = "tar" if path.suffix == ".tar" else "manifest" if path.name == "manifest.json" else "sidecar"
        f = open(path, mode)
        inner, tally = f.read, self.bytes

        def read(size: int = -1) -> bytes:
            data = inner(size)
            tally[kind] += len(data)
            return data

        f.read = read  # type: ignore[method-assign]
        return f


def write_dataset(out: Path, num_shards: int, lo: int, hi: int, latent: tuple[int, int, int], seed: int) -> int:
    """``num_shards`` shards of ``lo..hi`` synthetic clips each (seeded sizes) + manifest; returns the clip count."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(lo, hi + 1, size=num_shards)
    palette = synthetic_clips(256, latent, vocab=64000, seed=seed)
    meta = {"source": "synthetic", "clip_start": 0, "num_frames": 17, "frame_stride": 1, "fps": 8.0,
            "label": "synthetic", "latent_shape": list(latent)}
    entries, clip = [], 0
    for k, n in enumerate(sizes):
        samples = [(f"clip{clip + i:07d}", palette[(clip + i) % len(palette)], meta) for i in range(n)]
        write_shard(out / shard_name(k), samples)
        entries.append(manifest_entry(out / shard_name(k), int(n)))
        clip += int(n)
    write_manifest(out, {
        "format": "megatron-nbp-tokens/1", "shards": entries, "num_samples": clip, "failures": [],
        "tokenizer": {"path": "synthetic", "sha256": "0" * 64, "levels": [8, 8, 8, 5, 5, 5], "codebook_size": 64000,
                      "latent_shape": list(latent)},
        "clip": {"num_frames": 17, "frame_stride": 1, "resolution": [64, 64]},
    })
    return clip


def simulate(data: Path, dp_size: int, epochs: int, latent: tuple[int, int, int], shuffle_buffer: int) -> dict:
    """Build and read every rank's stream; returns the per-rank figures."""
    rows = []
    for rank in range(dp_size):
        opener = CountingOpener()
        start = time.perf_counter()
        stream = TokenClipStream(data, rank, dp_size, seed=1234, latent_shape=latent, vocab_size=64000,
                                 shuffle_buffer=shuffle_buffer, opener=opener)
        startup_s = time.perf_counter() - start
        startup = dict(opener.bytes)
        opener.reset()
        n = stream.samples_per_rank * epochs
        start = time.perf_counter()
        got = sum(1 for _ in itertools.islice(iter(stream), n))
        read_s = time.perf_counter() - start
        assert got == n
        rows.append({"startup_s": startup_s, "startup_bytes": sum(startup.values()), "read_s": read_s,
                     "tar": opener.bytes["tar"] / epochs, "sidecar": opener.bytes["sidecar"] / epochs,
                     "samples": stream.samples_per_rank, "total": stream.num_samples})
    return {"rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=3000, help="number of synthetic shards")
    parser.add_argument("--min-samples", type=int, default=2, help="fewest clips in a shard")
    parser.add_argument("--max-samples", type=int, default=14, help="most clips in a shard")
    parser.add_argument("--latent-shape", type=int, nargs=3, default=(5, 8, 8), help="T' H' W' of each clip")
    parser.add_argument("--ranks", default="8,64", help="comma-separated data-parallel sizes to simulate")
    parser.add_argument("--epochs", type=int, default=1, help="epochs each rank reads")
    parser.add_argument("--shuffle-buffer", type=int, default=256, help="the stream's shuffle buffer")
    parser.add_argument("--data", type=Path, help="existing dataset folder to read instead of writing one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shard sizes and clips")
    args = parser.parse_args(argv)
    latent = tuple(args.latent_shape)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp)
        if args.data is None:
            start = time.perf_counter()
            clips = write_dataset(data, args.shards, args.min_samples, args.max_samples, latent, args.seed)
            print(f"> wrote {clips} clips in {args.shards} shards ({args.min_samples}..{args.max_samples} per shard) "
                  f"in {time.perf_counter() - start:.1f} s")
        tars = sorted(data.glob("shard-*.tar"))
        file_bytes = sum(p.stat().st_size for p in tars)
        sample_bytes = sum(o[-1] - o[0] for o in (read_sidecar(p)["offsets"] for p in tars))
        print(f"> dataset: {len(tars)} shards, {file_bytes / 2**20:.1f} MiB of tar files, "
              f"{sample_bytes / 2**20:.1f} MiB of samples (the rest is tar end padding)\n")
        head = ("| DP | samples/rank/epoch | left out/epoch | tar MiB read/rank/epoch (mean, max) | max / (samples/DP) "
                "| sidecar KiB/rank/epoch | start-up s/rank | start-up KiB/rank | samples/s/rank | before: MiB/rank epoch 1 |")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for dp in (int(x) for x in args.ranks.split(",")):
            rows = simulate(data, dp, args.epochs, latent, args.shuffle_buffer)["rows"]
            tar = [r["tar"] for r in rows]
            share = sample_bytes / dp
            rate = sum(r["samples"] * args.epochs for r in rows) / sum(r["read_s"] for r in rows)
            print(f"| {dp} | {rows[0]['samples']} | {rows[0]['total'] - dp * rows[0]['samples']} "
                  f"| {np.mean(tar) / 2**20:.2f}, {max(tar) / 2**20:.2f} | {max(tar) / share:.3f} "
                  f"| {np.mean([r['sidecar'] for r in rows]) / 2**10:.1f} "
                  f"| {np.mean([r['startup_s'] for r in rows]):.3f} "
                  f"| {np.mean([r['startup_bytes'] for r in rows]) / 2**10:.0f} | {rate:.0f} "
                  f"| {2 * file_bytes / 2**20:.1f} |")


if __name__ == "__main__":
    main()
