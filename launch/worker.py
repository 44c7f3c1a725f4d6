"""A rank other than 0, whoever started it: join the job and serve rank 0's calls. The local
spawner starts one as `python -m launch.worker CONFIG` (the job's RuntimeConfig as JSON)."""

import faulthandler
import signal
import sys

from dist_runtime import logs
from dist_runtime.errors import DistRuntimeError
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.world import run_worker
from launch.rank_info import from_environment


def serve_rank(config: RuntimeConfig, info: RankInfo) -> int:
    """Join as rank `info.rank` and serve rank 0's calls until it stops the job; the exit code
    (1 where this rank could not join: rank 0 reports why)."""
    try:
        run_worker(config, info)
    except DistRuntimeError:
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where a stuck rank is
    info = from_environment()
    if info is None or len(sys.argv) != 2:
        print("usage: python -m launch.worker CONFIG_JSON (as rank 0 starts it, with the rank in the environment)",
              file=sys.stderr)
        return 2
    logs.configure(info.rank)
    return serve_rank(RuntimeConfig.from_json(sys.argv[1]), info)


if __name__ == "__main__":
    sys.exit(main())
