"""The Ray cluster as mecpe sees it: joining it, and checking before a step waits on it that some node (or node type
the autoscaler may launch) can ever hold what the step asks for.

Without the check, a step whose workers ask for a resource that no node type offers (``accelerator_type:H100`` on a
cluster of A100 and T4 nodes, a typo) waits forever: Ray keeps the request pending in case a node shows up. With an
autoscaler the cluster's node types are known (the autoscaler reports them to the GCS as the cluster config), so the
step fails at once with the missing resource named; without one, the nodes there now are all there will be.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

log = logging.getLogger(__name__)


class UnschedulableError(RuntimeError):
    """No node and no node type of the cluster offers every resource a worker or actor asks for."""


def connect(ray_address: str | None = None) -> None:
    """Use the Ray this process already joined, else ``ray.init(address=ray_address or $RAY_ADDRESS)`` (a new local
    instance when neither is set)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def node_shapes() -> tuple[str, list[tuple[str, dict[str, float]]]]:
    """What the cluster can offer one bundle: ("node types", [(name, resources)]) from the autoscaler's cluster config
    when there is one, else ("nodes", [(node id, total resources)]) of the nodes alive now."""
    import ray

    try:
        config = ray._private.state.state.get_cluster_config()  # reported by the autoscaler
    except Exception:  # noqa: BLE001 - an older GCS or no autoscaler: fall back to the live nodes
        config = None
    groups = [] if config is None else [
        (g.name, {k: float(v) for k, v in g.resources.items()}) for g in config.node_group_configs if g.max_count != 0]
    if groups:
        return "node types", groups
    return "nodes", [(n["NodeID"][:12], dict(n.get("Resources") or {})) for n in ray.nodes() if n.get("Alive")]


def check_schedulable(bundle: Mapping[str, float], what: str) -> None:
    """Raise ``UnschedulableError`` naming the missing resource when no node / node type can hold ``bundle`` (the
    resources of one worker or actor). Resources asked for in amounts of 0 are ignored."""
    need = {k: float(v) for k, v in bundle.items() if v}
    kind, shapes = node_shapes()
    if not shapes or any(all(res.get(k, 0.0) >= v for k, v in need.items()) for _, res in shapes):
        return
    # the resources no shape has at all name the problem best; else the best-fitting shape's shortfall
    absent = sorted(k for k in need if not any(res.get(k, 0.0) > 0 for _, res in shapes))
    if absent:
        detail = f"no {kind[:-1]} offers {', '.join(repr(a) for a in absent)}"
    else:
        name, res = max(shapes, key=lambda s: sum(s[1].get(k, 0.0) >= v for k, v in need.items()))
        short = {k: res.get(k, 0.0) for k, v in need.items() if res.get(k, 0.0) < v}
        detail = f"the closest {kind[:-1]} {name!r} has only {short}"
    offered = "; ".join(f"{name}: {dict(sorted(res.items()))}" for name, res in shapes)
    raise UnschedulableError(
        f"{what} asks for {need} per worker, which the cluster can never schedule: {detail}. The cluster's {kind}: "
        f"{offered}. Fix the config (scaling.accelerator_type / inference.accelerator_type, resources) or add a node "
        f"type that offers it (cluster.yaml, available_node_types).")
