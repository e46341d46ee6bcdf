"""lungray.io.allocator: a decode worker reuses freed film-sized blocks instead of faulting in fresh pages."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from lungray.io.allocator import keep_freed_memory

FILM_BYTES = 40 << 20  # a float64 2,300 px film: above glibc's largest automatic mmap threshold (32 MB)


def page_faults_of_a_fresh_film() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    film = np.ones(FILM_BYTES // 8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del film
    return faults


def test_a_freed_film_block_is_reused_for_the_next_film() -> None:
    if not keep_freed_memory():
        pytest.skip("this C library has no mallopt (not glibc)")
    page_faults_of_a_fresh_film()  # the heap grows once
    # Without the thresholds every such block is a new mapping: 532 faults here (4 KB pages
    # with transparent huge pages on madvise), about 20 where they are always on.
    assert page_faults_of_a_fresh_film() < 8
    assert keep_freed_memory()  # once per process: a second call is the first's answer
