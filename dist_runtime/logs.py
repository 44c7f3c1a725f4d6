"""Where each rank is, for finding a hang: `DIST_RUNTIME_LOG=debug` (or info) makes every rank
log its start-up stages and steps on stderr, each line tagged with its rank. Off by default."""

from __future__ import annotations

import logging
import os


def configure(rank: int) -> None:
    level = os.environ.get("DIST_RUNTIME_LOG")
    if level:
        logging.basicConfig(level=level.upper(), force=True,
                            format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
