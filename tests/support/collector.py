"""The garbage collector held off for a block, so what a test checks is freed by reference counting alone
(or left for the one collection the test makes)."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def collector_off():
    """No automatic collection inside the block; the collector's state before it is restored after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
