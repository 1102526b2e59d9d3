"""The Ray cluster as mecpe sees it: joining it, and checking before a step waits on it that the cluster can ever
give the step its workers.

Without the check, a step whose workers ask for something no node offers (``accelerator_type:H100`` on a cluster of
A100 and T4 nodes, a typo, more GPU actors than the node types can ever hold) waits forever: Ray keeps the request
pending in case a node shows up. Three cases:

* autoscaler v2 runs (``ray up`` starts it since Ray 2.50): the request is put to it
  (``ray.autoscaler.v2.sdk.request_cluster_resources``), and what it reports as infeasible for its node types fails
  the step at once, naming the missing resource; a feasible request is withdrawn again (the step's own tasks drive
  scaling);
* an autoscaler v1: it does not report what it cannot launch; nothing is checked;
* no autoscaler: the nodes there now are all there will be, so their total resources decide.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Mapping, Sequence

from mecpe import storage
from mecpe.errors import NodeLocalPathError, UnschedulableError

log = logging.getLogger(__name__)
_BASIC = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def connect(ray_address: str | None = None) -> None:
    """Use the Ray this process already joined, else ``ray.init(address=ray_address or $RAY_ADDRESS)``; a new local
    instance when neither is set. ``"local"`` says so to Ray: its default would join whatever cluster this machine's
    ``/tmp/ray/ray_current_cluster`` names, and a stale one (a killed ``ray start``) hangs the step on a GCS that
    is gone."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address or os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def _local(uri: str | None) -> bool:
    """A path on this machine's disk (made absolute by ``config.load_config``); hub ids and URIs are not."""
    return bool(uri) and not storage.is_remote(uri) and os.path.isabs(str(uri).removeprefix("file://"))


def other_machines() -> str | None:
    """Why workers of this Ray cluster may run on another machine than the driver ("3 nodes", "an autoscaler that
    adds nodes"), or None on a single node that stays one (the embedded default)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        return f"{len(alive)} nodes"
    status = _status()
    if (status is not None and status.autoscaling_state.autoscaler_state_version > 0) or _autoscaler_v1():
        return "an autoscaler that adds nodes"
    return None


def named_by(root: str, key: str, paths: Mapping[str, str | Sequence[str] | None]
             ) -> dict[str, str | Sequence[str] | None]:
    """``paths`` with those under ``root`` renamed to ``key``: the config key a user changes to move them (the
    pipeline's data and inference folders live under ``output_dir``)."""
    def under(value) -> bool:
        values = [value] if isinstance(value, str) else list(value or [])
        return bool(values) and all(str(v).startswith(str(root).rstrip("/") + "/") for v in values)

    out: dict[str, str | Sequence[str] | None] = {}
    for name, value in paths.items():
        if under(value):
            out.setdefault(key, root)
        else:
            out[name] = value
    return out


def check_shared_paths(paths: Mapping[str, str | Sequence[str] | None], shared_filesystem: bool = False) -> None:
    """Raise ``NodeLocalPathError`` when a path that workers read or write (``paths``: config key -> path) is on the
    driver's disk while the cluster has other machines. Separate machines do not share a disk: a worker on a T4 node
    would find nothing at the driver's ``/home/.../outputs`` (or write where nobody reads). ``shared_filesystem``: the
    user declares that every node mounts the same file system at these paths (NFS, EFS, ...)."""
    if shared_filesystem:
        return
    local = {key: value if isinstance(value, str) else next(v for v in value if _local(v))
             for key, value in paths.items()
             if value and (_local(value) if isinstance(value, str) else any(_local(v) for v in value))}
    if not local:
        return
    why = other_machines()
    if why is None:
        return
    named = ", ".join(f"{key}={value}" for key, value in local.items())
    raise NodeLocalPathError(
        f"{named}: a local path, and this Ray cluster has {why}: workers on other machines cannot read or write "
        f"the driver's disk. Use an s3:// URI (or another object store) for "
        f"{'it' if len(local) == 1 else 'each'}, or set storage.shared_filesystem=true if every node mounts the "
        f"same file system at that path.")


def _status():
    """The GCS's cluster status (autoscaler v2 state and cluster resource state), or None where unavailable."""
    import ray
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    try:
        client = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address)
        reply = GetClusterStatusReply()
        reply.ParseFromString(client.get_cluster_status(timeout_s=10))
        return reply
    except Exception:  # noqa: BLE001 - an older GCS: no autoscaler state to read
        return None


def _capacity(node_totals: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many bundles ``need`` the nodes can hold, each node on its own (a bundle never spans nodes)."""
    total = 0
    for res in node_totals:
        fits = min((math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=0)
        total += max(fits, 0)
    return total


def _names(need: dict[str, float]) -> str:
    special = [k for k in need if k not in _BASIC] or list(need)
    return ", ".join(repr(k) for k in special)


def check_schedulable(bundle: Mapping[str, float], what: str, count: int = 1, timeout_s: float = 60) -> None:
    """Raise ``UnschedulableError`` when the cluster can never hold ``count`` workers of ``bundle`` (the resources
    of one worker or actor), naming the resource at fault. Resources asked for in amounts of 0 are ignored."""
    import ray

    need = {k: float(v) for k, v in bundle.items() if v}
    if not need:
        return
    status = _status()
    if status is not None and status.autoscaling_state.autoscaler_state_version > 0:
        _ask_autoscaler(need, what, count, timeout_s)
        return
    if _autoscaler_v1():  # it does not say what it cannot launch
        log.info("autoscaler v1: cannot check ahead that %s can be scheduled", what)
        return
    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    if _capacity(nodes, need) >= count:
        return
    absent = sorted(k for k in need if not any(res.get(k, 0.0) > 0 for res in nodes))
    offered = "; ".join(str({k: v for k, v in sorted(res.items()) if not k.startswith("node:")}) for res in nodes)
    detail = (f"no node offers {', '.join(repr(a) for a in absent)}" if absent else
              f"its nodes hold only {_capacity(nodes, need)} of them")
    raise UnschedulableError(
        f"{what} needs {count} x {need}, which this cluster (no autoscaler) can never hold: {detail}. Its nodes: "
        f"{offered}. Fix the config (accelerator_type, resources, number of workers or actors) or add nodes.")


def _autoscaler_v1() -> bool:
    """An autoscaler v1 runs. Every head's monitor writes this status; a head started without a cluster config (``ray
    start``, local Ray) runs it read-only, and then each node's type is just ``node_<node id>``."""
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        report = json.loads(_internal_kv_get("__autoscaling_status") or b"{}").get("autoscaler_report") or {}
    except ValueError:
        return False
    mapping = report.get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def _same(bundle: Mapping[str, float], need: dict[str, float]) -> bool:
    return bundle.keys() == need.keys() and all(abs(bundle[k] - need[k]) < 1e-6 for k in need)


def _ours(constraints, need: dict[str, float]) -> bool:
    """Our request is the cluster's resource constraint. There is one per cluster and the last writer wins: Ray Data's
    detached ``AutoscalingCoordinator`` actor, left by any earlier Ray Data job, rewrites it every 20 s."""
    return any(_same(dict(req.request.resources_bundle), need) for c in constraints for req in c.resource_requests)


def _ask_autoscaler(need: dict[str, float], what: str, count: int, timeout_s: float) -> None:
    import ray
    from ray.autoscaler.v2.sdk import request_cluster_resources

    # The v2 call itself: ray.autoscaler.sdk.request_resources picks v1 or v2 once per process and caches it, so a
    # process that met a cluster without autoscaler v2 before would write its request where v2 never reads it.
    gcs = ray.get_runtime_context().gcs_address
    end = time.monotonic() + timeout_s
    try:
        while time.monotonic() < end:
            request_cluster_resources(gcs, [{"resources": need}] * count)
            if _autoscaler_verdict(need, what, count, end):
                return
            log.info("the request for %s was replaced before the autoscaler read it; asking again", what)
        log.warning("the autoscaler did not consider the request for %s within %.0f s; going on", what, timeout_s)
    finally:
        request_cluster_resources(gcs, [])


def _autoscaler_verdict(need: dict[str, float], what: str, count: int, end: float) -> bool:
    """Wait for the autoscaler to consider the request just stored: raise ``UnschedulableError`` when it reports it
    infeasible, True when it found node types for it, False when another writer replaced the request first (or time
    ran out)."""
    # Every read of the cluster state (ours and the autoscaler's) takes the next version number, so an autoscaler
    # report on a version above this read's comes from a read made after the request was stored. (A version read
    # before the request lets a report that never saw it pass as "feasible".)
    first = _status()
    seen = first.cluster_resource_state.cluster_resource_state_version if first is not None else 0
    while time.monotonic() < end:
        st = _status()
        if st is None:  # the GCS did not answer in time; ask again
            continue
        if _ours(st.autoscaling_state.infeasible_cluster_resource_constraints, need):
            raise UnschedulableError(
                f"{what} needs {count} x {need}, and the cluster's autoscaler reports that its node types "
                f"can never hold that: check {_names(need)} (offered by no node type, or by too few "
                f"nodes within max_workers). Fix the config (accelerator_type, resources, number of "
                f"workers or actors) or the node types (cluster.yaml, available_node_types).")
        if not _ours(st.cluster_resource_state.cluster_resource_constraints, need):
            return False  # replaced: a report from now on may be about the other writer's request
        if st.autoscaling_state.last_seen_cluster_resource_state_version > seen:
            # Still ours at a read after the autoscaler's, so ours at the autoscaler's too: it found node types.
            return True
        time.sleep(0.5)
    return False
