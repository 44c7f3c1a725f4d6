"""The Ray executor: ranks 1..N-1 as Ray actors in one placement group, rank 0 in the caller's
process (as vLLM's driver worker). Each actor is handed the job's RuntimeConfig and a RankInfo
that points at rank 0's address and port; from there the ranks meet over TCP exactly as
spawned ranks do."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading

from dist_runtime.engine import Engine
from dist_runtime.errors import DistRuntimeError
from dist_runtime.executor import Executor
from dist_runtime.rank_info import RankInfo
from dist_runtime.runtime_config import RuntimeConfig
from dist_runtime.world import run_worker
from launch.local import free_port
from launch.watch import StartupWatch


class LaunchError(DistRuntimeError):
    """The Ray cluster cannot hold the job's ranks, or this host is not one of its nodes."""


try:
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:  # an optional extra
    raise LaunchError("the Ray launcher needs ray: pip install 'dist-runtime[ray]'") from e

ENV_TIMEOUT = "DIST_RUNTIME_RAY_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300.0  # long enough for an autoscaler to add a node


@ray.remote
class RankActor:
    """One rank other than 0, for as long as `run` lasts."""

    def run(self, config: RuntimeConfig, info: RankInfo) -> str | None:
        """None once rank 0 ends the job, else why this rank could not serve (a rank that fails
        before the ranks meet has no other way to say it)."""
        try:
            run_worker(config, info)
        except DistRuntimeError as e:
            return str(e)
        return None


def node_local_ranks(bundle_nodes: list[str]) -> list[tuple[int, int, int]]:
    """(local rank, ranks on that node, node index) for each rank, given the node of each rank's
    bundle: a node's ranks count 0, 1, ... in rank order, nodes in the order of their first rank."""
    nodes = list(dict.fromkeys(bundle_nodes))
    return [(bundle_nodes[:rank].count(node), bundle_nodes.count(node), nodes.index(node))
            for rank, node in enumerate(bundle_nodes)]


class RayExecutor(StartupWatch, Executor):
    """Ranks 1..N-1 as Ray actors, each handed the job's RuntimeConfig and its RankInfo.

    Bundle r of the placement group is rank r's ({"CPU": 1}, plus {"GPU": 1} on cuda). Bundle 0
    starts no actor: it reserves rank 0's share on the driver's node, where rank 0 runs in this
    process, so Ray hands that CPU (or GPU) to no one else; a sliver of the driver node's own
    resource (`node:IP`) pins it there. On cuda every rank takes GPU local_rank of its node, as
    under mpirun, so Ray is told not to narrow CUDA_VISIBLE_DEVICES per actor."""

    def __init__(self, config: RuntimeConfig, engine: Engine) -> None:
        super().__init__(config, engine)
        self.actors: list = []
        self.runs: list = []
        self._pg = None
        self._watcher: threading.Thread | None = None
        self._own_ray = False

    def _launch(self) -> RankInfo:
        self._own_ray = not ray.is_initialized()  # a caller's own Ray session is theirs to end
        if self._own_ray:
            try:
                ray.init(address=self.config.ray_address, logging_level=logging.WARNING)
            except ConnectionError as e:
                raise LaunchError(f"no Ray cluster at address {self.config.ray_address!r}: {e}") from e
        world_size, gpu = self.engine.world_size, self.config.device.startswith("cuda")
        bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
        self._pg = self._reserve(world_size, bundle, float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))
        nodes = placement_group_table(self._pg)["bundles_to_node_id"]
        where = node_local_ranks([nodes[rank] for rank in range(world_size)])
        addr, port = ray.util.get_node_ip_address(), free_port()  # rank 0 hosts the store, here
        secret = secrets.token_hex(32)  # travels inside each actor's RankInfo
        infos = [RankInfo(rank, world_size, *where[rank], master_addr=addr, master_port=port, transport="tcp",
                          secret=secret) for rank in range(world_size)]
        config = dataclasses.replace(self.config, engine_dir=os.path.abspath(self.config.engine_dir))
        options = {"num_cpus": 1, "num_gpus": 1 if gpu else 0}
        if gpu:
            options["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
        for info in infos[1:]:
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=info.rank)
            actor = RankActor.options(scheduling_strategy=strategy, **options).remote()
            self.actors.append(actor)
            self.runs.append(actor.run.remote(config, info))
        self._start_watch("dist-runtime-ray-workers")
        return infos[0]

    def _joined(self) -> None:
        self.hand_over()

    @staticmethod
    def _reserve(world_size: int, bundle: dict[str, float], timeout_s: float):
        """A ready placement group of one bundle per rank, bundle 0 on this node."""
        ip = ray.util.get_node_ip_address()
        this_node = f"node:{ip}"  # the resource Ray gives this node alone
        if this_node not in ray.cluster_resources():
            raise LaunchError(f"this host ({ip}) is not a node of the Ray cluster; rank 0 runs in this process, "
                              "so start it on one of the cluster's nodes")
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
        # STRICT_PACK keeps every rank on this host (TP traffic stays in the node); when this node
        # cannot hold them all it would never be ready, so PACK then fills as few nodes as it can.
        strategy = "STRICT_PACK" if all(node.get(k, 0) >= v * world_size for k, v in bundle.items()) else "PACK"
        pg = placement_group([bundle | {this_node: 0.001}] + [bundle] * (world_size - 1), strategy=strategy)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if ready:
            return pg
        remove_placement_group(pg)
        total, free = ray.cluster_resources(), ray.available_resources()
        shortfall = ", ".join(f"{v * world_size:g} {k} needed, the cluster has {total.get(k, 0):g} "
                              f"({free.get(k, 0):g} free)" for k, v in bundle.items())
        raise LaunchError(f"Ray could not place {world_size} ranks ({world_size} x {bundle}, {strategy}, rank 0 "
                          f"on {ip}) within {timeout_s:g} s: {shortfall}; set {ENV_TIMEOUT} to wait longer")

    def _ended(self) -> str | None:
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return None
        return f"rank {self.runs.index(done[0]) + 1} (a Ray actor) ended: {self._outcome(done[0])}"

    @staticmethod
    def _outcome(ref) -> str:
        try:
            return ray.get(ref) or "it left the job"
        except ray.exceptions.RayTaskError as e:  # run_worker raised
            return f"{type(e.cause).__name__}: {e.cause}"
        except ray.exceptions.RayError as e:  # the actor died
            return str(e).strip().splitlines()[0].rstrip(".")

    def _end_all(self) -> None:
        for actor in self.actors:
            ray.kill(actor)

    def kill(self) -> None:
        """End every actor at once (a hung one too); from any thread."""
        self.stopping = True
        self._end_all()

    def _reap(self, timeout_s: float) -> None:
        """Wait for the actors' runs (they end when rank 0 stops the job), then end the actors
        and free their bundles."""
        self.stopping = True
        if self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        self._release()

    def _release(self) -> None:
        """Every path ends here: actors killed, bundles freed, our Ray connection closed."""
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()  # it sees `stopping` within a poll; it must not call Ray after shutdown
        self._end_all()
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._restore_signals()
        if self._own_ray and ray.is_initialized():
            ray.shutdown()
