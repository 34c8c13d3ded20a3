"""What the decode loop costs besides the networks: wall time per step of the real decode engine
(:class:`idemrt.serve.core.DecodeEngine`, in-process, no Ray) and of the real Decoder loop
(:meth:`idemrt.Decoder.decode_batch`), with a zero-cost UNet and codec.

Why: on the H200 the engine's own work made batched decoding slower than unbatched (issue 27):
its cost must be a rounding error next to a step (an FFHQ-256 step at batch 8: 55 ms on an H200).
Target on the CPU: **<= 1 ms per step + 0.05 ms per image in the step**, previews on.

The zero-cost models have the real interfaces and output shapes, and almost no arithmetic:

* UNet: an ``nn.Module`` ``(x, t) -> zeros (N, 6, H, W)`` (ADM's eps and learned-variance halves),
  counting its calls and images, so that extra network calls (a preview's forward) are seen even
  though they cost nothing here;
* codec: a bmshj2018-factorized (compressai's ``FactorizedPrior``, 12 latent channels, seeded
  random weights, so the bitstream path is the real one) whose g_a is a 16x average pool repeated
  to the latent's channels and whose g_s a 16x nearest upsampling: the idempotence operator's cost
  is gone, its shapes and its straight-through rounding stay. The factorized family pads images
  to multiples of 16 (the hyperprior families to 64), so the images can be small.

Images are ``--size`` pixels square (default 16): what the step's own arithmetic costs grows with
the pixels (at 64x64 the eager step's sampler update and DPS autograd alone take about 0.3 ms per
image on the recorded CPU, six times the target), while the loop's bookkeeping does not.

Each cell (loop x slots x groups x previews) decodes ``slots x groups`` images at once, DDPM + DPS
(``paper``) on the eager backend: ``slots`` images per step (the engine's ``max_slots``) in each of
``groups`` step groups (images of different padded shapes never share a batch: groups 4 = S x S,
S x 2S, 2S x S and 2S x 2S images, S the size; the loop steps one group per iteration, round-robin). The cell
runs at ``--steps-lo`` and ``--steps-hi`` steps, ``--repeats`` times each, interleaved; the time
per step is the difference of the median wall times over the difference of the steps run, so the
per-image work before and after the loop (entropy decoding, finishing, the re-compression check)
cancels::

    per_step_ms = (median wall(hi) - median wall(lo)) / (iterations(hi) - iterations(lo))

``bare_step_ms``: the step function alone (``Decoder.step`` on one batch of the same images, the
same zero-cost models), the part of ``per_step_ms`` that is step arithmetic (the sampler update,
the DPS gradient's autograd) rather than the loop's bookkeeping; ``overhead_ms = per_step_ms -
bare_step_ms`` (``met``: ``per_step_ms`` within the target; ``overhead_met``: ``overhead_ms``
within it). ``per_step_cpu_ms``: the same difference of the process's CPU time (every thread of
it: the engine's core, the caller waiting on its futures costs none): on a shared machine, where
other processes take the cores, wall time grows with their load and CPU time much less
(``met_cpu``: within the target). ``unet_images_per_image_step``: UNet images evaluated per image and step (1.0: no
network call besides the step's own). Previews on: every request has an ``on_event`` callback and
the server previews every ``--preview-every`` steps; off: no callback.

Only public entry points (``DecodeEngine(config, codec, unet)``, ``submit(..., on_event=)``,
``stats()``, ``Decoder(...).decode_batch``, ``Decoder.step``), so that one script times the code
before and after a change of the engine's internals. ``--source DIR`` imports idemrt from ``DIR``
(a git worktree's ``python/``) instead of the installed package::

    .venv/bin/python benchmarks/engine_overhead.py --json benchmarks/engine_overhead_after.json
    git worktree add /tmp/idemrt_before 32173b6
    cp .venv/lib/python3.11/site-packages/idemrt/_engine*.so /tmp/idemrt_before/python/idemrt/
    .venv/bin/python benchmarks/engine_overhead.py --source /tmp/idemrt_before/python \\
        --json benchmarks/engine_overhead_before.json
    .venv/bin/python benchmarks/engine_overhead.py --smoke   # seconds: a few tiny cells

Numbers go to benchmarks/RESULTS.md with the machine, the date and the commit they were measured at.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

GROUP_SHAPES = ((1, 1), (1, 2), (2, 1), (2, 2))  # padded shapes in units of --size: one step group each
TARGET_MS, TARGET_MS_PER_IMAGE = 1.0, 0.05


def use_source(path: str) -> None:
    """Import idemrt from ``path`` (a checkout's ``python/`` folder): put it first on ``sys.path`` and
    drop the import hooks that would still resolve ``idemrt`` elsewhere (an editable install's
    finder sits in ``sys.meta_path`` before the path search). Before any import of idemrt."""
    import importlib.machinery

    path = os.path.abspath(path)
    if "idemrt" in sys.modules:
        raise RuntimeError("use_source must run before idemrt is imported")
    sys.path.insert(0, path)
    for finder in list(sys.meta_path):
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec("idemrt", None)
        except Exception:  # noqa: BLE001 - a finder that cannot answer is not the one in the way
            continue
        if spec is not None and not str(spec.origin or "").startswith(path):
            sys.meta_path.remove(finder)
    import idemrt

    if not os.path.abspath(idemrt.__file__).startswith(path):
        raise RuntimeError(f"idemrt came from {idemrt.__file__}, not from {path}")


def zero_cost_models():
    """``(codec, unet)``: see the module doc."""
    import torch
    import torch.nn.functional as F
    from compressai.models import FactorizedPrior
    from torch import nn

    from idemrt.models.codec import Codec

    class ZeroUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = self.images = 0

        def forward(self, x, t):
            self.calls, self.images = self.calls + 1, self.images + x.shape[0]
            return x.new_zeros((x.shape[0], 2 * x.shape[1], *x.shape[2:]))

    class Pool(nn.Module):  # g_a: (N, 3, H, W) -> (N, 12, H/16, W/16)
        def forward(self, x):
            return F.avg_pool2d(x, 16).repeat(1, 4, 1, 1)

    class Upsample(nn.Module):  # g_s: (N, 12, h, w) -> (N, 3, 16h, 16w)
        def forward(self, y):
            return F.interpolate(y[:, :3], scale_factor=16, mode="nearest")

    torch.manual_seed(0)
    model = FactorizedPrior(N=8, M=12)
    model.g_a, model.g_s = Pool(), Upsample()
    model.update(force=True)
    return Codec("bmshj2018-factorized", model.eval(), quality=1), ZeroUNet()


def bitstreams(codec, groups: int, per_group: int, size: int) -> list:
    """``groups`` lists of ``per_group`` .idm bitstreams of random images, one padded shape per group."""
    import torch

    from idemrt import Encoder

    g = torch.Generator().manual_seed(1)
    return [[Encoder(codec).encode(torch.rand(1, 3, h * size, w * size, generator=g)) for _ in range(per_group)]
            for h, w in GROUP_SHAPES[:groups]]


def _median_ms(times: list) -> float:
    return 1e3 * statistics.median(times)


class EngineLoop:
    """The service's engine: every image submitted at once, each with a progress/preview callback
    (previews on) or none (off)."""

    def __init__(self, codec, unet, slots: int, groups: int, steps: tuple, previews: bool, preview_every: int):
        from idemrt.serve.config import ServeConfig

        try:
            from idemrt.serve.core import DecodeEngine
        except ImportError:  # a checkout before the rename (--source): serve/engine.py
            from idemrt.serve.engine import DecodeEngine

        config = ServeConfig(unet="in-memory", speeds_allowed=["paper"], steps_allowed=[str(s) for s in steps],
                             backend="eager", max_slots=slots, queue=max(256, 2 * slots * groups),
                             preview_every=preview_every, timeout_s=3600.0,
                             # whole images (the zero-cost prior has no native size to tile by); a
                             # --source checkout from before tiled serving has no such field
                             **({"tile": False} if "tile" in ServeConfig.__dataclass_fields__ else {}))
        self.engine = DecodeEngine(config, codec, unet, device="cpu")
        self.previews, self.preview_events = previews, 0

    def _on_event(self, event: dict) -> None:
        if event.get("event") == "preview":
            self.preview_events += 1

    def run(self, data: list, steps: int) -> int:
        """Decode every bitstream of ``data`` at ``steps``; the loop's iterations (None if not reported)."""
        before = _iterations(self.engine.stats())
        futures = [self.engine.submit(d, seed=k, steps=str(steps), on_event=self._on_event if self.previews else None)
                   for group in data for k, d in enumerate(group)]
        for f in futures:
            f.result(timeout=3600)
        after = _iterations(self.engine.stats())
        return None if before is None or after is None else after - before

    def close(self) -> None:
        self.engine.close()


def _iterations(stats: dict):
    """The engine's loop iterations ("steps" in checkouts before the batcher's rename)."""
    return stats.get("iterations", stats.get("steps"))


class DecoderLoop:
    """``Decoder.decode_batch`` of every image at once (one batch per padded shape)."""

    def __init__(self, codec, unet, steps: tuple):
        from idemrt import Decoder
        from idemrt.speeds import SPEEDS

        self.decoders = {s: Decoder(codec, unet, config=SPEEDS["paper"].replace(steps=s, backend="eager"),
                                    device="cpu") for s in steps}
        self.preview_events = 0

    def run(self, data: list, steps: int):
        flat = [d for group in data for d in group]
        self.decoders[steps].decode_batch(flat, seeds=list(range(len(flat))), output="tensor")
        return None

    def close(self) -> None:
        pass


def bare_step_ms(codec, unet, slots: int, groups: int, size: int, steps: int, calls: int) -> float:
    """Median ms of ``Decoder.step`` on a batch of ``slots`` images, averaged over the groups' shapes."""
    import torch

    from idemrt import Decoder
    from idemrt.speeds import SPEEDS

    decoder = Decoder(codec, unet, config=SPEEDS["paper"].replace(steps=steps, backend="eager"), device="cpu")
    g = torch.Generator().manual_seed(2)
    per_shape = []
    for h, w in GROUP_SHAPES[:groups]:
        x = torch.randn(slots, 3, h * size, w * size, generator=g)
        target = decoder.target_from_latent(codec.quantize(codec.analysis(torch.rand(x.shape, generator=g))))
        noise, scale = torch.randn(x.shape, generator=g), torch.full((slots,), 0.6)
        times = []
        for k in range(calls + 2):  # two warm-up calls
            t0 = time.perf_counter()
            decoder.step(x, steps // 2, target, noise, scale)
            if k >= 2:
                times.append(time.perf_counter() - t0)
        per_shape.append(_median_ms(times))
    return sum(per_shape) / len(per_shape)


def run_cell(codec, unet, loop: str, slots: int, groups: int, previews: bool, args) -> dict:
    steps = (args.steps_lo, args.steps_hi)
    data = bitstreams(codec, groups, slots, args.size)
    runner = (EngineLoop(codec, unet, slots, groups, steps, previews, args.preview_every) if loop == "engine"
              else DecoderLoop(codec, unet, steps))
    walls = {s: [] for s in steps}
    cpus = {s: [] for s in steps}
    iterations = {s: [] for s in steps}
    unet_images = {}
    try:
        for s in steps:  # warm-up: first allocations, thread pools
            runner.run(data, s)
        for _ in range(args.repeats):
            for s in steps:
                images0 = unet.images
                t0, c0 = time.perf_counter(), time.process_time()
                n = runner.run(data, s)
                walls[s].append(time.perf_counter() - t0)
                cpus[s].append(time.process_time() - c0)
                iterations[s].append(n if n is not None else groups * s)
                unet_images[s] = unet.images - images0
        previews_seen = runner.preview_events
    finally:
        runner.close()
    lo, hi = steps
    d_iter = statistics.median(iterations[hi]) - statistics.median(iterations[lo])
    per_step = (_median_ms(walls[hi]) - _median_ms(walls[lo])) / d_iter
    per_step_min = 1e3 * (min(walls[hi]) - min(walls[lo])) / d_iter
    per_step_cpu = (_median_ms(cpus[hi]) - _median_ms(cpus[lo])) / d_iter
    bare = bare_step_ms(codec, unet, slots, groups, args.size, hi, args.bare_calls)
    images = slots * groups
    target = TARGET_MS + TARGET_MS_PER_IMAGE * slots
    return {"loop": loop, "slots": slots, "groups": groups, "previews": previews if loop == "engine" else None,
            "images": images, "size": args.size, "steps_lo": lo, "steps_hi": hi, "iterations_lo": statistics.median(iterations[lo]),
            "iterations_hi": statistics.median(iterations[hi]),
            "per_step_ms": round(per_step, 3), "per_step_ms_min": round(per_step_min, 3),
            "per_step_cpu_ms": round(per_step_cpu, 3), "met_cpu": per_step_cpu <= target,
            "bare_step_ms": round(bare, 3), "overhead_ms": round(per_step - bare, 3),
            "target_ms": round(target, 3), "met": per_step <= target, "overhead_met": per_step - bare <= target,
            "unet_images_per_image_step": round((unet_images[hi] - unet_images[lo]) / (images * (hi - lo)), 3),
            "wall_lo_s": [round(w, 4) for w in walls[lo]], "wall_hi_s": [round(w, 4) for w in walls[hi]],
            "preview_events": previews_seen}


def environment(source) -> dict:
    import torch

    import idemrt

    root = Path(idemrt.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                     "--", "python"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"idemrt": idemrt.__file__, "source": source, "commit": commit, "python_tree_dirty": dirty,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu": _cpu_model(), "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loops", default="engine,decoder", help="engine, decoder or both")
    p.add_argument("--slots", default="1,8,32", help="images per step")
    p.add_argument("--groups", default="1,4", help="step groups in flight (1 to 4)")
    p.add_argument("--previews", default="on,off", help="engine cells: on, off or on,off")
    p.add_argument("--size", type=int, default=16, help="image side, pixels (a multiple of 16)")
    p.add_argument("--steps-lo", type=int, default=5)
    p.add_argument("--steps-hi", type=int, default=45)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preview-every", type=int, default=2, help="engine: a preview every this many steps")
    p.add_argument("--bare-calls", type=int, default=20, help="timed calls of the bare step per shape")
    # One thread: the loop's own work is single-threaded Python, and on a shared 2-core machine a
    # second intra-op thread is often descheduled, so that a 2-thread elementwise op waits for it
    # (measured here: 5.4 ms for a 100k-element multiply with 2 threads, 15 us with 1).
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--source", default=None, help="import idemrt from this folder (a checkout's python/)")
    p.add_argument("--json", default=None, help="write the environment and the rows here (after every row)")
    p.add_argument("--smoke", action="store_true", help="tiny and fast: slots 1,2, steps 2 and 4, one repeat")
    args = p.parse_args(argv)
    if args.smoke:
        args.slots, args.steps_lo, args.steps_hi, args.repeats, args.bare_calls = "1,2", 2, 4, 1, 2
    if args.source:
        use_source(args.source)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    loops = [s for s in args.loops.split(",") if s]
    slots = [int(s) for s in args.slots.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    previews = [{"on": True, "off": False}[s] for s in args.previews.split(",") if s]
    if set(loops) - {"engine", "decoder"} or not 1 <= min(groups) <= max(groups) <= len(GROUP_SHAPES):
        p.error(f"--loops from engine,decoder; --groups from 1 to {len(GROUP_SHAPES)}")
    if not 1 <= args.steps_lo < args.steps_hi or args.size < 16 or args.size % 16:
        p.error("need 1 <= --steps-lo < --steps-hi and --size a multiple of 16")
    codec, unet = zero_cost_models()
    result = {"environment": environment(args.source), "args": vars(args), "rows": []}
    cells = [(loop, s, g, pv) for loop in loops for g in groups for s in slots
             for pv in (previews if loop == "engine" else [False])]
    for loop, s, g, pv in cells:
        row = run_cell(codec, unet, loop, s, g, pv, args)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("wall_")}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    result["environment"]["loadavg_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
