"""The decode engine of one service replica (no Ray here): models, schedulers and the step loop.

One :class:`~idemrt.Decoder` per allowed step count shares the replica's models; each has a
:class:`~idemrt.diffusion.StepScheduler`, and one loop thread steps them in turn, so requests of
every step count and image size share the device step by step (continuous batching). Callers
submit from any thread and get a :class:`concurrent.futures.Future`; progress and previews reach
them through a callback run on the loop thread.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import bitstream as bsfmt
from ..api import Decoder, entropy_decode, read_bitstream
from ..diffusion import QueueFullError
from ..exact import exact_idempotence
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger(__name__)

MODES = ("perceptual", "mse")


@dataclass
class Decoded:
    image: torch.Tensor  # (1, 3, H, W) in [0, 1] on the CPU, cropped to the stored size
    distance: float  # final constraint distance (0 for MSE decodes)
    steps: int  # network steps of the schedule (0 for MSE decodes)
    seconds: float


def load_models(config: ServeConfig, device: str):
    """(codec, unet) from the server's configuration: files named there, never by a client."""
    from ..models.codec_loading import load_codec

    codec = load_codec(config.codec, quality=config.quality, checkpoint=config.codec_checkpoint,
                       pretrained=config.pretrained_codec, device=device)
    unet = None
    if config.unet:
        from ..models.unet_loading import load_unet

        unet = load_unet(config.unet, preset=None if config.unet_overrides else config.preset,
                         **config.unet_overrides)
    return codec, unet


class DecodeEngine:
    def __init__(self, config: ServeConfig, codec=None, unet=None, *, device: Optional[str] = None):
        self.config = config
        device = device or config.device
        if codec is None:
            codec, unet = load_models(config, device)
        self.metrics = Metrics()
        self.decoders = {s: Decoder(codec, unet, steps=_respacing(s), speed=config.speed, sampler=config.sampler,
                                    guidance=config.guidance, scale=config.scale, device=device,
                                    backend=config.backend, max_pixels=config.max_pixels)
                         for s in config.steps_allowed}
        # Post-processing (cropping, the exact-idempotence refinement) off the step loop's thread.
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idemrt-finish")
        self.schedulers = {s: d.scheduler(max_slots=config.max_slots, max_queue=config.queue)
                           for s, d in self.decoders.items()} if unet is not None else {}
        self.codec = self.decoders[config.steps_allowed[0]].codec
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idemrt-step-loop", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------------
    def check(self, data: bytes) -> bsfmt.Bitstream:
        """The parsed bitstream, if this server's codec made it (BitstreamError otherwise)."""
        return read_bitstream(self.codec, data, self.config.max_pixels)

    def submit(self, data: bytes, *, mode: str = "perceptual", seed: int = 0, steps: Optional[str] = None,
               on_event: Optional[Callable[[dict], None]] = None) -> Future:
        """Queue one decode; the Future resolves to :class:`Decoded`. ``on_event`` receives
        ``{"event": "progress", "step", "steps"}`` and ``{"event": "preview", "step", "image"}``."""
        t0 = time.monotonic()
        steps = self.config.steps_allowed[0] if steps is None else str(steps)
        bs = self.check(data)
        y_hat = entropy_decode(self.codec, bs)
        done: Future = Future()
        if mode == "mse":
            with torch.no_grad():
                image = self.codec.synthesis(y_hat).clamp_(0, 1)[..., : bs.height, : bs.width].float().cpu()
            done.set_result(Decoded(image, 0.0, 0, time.monotonic() - t0))
            return done
        decoder, scheduler = self.decoders[steps], self.schedulers[steps]
        if sum(s.pending() for s in self.schedulers.values()) >= self.config.queue:
            raise QueueFullError(f"the decode queue is full ({self.config.queue} images)")
        target = decoder.target_from_latent(y_hat)
        job = scheduler.submit(target, seed, (1, 3, bs.padded_height, bs.padded_width), warm=decoder.warm_from_target(target),
                               timeout=self.config.timeout_s,
                               on_step=None if on_event is None else self._reporter(decoder, bs, on_event))
        self._wake.set()

        def finish(r) -> None:
            try:
                image = ((r.x + 1) / 2).clamp_(0, 1)
                if decoder.exact:
                    image = exact_idempotence(decoder.codec, image, y_hat).x
                image = image[..., : bs.height, : bs.width].float().cpu()
                done.set_result(Decoded(image, r.distance, decoder.steps_run, time.monotonic() - t0))
            except Exception as exc:  # noqa: BLE001 - the request fails, the service goes on
                done.set_exception(exc)

        def resolve(f: Future) -> None:
            if f.cancelled():
                done.cancel()
            elif f.exception() is not None:
                done.set_exception(f.exception())
            else:
                self._finisher.submit(finish, f.result())

        job.future.add_done_callback(resolve)
        done.job = job  # the caller cancels through it (a client that went away)
        return done

    def _reporter(self, decoder, bs, on_event):
        every = self.config.preview_every or max(1, decoder.steps_run // 10)

        def report(job) -> None:
            done = job.state.steps_run
            on_event({"event": "progress", "step": done, "steps": decoder.steps_run})
            if job.state.running and done % every == 0:
                on_event({"event": "preview", "step": done, "image": self._preview(decoder, job.state, bs)})

        return report

    def _preview(self, decoder, state, bs) -> torch.Tensor:
        """The current x0 estimate of one image, small: one extra UNet forward, fp32, no guidance."""
        with torch.no_grad():
            i = state.position
            out = decoder.unet(state.x, decoder.sampler.model_timesteps(i, 1))
            x0 = decoder.sampler.predict(out, state.x, i).x0[..., : bs.height, : bs.width]
            side = self.config.preview_size
            scale = min(1.0, side / max(x0.shape[-2:]))
            if scale < 1:
                x0 = torch.nn.functional.interpolate(x0, scale_factor=scale, mode="area")
            return ((x0 + 1) / 2).clamp(0, 1).float().cpu()

    def stats(self) -> dict:
        per = [s.stats() for s in self.schedulers.values()]
        return {"waiting": sum(p["waiting"] for p in per), "running": sum(p["running"] for p in per),
                "slots": self.config.max_slots * max(1, len(per)), "slots_used": sum(p["slots_used"] for p in per),
                "step_seconds": max([p["step_seconds"] for p in per] or [0.0])}

    @property
    def alive(self) -> bool:
        """Whether the step loop runs (a replica whose loop died is unhealthy)."""
        return self._thread.is_alive()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(10)
        self._finisher.shutdown(wait=False)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            worked = False
            for scheduler in self.schedulers.values():
                try:
                    stepped = scheduler.step()
                except Exception as exc:  # noqa: BLE001 - fail that scheduler's images, keep serving
                    log.exception("decode step failed")
                    scheduler.fail_all(exc)
                    stepped = True
                if stepped:
                    self.metrics.observe_step(scheduler.step_seconds, scheduler.slots_used, self.config.max_slots)
                worked |= stepped
            if not worked:
                self._wake.wait(0.1)
                self._wake.clear()


def _respacing(steps: str):
    return int(steps) if steps.isdigit() else steps
