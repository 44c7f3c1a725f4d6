"""Entry point of a rank started by the local spawner: join the world and serve steps."""

import argparse
import faulthandler
import signal
import sys

from dist_runtime import logs
from dist_runtime.errors import DistRuntimeError
from dist_runtime.liveness import DEFAULT_RANK_TIMEOUT_S
from dist_runtime.world import run_worker
from launch.rank_info import from_environment


def main() -> int:
    parser = argparse.ArgumentParser(description="a dist-runtime rank (started by rank 0)")
    parser.add_argument("engine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--kv-cache-fraction", type=float, default=0.9)
    parser.add_argument("--rank-timeout", type=float, default=DEFAULT_RANK_TIMEOUT_S)
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows where a stuck rank is
    info = from_environment()
    if info is None:
        print("launch.worker: started without a launcher environment", file=sys.stderr)
        return 2
    logs.configure(info.rank)
    try:
        run_worker(args.engine, info, args.device, not args.no_verify, args.kv_cache_fraction, args.rank_timeout)
    except DistRuntimeError:
        return 1  # rank 0 reports it
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
