"""Crash hooks for resume tests: `POOLSCOUT_CRASH_AT=<point>` SIGKILLs the process there.

Points are "<cycle>:<stage>:before", "<cycle>:<stage>:after" for the loop's stages
(seed, train, evaluate, score, select, label) and "<cycle>:score:mid" half way through
local scoring. A SIGKILL runs no cleanup, exactly like an OOM kill or a lost node.
"""
from __future__ import annotations

import os
import signal

ENV = "POOLSCOUT_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
