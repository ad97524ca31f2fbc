"""BoundedQueue: how far the host may run ahead of the device before a stop signal is honoured."""

from cgn_jax.train.signals import BoundedQueue


def _run(step_seconds: float, steps: int, seconds: float = 5.0):
    """Steps that each take `step_seconds` on a fake clock; returns the queue and the steps at which it waited."""
    now = [0.0]
    waits = []
    queue = BoundedQueue(seconds, block=lambda out: waits.append(out), clock=lambda: now[0])
    for i in range(1, steps + 1):
        now[0] += step_seconds  # what waiting for the queued steps would have cost
        queue.after_step(i)
    return queue, waits


def test_slow_steps_are_waited_for_every_few_seconds_of_work():
    queue, waits = _run(1.0, 40)
    assert queue.every == 5
    # the first two waits start the clock and measure a step; then every 5 steps (5 s of work)
    assert waits[:2] == [1, 2] and all(b - a == 5 for a, b in zip(waits[1:], waits[2:]))


def test_fast_steps_are_never_held_back():
    queue, waits = _run(0.002, 5000)
    assert queue.every == 2500 and waits == [1, 2, 2502]


def test_the_period_follows_a_change_in_step_time():
    now = [0.0]
    queue = BoundedQueue(4.0, block=lambda out: None, clock=lambda: now[0])
    for _ in range(3):
        now[0] += 0.01
        queue.after_step(None)
    assert queue.every == 400
    for _ in range(400):  # the same steps become 100 times slower (another job took the cores)
        now[0] += 1.0
        queue.after_step(None)
    assert queue.every == 4
