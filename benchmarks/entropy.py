"""Entropy coding throughput: idemrt's native rANS coder against compressai.ans.

Workload: the y latent of bmshj2018-hyperprior (compressai ScaleHyperprior, M = 192 channels)
for a W x H image, i.e. 192 x H/16 x W/16 symbols, coded with the real 64-level
GaussianConditional scale table. Scales and symbols are synthetic, since a randomly initialised
model gives degenerate latents: per element, an unused channel (scale 0.11) with probability 1/2,
else a scale log-uniform in [0.5, 32]; y ~ N(0, scale); symbol = round(y). Tails are kept, so
some symbols take the bypass path.

Rows (best wall-clock time of --repeats, torch on 1 thread; every stream is checked
byte-identical to compressai's and every decode against the symbols):
  compressai coder      RansEncoder.encode_with_indexes / RansDecoder.decode_with_indexes on
                        ready-made Python lists (the pybind11 list conversion is part of its API)
  compressai model      GaussianConditional.compress / .decompress (adds the .tolist() calls)
  idemrt coder          idemrt.entropy.encode / decode on int32 arrays (CDF table built per call)
  idemrt model          the same GaussianConditional after idemrt.entropy.install()
  idemrt batch Nt       encode_batch / decode_batch of --batch images on N threads

Usage: python benchmarks/entropy.py [--size 2048x1536] [--batch 4] [--threads 0] [--json PATH]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time

import compressai
import numpy as np
import torch
from compressai.ans import RansDecoder, RansEncoder
from compressai.entropy_models import GaussianConditional
from compressai.models.google import get_scale_table

import idemrt
import idemrt.entropy as E
from idemrt.defaults import cpu_model

M = 192  # y channels of bmshj2018-hyperprior, qualities 1-5


def synthetic_latent(gc: GaussianConditional, shape, rng):
    """(y float32, symbols int32, indexes int32) for the scale mixture described above."""
    n = int(np.prod(shape))
    scales = np.where(rng.random(n) < 0.5, 0.11, np.exp(rng.uniform(np.log(0.5), np.log(32.0), n)))
    y = rng.normal(0.0, scales).astype(np.float32).reshape(shape)
    indexes = gc.build_indexes(torch.from_numpy(scales.astype(np.float32)).reshape(shape))
    return y, np.round(y).astype(np.int32), indexes.numpy()


def best_time(fn, repeats):
    """(best wall-clock seconds, process CPU seconds of that run, result)."""
    best, out = (float("inf"), 0.0), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2048x1536", help="image WxH (default 2048x1536)")
    parser.add_argument("--batch", type=int, default=4, help="images for the batched rows")
    parser.add_argument("--threads", type=int, default=0, help="threads for the batched rows (0: all)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if not E.available():
        raise SystemExit("idemrt._engine is not built: pip install -e .")

    torch.set_num_threads(1)  # the model rows run a few torch ops; keep them single-threaded too
    width, height = (int(v) for v in args.size.lower().split("x"))
    shape = (1, M, height // 16, width // 16)
    threads = args.threads if args.threads > 0 else os.cpu_count()
    rng = np.random.default_rng(args.seed)

    gc = GaussianConditional(None)
    gc.update_scale_table(get_scale_table())
    native_gc = copy.deepcopy(gc)
    E.install(native_gc, num_threads=1)
    y, symbols, indexes = synthetic_latent(gc, shape, rng)
    n = symbols.size
    cdfs, lengths, offsets = gc._quantized_cdf, gc._cdf_length, gc._offset
    lists = [symbols.ravel().tolist(), indexes.ravel().tolist(), cdfs.tolist(), lengths.tolist(), offsets.tolist()]

    rows = []

    def add(name, enc, dec, n_symbols, n_bytes):
        rows.append(
            {
                "path": name,
                "encode_s": enc[0],
                "decode_s": dec[0],
                "encode_cpu_s": enc[1],
                "decode_cpu_s": dec[1],
                "symbols": n_symbols,
                "bytes": n_bytes,
            }
        )

    # compressai, coder call
    enc, string = best_time(lambda: RansEncoder().encode_with_indexes(*lists), args.repeats)
    dec, values = best_time(lambda: RansDecoder().decode_with_indexes(string, *lists[1:]), args.repeats)
    assert values == lists[0]
    add("compressai coder", enc, dec, n, len(string))

    # compressai, entropy model
    y_t, idx_t = torch.from_numpy(y), torch.from_numpy(indexes)
    enc, strings = best_time(lambda: gc.compress(y_t, idx_t), args.repeats)
    dec, y_hat = best_time(lambda: gc.decompress(strings, idx_t), args.repeats)
    assert strings == [string]
    add("compressai model", enc, dec, n, len(string))

    # idemrt, coder call
    enc, ours = best_time(lambda: E.encode(symbols, indexes, E.cdf_table(cdfs, lengths, offsets)), args.repeats)
    dec, decoded = best_time(lambda: E.decode(ours, indexes, E.cdf_table(cdfs, lengths, offsets)), args.repeats)
    assert ours == string and np.array_equal(decoded, symbols)
    add("idemrt coder", enc, dec, n, len(ours))

    # idemrt, entropy model
    enc, ours_model = best_time(lambda: native_gc.compress(y_t, idx_t), args.repeats)
    dec, y_hat_ours = best_time(lambda: native_gc.decompress(ours_model, idx_t), args.repeats)
    assert ours_model == [string] and torch.equal(y_hat, y_hat_ours)
    add("idemrt model", enc, dec, n, len(string))

    # idemrt, batches of independent images, one stream each
    batch = [synthetic_latent(gc, shape, rng)[1:] for _ in range(args.batch)]
    b_symbols, b_indexes = [s for s, _ in batch], [i for _, i in batch]
    table = E.cdf_table(cdfs, lengths, offsets)
    first = RansEncoder().encode_with_indexes(b_symbols[0].ravel().tolist(), b_indexes[0].ravel().tolist(), *lists[2:])
    for t in sorted({1, threads}):
        enc, b_strings = best_time(lambda: E.encode_batch(b_symbols, b_indexes, table, num_threads=t), args.repeats)
        dec, b_decoded = best_time(lambda: E.decode_batch(b_strings, b_indexes, table, num_threads=t), args.repeats)
        assert b_strings[0] == first and all(np.array_equal(a, b) for a, b in zip(b_decoded, b_symbols))
        add(f"idemrt batch x{args.batch} {t}t", enc, dec, n * args.batch, sum(map(len, b_strings)))

    base = rows[0]
    print(
        f"entropy coding of a {width}x{height} y latent ({n} symbols, {8 * len(string) / n:.3f} bits/symbol); "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print("ms: best wall clock (process CPU time of that run); x: wall-clock speed-up over the compressai coder")
    print(
        f"{'path':<24} {'encode ms':>16} {'decode ms':>16} {'enc Msym/s':>11} {'dec Msym/s':>11} {'enc x':>6} {'dec x':>6}"
    )
    for r in rows:
        per_image = r["symbols"] / n
        r["encode_msym_s"] = r["symbols"] / r["encode_s"] / 1e6
        r["decode_msym_s"] = r["symbols"] / r["decode_s"] / 1e6
        r["encode_speedup_vs_compressai_coder"] = base["encode_s"] * per_image / r["encode_s"]
        r["decode_speedup_vs_compressai_coder"] = base["decode_s"] * per_image / r["decode_s"]
        enc = f"{1e3 * r['encode_s']:.1f} ({1e3 * r['encode_cpu_s']:.1f})"
        dec = f"{1e3 * r['decode_s']:.1f} ({1e3 * r['decode_cpu_s']:.1f})"
        print(
            f"{r['path']:<24} {enc:>16} {dec:>16} {r['encode_msym_s']:11.1f} {r['decode_msym_s']:11.1f} "
            f"{r['encode_speedup_vs_compressai_coder']:6.2f} {r['decode_speedup_vs_compressai_coder']:6.2f}"
        )

    if args.json:
        report = {
            "benchmark": "entropy",
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "cpu": cpu_model(),
                "logical_cpus": os.cpu_count(),
                "load_average_1_5_15": os.getloadavg(),
                "platform": platform.platform(),
            },
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "torch": torch.__version__,
                "compressai": compressai.__version__,
                "idemrt": idemrt.__version__,
            },
            "config": {
                "size": [width, height],
                "latent_shape": list(shape),
                "batch": args.batch,
                "threads": threads,
                "repeats": args.repeats,
                "seed": args.seed,
                "timing": "best wall-clock time of repeats (and the process CPU time of that run)",
                "torch_threads": 1,
            },
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
