"""Processes that should not take a busy core from the task that woke them (SCHED_BATCH).

The model owner hands each front-end process its answers, and the front ends wake for every
request the network brings. Under Linux's fair scheduler a task woken on a busy core usually
takes that core at once (wake-up preemption): the owner's event loop, having sent a front end
its answers, was put aside mid-turn for the front end to run (under JPEG load on 2 busy cores
such a send took 116 us of the owner's wall time, for a few us of work). A task under
SCHED_BATCH gets the same share of the CPU (its nice value is unchanged) but does not preempt
on waking: it runs when the core's current task blocks or its slice ends. Where a core is idle
nothing changes: a woken task goes there.

Front ends are the throughput work of the server (parsing, decoding); the owner feeds the
accelerator and should never wait for them, so front ends run under SCHED_BATCH and the owner's
threads stay as they are (a model instance's thread must notice its batch's end at once). A
front end sets it for all its threads as it starts; those it starts later inherit it. Linux
only; lowering to SCHED_BATCH needs no privilege; elsewhere nothing happens.
"""

from __future__ import annotations

import os


def yield_on_wakeup() -> None:
    """Put every thread of this process under SCHED_BATCH (those started at import too, such as
    a BLAS pool's); threads started later inherit it. Where the system has no such policy or
    refuses it, the threads stay as they are."""
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # the calling thread
    for tid in threads:
        try:
            setter(tid, policy, os.sched_param(0))
        except OSError:  # refused, or a thread that ended since it was listed: the others still
            continue
