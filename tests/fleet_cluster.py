"""The fleet scenarios' cluster: `ray.cluster_utils.Cluster` nodes added, killed and drained by role, and what the GCS
says of them and of the actors (which worker process ran on which node)."""

from __future__ import annotations

import time
from collections import Counter

GPUS_PER_NODE = 2
CPUS_PER_NODE = 2


def since(t0: float) -> float:
    """Seconds since `t0` (monotonic), as the reports record times."""
    return round(time.monotonic() - t0, 2)


class Fleet:
    """The cluster, the nodes it ever had, and which worker process ran on which node."""

    def __init__(self):
        from ray.cluster_utils import Cluster

        # initialize_head=False: the object exists before any process starts, so a failed start is cleaned up.
        self.cluster = Cluster(initialize_head=False, shutdown_at_exit=True)
        self.nodes: list[dict] = []
        self.pid_node: dict[int, str] = {}  # worker pid -> node role
        self.actors: dict[str, dict] = {}  # actor id -> what the GCS last said of it
        self._handles: dict[str, object] = {}

    def add(self, role: str, t0: float) -> float:
        from ray._private import ray_constants

        started = time.monotonic()
        node = self.cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE, include_dashboard=False)
        seconds = round(time.monotonic() - started, 2)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        self._handles[role] = node
        self.nodes.append({"role": role, "node_id": node.node_id, "raylet_pid": raylet,
                           "start_seconds": seconds, "added_at_s": since(t0), "removed_at_s": None,
                           "exited_at_s": None, "marked_dead_at_s": None})
        return seconds

    def kill(self, role: str, t0: float) -> None:
        """SIGKILL every Ray process of the node (raylet, agents): a machine lost, no goodbye."""
        self.cluster.remove_node(self._handles.pop(role), allow_graceful=False)
        self._info(role)["removed_at_s"] = since(t0)

    def drain(self, role: str, deadline_s: float, reason: str) -> None:
        """Drain the node for preemption through the GCS, as the hidden `ray drain-node --reason
        DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` does (`ray.scripts.scripts.drain_node`: a
        `GcsClient.drain_node` call with the hex node id and the deadline in ms since the epoch)."""
        import ray
        from ray.core.generated import autoscaler_pb2

        client = ray._raylet.GcsClient(address=self.cluster.address)
        accepted, why = client.drain_node(self._info(role)["node_id"],
                                          autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                          reason, int((time.time() + deadline_s) * 1000))
        if not accepted:
            raise RuntimeError(f"the drain of {role} was refused: {why}")

    def alive(self, role: str) -> bool:
        """Whether the node's raylet still runs (it exits by itself once a drained node holds nothing)."""
        import psutil

        try:
            return psutil.Process(self._info(role)["raylet_pid"]).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def death(self, role: str) -> dict:
        """What the GCS recorded of the node's death: the reason's name and message."""
        from ray.core.generated import common_pb2

        node = next((n for n in self.cluster.global_state.node_table()
                     if n.get("NodeID") == self._info(role)["node_id"]), {})
        reason = node.get("DeathReason")
        return {"alive": node.get("Alive"), "message": node.get("DeathReasonMessage"),
                "reason": common_pb2.NodeDeathInfo.Reason.Name(reason) if isinstance(reason, int) else reason}

    def _info(self, role: str) -> dict:
        return next(n for n in self.nodes if n["role"] == role)

    def sample(self, t0: float) -> None:
        """Note the worker processes under each live raylet, and when the GCS marks a removed node dead."""
        import psutil

        for info in self.nodes:
            if info["removed_at_s"] is None and info["exited_at_s"] is None:
                if not self.alive(info["role"]):
                    info["exited_at_s"] = since(t0)
                    continue
                try:
                    for child in psutil.Process(info["raylet_pid"]).children(recursive=True):
                        self.pid_node.setdefault(child.pid, info["role"])
                except psutil.Error:
                    pass
            elif info["marked_dead_at_s"] is None:
                try:
                    table = self.cluster.global_state.node_table()
                except Exception:  # noqa: BLE001 - a developer API; tolerate its changes
                    table = []
                if any(n.get("NodeID") == info["node_id"] and not n.get("Alive") for n in table):
                    info["marked_dead_at_s"] = since(t0)

    def poll_actors(self, t0: float) -> None:
        """Every actor the GCS knows: its state and the node it is (or was) on; pending ones have no node."""
        try:
            table = self.cluster.global_state.actor_table(None)
        except Exception:  # noqa: BLE001 - a developer API; tolerate its changes
            return
        for actor_id, info in table.items():
            node = (info.get("Address") or {}).get("NodeID")
            entry = self.actors.setdefault(actor_id, {"class": info.get("ActorClassName"), "seen_at_s": since(t0),
                                                      "node_role": None, "pid": None, "states": []})
            entry["node_role"] = self.role_of(node) or entry["node_role"]
            entry["pid"] = info.get("Pid") or entry["pid"]
            if entry["pid"] and entry["node_role"]:
                self.pid_node.setdefault(entry["pid"], entry["node_role"])
            if not entry["states"] or entry["states"][-1][0] != info.get("State"):
                entry["states"].append((info.get("State"), since(t0)))

    def actor_summary(self) -> dict:
        """Counts of actors by (current state, node); PENDING_CREATION with no node = could not be placed."""
        counts = Counter(f"{a['states'][-1][0]}@{a['node_role'] or 'nowhere'}" for a in self.actors.values())
        return dict(sorted(counts.items()))

    def role_of(self, node_id: str | None) -> str | None:
        return next((n["role"] for n in self.nodes if n["node_id"] == node_id), None)

    def shutdown(self) -> None:
        self.cluster.shutdown()
