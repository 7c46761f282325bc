"""Helpers shared by the benchmark scripts (run from the repository root as
`python benchmarks/<script>.py`, so this module is importable as `_common`)."""

import time


# The DEQ benchmark's rows that the targets compare (deq_train_step.py makes them,
# renderers.py finds them).
IK_DEFAULT = "implicit_kit Anderson(m=5) + ImplicitAdjoint(Picard), vmap (default)"
IK_PICARD = "implicit_kit Picard + ImplicitAdjoint(Picard), vmap"


def timeit(fn, repeats):
    """Milliseconds per call: the minimum over `repeats` timed calls after warm-up (the
    shared 2-core CPU machines are noisy; the minimum is the most repeatable statistic,
    see the `timeit` module's documentation). Every row is measured the same way."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def interleaved(fns, repeats):
    """Milliseconds per call of each of `fns`, measured together: after a warm-up call of
    each, `repeats` rounds call every function once in turn, and each gets the minimum
    over the rounds. A slow spell of the shared machine then hits every row alike, so
    the ratios between rows hold even when the absolute times drift."""
    for fn in fns:
        for _ in range(3):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [1e3 * b for b in best]
