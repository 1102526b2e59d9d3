"""Multi-node Ray clusters on this one machine, with the node types of ``cluster.yaml``.

How a node type of ``cluster.yaml`` becomes a local node: its resources are kept (``GPU``, ``accelerator_type:A100`` /
``accelerator_type:T4`` and their counts) except ``CPU``, scaled to what a 2-core machine can run (``LOCAL_CPUS``).
Ray schedules ``GPU`` by count and needs no device for it: inference actors ask for ``GPU: 1`` and
``accelerator_type:T4`` exactly as on the cluster (``jobs/configs/ecf-llama2-13b.yaml``) and, finding no CUDA, run on
the CPU. Training workers ask for ``accelerator_type:A100`` and a CPU instead of a GPU (``scaling.use_gpu=false``):
with ``use_gpu`` Ray Train selects the NCCL backend, which the CPU build of PyTorch lacks. So the GPU count of the
A100 node type is declared but not consumed; the accelerator resource is what places the workers.

Two kinds of cluster:

* ``StaticCluster``: ``ray.cluster_utils.Cluster`` (one raylet and object store per node; ``add_node`` /
  ``remove_node``), each node with its own ``HOME`` (so its own model cache) and ``TMPDIR`` (scratch), as on separate
  machines. They still share this machine's disk, so a worker could read a file that on the cloud would exist only on
  the driver's machine; every node's processes run with ``tests/fixtures/open_tracer.c`` preloaded, which records
  each file they open under the driver's folders (``driver_only``), and ``driver_reads()`` lists them.
* ``autoscaling_config``: the autoscaler's fake multi-node provider (the real autoscaler launching and terminating
  local nodes), for a head started with ``ray start --head --autoscaling-config`` (``tests/_ray_head.py``).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_CPUS = {"head": 0, "a100": 2, "t4": 1}  # per node, on this 2-core machine
OBJECT_STORE = 100 * 2**20


def node_types() -> dict[str, dict]:
    """cluster.yaml's node types with local resources: {name: {"resources", "min_workers", "max_workers"}}."""
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    out = {}
    for name, t in cfg["available_node_types"].items():
        res = {k: float(v) for k, v in t["resources"].items()}
        res["CPU"] = float(min(res.get("CPU", 0), LOCAL_CPUS[name]))
        out[name] = {"resources": res, "min_workers": t.get("min_workers", 0), "max_workers": t.get("max_workers", 0)}
    assert cfg["head_node_type"] == "head"
    return out


def node_args(resources: dict[str, float]) -> dict:
    """``Cluster.add_node`` arguments for a node with these resources."""
    res = dict(resources)
    return {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res,
            "object_store_memory": OBJECT_STORE}


def build_open_tracer(out_dir: Path) -> Path:
    """Compile ``tests/fixtures/open_tracer.c`` (gcc, which the project's machines have) into ``out_dir``."""
    out = out_dir / "open_tracer.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(REPO / "tests" / "fixtures" / "open_tracer.c"),
                    "-ldl"], check=True, capture_output=True)
    return out


class StaticCluster:
    """A head (resources of cluster.yaml's head type) plus nodes of the given types, added and removed by the test.
    Every node gets its own ``HOME`` and ``TMPDIR`` under ``root``: ``~`` in ``model.cache_dir`` is a per-node cache.
    ``driver_only``: folders that on the cloud exist only on the driver's machine; the nodes' opens of files there are
    recorded (``driver_reads``). The head is the driver's machine (``ray job submit`` runs the driver there)."""

    def __init__(self, root: Path, dashboard: bool = True, driver_only: tuple[Path, ...] = ()):
        from ray.cluster_utils import Cluster

        self.root = root
        self.driver_only = tuple(str(Path(p).resolve()) for p in driver_only)
        self.tracer = build_open_tracer(root)
        self.types = node_types()
        self.nodes: dict[str, tuple[str, object]] = {}  # node id -> (type, Node)
        self.homes: dict[str, Path] = {}
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **node_args(self.types["head"]["resources"]), "include_dashboard": dashboard,
            "dashboard_host": "127.0.0.1"})
        self.head_id = self.cluster.head_node.node_id

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self, node_type: str) -> str:
        n = len(self.homes)
        home, scratch = self.root / f"home-{node_type}-{n}", self.root / f"scratch-{node_type}-{n}"
        home.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        # Ray's token authentication: without RAY_AUTH_TOKEN_PATH (tests/conftest.py sets it) a node would look for
        # ~/.ray/auth_token under its own HOME; it is pointed at the head's token, as a cloud node gets the cluster's.
        token = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        # The tracer goes in through Ray's own preload setting: Ray sets LD_PRELOAD of the processes it starts from
        # RAY_JEMALLOC_LIB_PATH (overriding env_vars), and the raylet drops it for its workers unless
        # RAY_LD_PRELOAD_ON_WORKERS=1; both are read from this process's environment while the node starts.
        saved = {k: os.environ.get(k) for k in ("RAY_JEMALLOC_LIB_PATH", "RAY_LD_PRELOAD_ON_WORKERS")}
        os.environ.update({"RAY_JEMALLOC_LIB_PATH": str(self.tracer), "RAY_LD_PRELOAD_ON_WORKERS": "1"})
        try:
            node = self.cluster.add_node(
                **node_args(self.types[node_type]["resources"]),
                env_vars={"HOME": str(home), "TMPDIR": str(scratch), "RAY_AUTH_TOKEN_PATH": token,
                          "MECPE_TRACE_PREFIXES": ":".join(self.driver_only),
                          "MECPE_TRACE_LOG": str(self.root / f"opens-{node_type}-{n}.log")})
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        self.nodes[node.node_id] = (node_type, node)
        self.homes[node.node_id] = home
        return node.node_id

    def driver_reads(self) -> list[str]:
        """"node log: pid<TAB>path" for every file a node's process opened under ``driver_only``, all nodes so far."""
        return [f"{log.name}: {line}" for log in sorted(self.root.glob("opens-*.log"))
                for line in log.read_text().splitlines()]

    def of_type(self, node_type: str) -> list[str]:
        return [nid for nid, (t, _) in self.nodes.items() if t == node_type]

    def preempt(self, node_id: str, deadline_s: float = 3.0, wait_s: float = 0.0) -> None:
        """What a spot termination notice does: drain the node through the GCS with the preemption reason and a
        deadline (as Ray's autoscaler does), let ``wait_s`` of the notice pass, then the node is gone (all its
        processes, its object store, its disk as far as the run is concerned)."""
        drain(self.address, node_id, deadline_s)
        time.sleep(wait_s)
        self.remove(node_id)

    def remove(self, node_id: str) -> None:
        """The node is gone: all its processes killed at once, its object store with them. ``remove_node`` kills the
        node's Ray daemons; its worker processes (the raylet's children) would live on until they notice, and could
        still write to S3, which a reclaimed machine's cannot: they are killed with it."""
        import psutil

        _, node = self.nodes.pop(node_id)
        workers = []
        for info in node.all_processes.get("raylet", []):
            try:
                workers += psutil.Process(info.process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        self.cluster.remove_node(node, allow_graceful=False)
        for proc in workers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def shutdown(self) -> None:
        self.cluster.shutdown()


def drain(gcs_address: str, node_id: str, deadline_s: float) -> None:
    import ray
    from ray.core.generated import autoscaler_pb2

    client = ray._raylet.GcsClient(address=gcs_address)
    accepted, rejection = client.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot instance termination notice (test)", int(time.time() * 1000 + deadline_s * 1000))
    assert accepted, rejection


def autoscaling_config(gcs_address: str, idle_timeout_minutes: float = 0.1) -> dict:
    """The fake multi-node provider's config with cluster.yaml's worker node types (min_workers 0 as there)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE

    types = node_types()
    # the fake provider tags its head with its own type name; it gets cluster.yaml's head resources
    available = {FAKE_HEAD_NODE_TYPE: {"resources": types["head"]["resources"], "node_config": {}, "max_workers": 0}}
    for name in ("a100", "t4"):
        t = types[name]
        available[name] = {"resources": {**t["resources"], "object_store_memory": OBJECT_STORE}, "node_config": {},
                           "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    return {
        "cluster_name": "mecpe-fake", "max_workers": sum(t["max_workers"] for t in types.values()),
        # Ray's own fake provider, named as an external module: the installed wheel lacks the defaults file that
        # the "fake_multinode" type reads (fake_multi_node/example.yaml)
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address,
                     "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID},
        "available_node_types": available, "head_node_type": FAKE_HEAD_NODE_TYPE, "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes, "docker": {}, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def autoscaler_env() -> dict[str, str]:
    """Environment of a head that runs the autoscaler v2 with the fake provider, as ``ray up`` starts it since Ray
    2.50 (v2 by default; the head's instance id and node type name set)."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE

    return {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "RAY_NODE_TYPE_NAME": FAKE_HEAD_NODE_TYPE}


def node_type_of(resources: dict) -> str:
    """Which cluster.yaml type a live node is, from its resources."""
    if resources.get("accelerator_type:A100"):
        return "a100"
    if resources.get("accelerator_type:T4"):
        return "t4"
    return "head"


def actor_nodes(class_substring: str) -> dict[str, set[str]]:
    """{actor class name: node ids} of every actor (alive or dead) whose class contains ``class_substring``, from
    Ray's state API."""
    from ray.util.state import list_actors

    from _faults import state_address

    out: dict[str, set[str]] = {}
    for a in list_actors(address=state_address(), detail=True, limit=10_000, raise_on_missing_output=False):
        if class_substring in (a.class_name or "") and a.node_id:
            out.setdefault(a.class_name, set()).add(a.node_id)
    return out


def env_home() -> str:
    return os.environ.get("HOME", "")
