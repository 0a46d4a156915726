"""mpu/cpp_extension.py: a build lock left by a killed process does not make later processes wait forever."""
from __future__ import annotations

import logging
import os
import time

from mpu import cpp_extension


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    stale, fresh = tmp_path / "stale" / "lock", tmp_path / "fresh" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.write_text("")
    old = time.time() - cpp_extension.STALE_LOCK_SECONDS - 5
    os.utime(stale, (old, old))
    with caplog.at_level(logging.WARNING, logger="cpm2"):
        cpp_extension._remove_stale_lock(stale)
        cpp_extension._remove_stale_lock(fresh)  # another process may be building right now: wait for it
        cpp_extension._remove_stale_lock(tmp_path / "none" / "lock")  # no lock: nothing to do
    assert not stale.exists() and fresh.exists()
    warnings = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert len(warnings) == 1 and str(stale) in warnings[0]
