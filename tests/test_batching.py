"""The step batcher (continuous batching): images joining and leaving a running batch decode
exactly as they would alone; cancellation, deadlines, a bounded queue and fair turns.

The reference for every image is its decode alone (``Decoder.sample`` of one target with the same
seed). Batching changes the batch size of the UNet's convolutions, whose CPU kernels may sum in
another order: the comparison allows 2e-5 (measured here: up to ~2e-6 after a few steps).
"""
import threading
from concurrent.futures import CancelledError

import pytest
import torch

import idemrt
from idemrt.batching import StepBatcher
from idemrt.errors import DeadlineExceeded, QueueFullError
from tiny_models import tiny_codec, tiny_unet

TOL = 2e-5


@pytest.fixture(scope="module")
def models():
    return tiny_unet(), tiny_codec()


def _targets(codec, n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return [2 * codec.operator(torch.rand(1, 3, size, size, generator=g), "x") - 1 for _ in range(n)]


def _alone(dec, target, seed):
    x, _ = dec.sample(target, seed=seed)
    return x


def _decoder(models, **kw):
    unet, codec = models
    return idemrt.Decoder(codec, unet, device="cpu", **{"steps": 6, **kw})


@pytest.mark.parametrize("kw", [{}, {"sampler": "ddim", "guidance": "dsg", "interval": 2},
                                {"max_retries": 1, "retry_threshold": 0.0}])
def test_images_joining_mid_run_equal_their_decode_alone(models, kw):
    """B joins after A has run 2 steps, C after 4 (DSG off-interval steps and a retry included):
    every result equals that image decoded alone with its seed."""
    dec = _decoder(models, **kw)
    targets = _targets(dec.codec, 3)
    sched = dec.batcher(max_slots=4)
    shape = (1, 3, 64, 64)
    jobs = [sched.submit(targets[0], 10, shape)]
    batch_sizes = []
    advance = sched.sampler.advance

    def recording(states, pad_to=None, pixel_budget=None):
        batch_sizes.append(len([s for s in states if s.running]))
        advance(states, pad_to, pixel_budget)

    sched.sampler.advance = recording
    for _ in range(2):
        sched.step()
    jobs.append(sched.submit(targets[1], 11, shape))
    for _ in range(2):
        sched.step()
    jobs.append(sched.submit(targets[2], 12, shape))
    sched.run(jobs)
    assert batch_sizes[:2] == [1, 1] and batch_sizes[2:4] == [2, 2] and 3 in batch_sizes  # they joined
    for job, target, seed in zip(jobs, targets, (10, 11, 12)):
        result = job.future.result()
        torch.testing.assert_close(result.x, _alone(dec, target, seed), rtol=0, atol=TOL)
        assert result.retries == kw.get("max_retries", 0)


def test_cancelled_image_leaves_at_the_next_step_and_frees_its_slot(models):
    dec = _decoder(models, steps=8)
    targets = _targets(dec.codec, 2)
    sched = dec.batcher(max_slots=1)  # one slot: B waits for it
    a = sched.submit(targets[0], 1, (1, 3, 64, 64))
    b = sched.submit(targets[1], 2, (1, 3, 64, 64))
    sched.step()
    assert a.evaluations == 1 and b.evaluations == 0
    a.cancel()
    sched.step()  # A leaves, B takes its slot in the same iteration
    assert a.future.cancelled() and a.evaluations == 1 and b.evaluations == 1
    sched.run([b])
    with pytest.raises(CancelledError):
        a.future.result()
    torch.testing.assert_close(b.future.result().x, _alone(dec, targets[1], 2), rtol=0, atol=TOL)
    assert sched.stats()["running"] == 0 and sched.stats()["waiting"] == 0


def test_groups_of_different_shapes_take_turns(models):
    dec = _decoder(models, steps=3)
    small, large = _targets(dec.codec, 2, 64), _targets(dec.codec, 1, 128)
    sched = dec.batcher()
    turns = []
    advance = sched.sampler.advance
    sched.sampler.advance = lambda states, pad_to=None, pixel_budget=None: (
        turns.append(states[0].x.shape[-1]), advance(states, pad_to, pixel_budget))
    jobs = [sched.submit(t, k, (1, 3, 64, 64)) for k, t in enumerate(small)]
    jobs.append(sched.submit(large[0], 5, (1, 3, 128, 128)))
    sched.run(jobs)
    assert turns == [64, 128, 64, 128, 64, 128]  # alternating: neither group waits for the other
    torch.testing.assert_close(jobs[2].future.result().x, _alone(dec, large[0], 5), rtol=0, atol=TOL)


def test_padded_slots_are_masked(models):
    """With slot counts (1, 2, 4), three images run as a batch of four; the filler changes nothing."""
    dec = _decoder(models, steps=3)
    targets = _targets(dec.codec, 3)
    sched = StepBatcher(dec.guided_sampler(), max_slots=4, slot_counts=(1, 2, 4))
    seen = []
    step = dec.backend.step

    def recording(x, *args):
        seen.append(x.shape[0])
        return step(x, *args)

    dec.backend.step = recording
    try:
        jobs = [sched.submit(t, k, (1, 3, 64, 64)) for k, t in enumerate(targets)]
        sched.run(jobs)
    finally:
        del dec.backend.step
    assert set(seen) == {4}
    for k, job in enumerate(jobs):
        torch.testing.assert_close(job.future.result().x, _alone(dec, targets[k], k), rtol=0, atol=TOL)


def test_bounded_queue_and_deadline(models):
    dec = _decoder(models, steps=50)
    target = _targets(dec.codec, 1)[0]
    sched = dec.batcher(max_slots=2, max_queue=2)
    first = sched.submit(target, 0, (1, 3, 64, 64), timeout=0.0)  # already late at its first step
    sched.submit(target, 1, (1, 3, 64, 64))
    with pytest.raises(QueueFullError):
        sched.submit(target, 2, (1, 3, 64, 64))
    sched.step()
    with pytest.raises(DeadlineExceeded):
        first.future.result(timeout=0)
    sched.submit(target, 3, (1, 3, 64, 64))  # the late image's place is free again


def test_a_service_thread_drives_the_batcher(models):
    """The pattern the decode service uses: one loop thread steps, other threads submit and wait."""
    dec = _decoder(models, steps=4)
    targets = _targets(dec.codec, 2)
    sched = dec.batcher()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            with sched.work:
                if not sched.pending():
                    sched.work.wait(0.05)
                    continue
            sched.step()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        futures = [sched.submit(t, k, (1, 3, 64, 64)).future for k, t in enumerate(targets)]
        results = [f.result(timeout=60) for f in futures]
    finally:
        stop.set()
        thread.join(10)
    for k, r in enumerate(results):
        torch.testing.assert_close(r.x, _alone(dec, targets[k], k), rtol=0, atol=TOL)


def test_fast_backend_with_graphs_sees_only_its_slot_counts(models):
    """On the fast backend with graphs, the batcher pads batches to the slot counts (1, 2, 4, 8,
    16): three, then five images run as batches of four and eight — two captures, not one per size."""
    from test_backend_fast import _RecordingGraphs

    unet, codec = models
    dec = idemrt.Decoder(codec, unet, steps=2, device="cpu", backend="fast", dtype=torch.float32,
                         backend_options={"graphs": False})
    fast = dec.backend
    fast.graphs, fast._graphs = True, _RecordingGraphs()  # the graph path, without CUDA
    targets = _targets(codec, 5)
    for n in (3, 5):
        sched = dec.batcher(max_slots=16)
        jobs = [sched.submit(t, k, (1, 3, 64, 64)) for k, t in enumerate(targets[:n])]
        sched.run(jobs)
    assert sorted({key[1][0] for key in fast._graphs.keys}) == [4, 8] and fast.num_graphs == 2
    want = idemrt.Decoder(codec, unet, steps=2, device="cpu", backend="fast", dtype=torch.float32,
                          backend_options={"graphs": False})
    torch.testing.assert_close(jobs[4].future.result().x, _alone(want, targets[4], 4), rtol=0, atol=TOL)


# --- budget, states, priorities, preemption (the serving engine's batcher) ---------------------------

def _record_batches(sched):
    """Wrap execute(): the list of (job ids, slots) of every step run."""
    runs, execute = [], sched.execute

    def recording(out):
        runs.append(([id(j) for j in out.run], out.slots))
        execute(out)

    sched.execute = recording
    return runs


def test_pixel_budget_limits_the_batch_by_pixels_not_images(models):
    dec = _decoder(models)
    targets = _targets(dec.codec, 4)
    sched = dec.batcher(max_slots=16)
    sched.configure(pixel_budget=2 * 64 * 64 + 100)  # room for two 64x64 images per step
    runs = _record_batches(sched)
    jobs = [sched.submit(t, s, (1, 3, 64, 64)) for s, t in enumerate(targets)]
    out = sched.plan()
    assert len(out.run) == 2 and out.pixels == 2 * 64 * 64 and [j.status.value for j in jobs] == [
        "running", "running", "waiting", "waiting"]
    sched.execute(out)
    sched.update_from_output(out)
    sched.run(jobs)
    assert max(len(ids) for ids, _ in runs) == 2 and all(j.future.result() is not None for j in jobs)
    # an image larger than the whole budget still runs, alone
    sched.configure(pixel_budget=100)
    job = sched.submit(targets[0], 9, (1, 3, 64, 64))
    assert len(sched.plan().run) == 1 and job.status.value == "running"


def test_priority_preempts_and_the_parked_image_resumes_to_the_same_bits(models):
    """One slot: a priority-5 image arriving mid-run parks the priority-0 one, which resumes when
    the slot is free again; with deterministic sampling both results equal their solo decodes bit
    for bit."""
    dec = _decoder(models, deterministic=True)
    low_t, high_t = _targets(dec.codec, 2)
    want_low, want_high = _alone(dec, low_t, 1), _alone(dec, high_t, 2)
    sched = dec.batcher(max_slots=1)
    runs = _record_batches(sched)
    low = sched.submit(low_t, 1, (1, 3, 64, 64))
    for _ in range(3):
        sched.step()
    high = sched.submit(high_t, 2, (1, 3, 64, 64), priority=5)
    out = sched.plan()
    assert out.run == [high] and out.preempted == [low] and low.status.value == "preempted"
    stats = sched.stats()  # each image counted once: a parked image is preempted, not waiting
    assert (stats["waiting"], stats["running"], stats["preempted"], stats["held"]) == (0, 1, 1, 2)
    sched.execute(out)
    sched.update_from_output(out)
    sched.run([low, high])
    order = [ids[0] for ids, _ in runs]
    assert order == [id(low)] * 3 + [id(high)] * 6 + [id(low)] * 3  # high ran to its end, then low resumed
    assert low.preemptions == 1 and sched.stats()["preemptions"] == 1
    assert torch.equal(high.future.result().x, want_high) and torch.equal(low.future.result().x, want_low)
    assert low.status.value == high.status.value == "finished"


def test_equal_priorities_keep_their_slots_and_order_by_deadline(models):
    dec = _decoder(models)
    targets = _targets(dec.codec, 3)
    sched = dec.batcher(max_slots=1)
    first = sched.submit(targets[0], 0, (1, 3, 64, 64), timeout=1000)
    sched.step()
    later = sched.submit(targets[1], 1, (1, 3, 64, 64), timeout=500)
    urgent = sched.submit(targets[2], 2, (1, 3, 64, 64), timeout=100)
    out = sched.plan()
    assert out.run == [first] and not out.preempted  # a running image is not displaced by equals
    sched.execute(out)
    sched.update_from_output(out)
    while not first.future.done():
        sched.step()
    assert sched.plan().run == [urgent]  # earliest deadline first among the waiting
    assert later.status.value == "waiting"


def test_groups_take_turns_unless_one_holds_a_higher_priority(models):
    dec = _decoder(models)
    a, b = _targets(dec.codec, 1, size=64)[0], _targets(dec.codec, 1, size=128)[0]
    sched = dec.batcher(max_slots=4)
    runs = _record_batches(sched)
    ja = sched.submit(a, 0, (1, 3, 64, 64))
    jb = sched.submit(b, 1, (1, 3, 128, 128))
    for _ in range(4):
        sched.step()
    assert [ids for ids, _ in runs] == [[id(ja)], [id(jb)], [id(ja)], [id(jb)]]
    jc = sched.submit(b, 2, (1, 3, 128, 128), priority=3)
    for _ in range(3):
        sched.step()
    assert all(id(jc) in ids for ids, _ in runs[4:7]) and all(id(ja) not in ids for ids, _ in runs[4:7])


def test_admission_is_atomic_under_concurrent_submitters(models):
    """Eight threads race to submit into a queue of five: exactly five are admitted."""
    dec = _decoder(models)
    targets = _targets(dec.codec, 8)
    sched = dec.batcher(max_slots=2, max_queue=5)
    barrier, admitted, refused = threading.Barrier(8), [], []

    def submit(k):
        barrier.wait()
        try:
            admitted.append(sched.submit(targets[k], k, (1, 3, 64, 64)))
        except QueueFullError:
            refused.append(k)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 5 and len(refused) == 3 and sched.pending() == 5
    sched.run(admitted)
    assert sched.pending() == 0 and sched.stats()["finished"] == {"finished": 5}


def test_deadline_and_cancel_end_in_their_states(models):
    dec = _decoder(models)
    targets = _targets(dec.codec, 2)
    sched = dec.batcher(max_slots=2)
    late = sched.submit(targets[0], 0, (1, 3, 64, 64), timeout=0.0)
    gone = sched.submit(targets[1], 1, (1, 3, 64, 64))
    gone.cancel()
    sched.step()
    assert late.status.value == "deadline" and isinstance(late.future.exception(), DeadlineExceeded)
    assert gone.status.value == "cancelled" and gone.future.cancelled()
    assert sched.stats()["deadline_misses"] == 1 and sched.pending() == 0


def test_static_policy_runs_whole_batches_without_joins(models):
    dec = _decoder(models)
    targets = _targets(dec.codec, 3)
    sched = StepBatcher(dec.guided_sampler(), max_slots=2, policy="static", batch_wait_s=3600)
    runs = _record_batches(sched)
    first = sched.submit(targets[0], 0, (1, 3, 64, 64))
    assert not sched.step()  # not full, not waited long enough: the batch does not start
    second = sched.submit(targets[1], 1, (1, 3, 64, 64))
    sched.step()
    third = sched.submit(targets[2], 2, (1, 3, 64, 64))
    sched.batch_wait_s = 0.0
    sched.run([first, second, third])
    ids = [ids for ids, _ in runs]
    assert ids[:6] == [[id(first), id(second)]] * 6 and ids[6:] == [[id(third)]] * 6  # third never joined
