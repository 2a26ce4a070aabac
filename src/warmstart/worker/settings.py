"""Node settings with their defaults (``warmstart serve --help`` lists the flags)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.cluster.settings import ClusterSettings
from warmstart.qos.policy import QoSConfig
from warmstart.runtime.protocol import MAX_PAYLOAD

# Lambda's payload quotas.  The response limit is 100 bytes above the request limit: that
# is the figure Lambda enforces and names in Function.ResponseSizeTooLarge.
SYNC_REQUEST_BYTES = 6 << 20  # 6,291,456
SYNC_RESPONSE_BYTES = (6 << 20) + 100  # 6,291,556
EVENT_BYTES = 256 << 10  # 262,144
EVENT_BYTES_MAX = 1 << 20  # an Event payload may be raised to 1 MB, no further


def _physical_memory_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (ValueError, OSError):
        return 4096


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    region: str = "us-east-1"
    account: str = "000000000000"
    # Isolation: None = linux sandboxes when root + cgroups are there, else plain processes.
    isolation: str | None = None
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    pids_max: int = 256
    tmp_mb: int = 512
    cpu_quota: float | None = 1.0  # CPUs per instance (CFS quota); None = unlimited
    cgroup_pool: int = 8
    # Instances.
    max_concurrency: int = 64  # per function, when it has no reserved concurrency
    queue_depth: int = 128  # waiting invocations per function before 429
    memory_budget_mb: int = int(_physical_memory_mb() * 0.75)  # all instances' MemorySize
    cache_budget_mb: int = int(_physical_memory_mb() * 0.25)  # idle instances' real usage
    freeze_after_ms: float = 100.0  # idle this long -> frozen (0: freeze at once)
    idle_ttl_s: float = 600.0  # frozen this long -> evicted
    init_timeout_s: float = 10.0
    event_retries: int = 2  # Lambda's MaximumRetryAttempts default
    be_concurrency: int = 2 * (os.cpu_count() or 1)  # Event invocations and job items at once
    # Payload limits: a body over them is refused with 413 before it is read in full.
    max_request_bytes: int = SYNC_REQUEST_BYTES  # a synchronous invocation's payload
    max_response_bytes: int = SYNC_RESPONSE_BYTES  # what a synchronous invocation returns
    max_event_bytes: int = EVENT_BYTES  # an Event payload or job item, and its kept result
    max_job_bytes: int = 64 << 20  # a job's whole input
    # Retention: finished Event invocations and jobs (with their results) are deleted
    # this long after they finished; queued and running work is never deleted.
    event_retention_hours: float = 24.0
    # Function logs: data/logs/NAME.log is rotated to NAME.log.1 (and so on) past this
    # size, keeping this many rotated files.
    function_log_max_mb: float = 10.0
    function_log_backups: int = 1
    # The install cache.
    index_url: str | None = None  # None: the installer's default (PyPI)
    find_links: tuple[Path, ...] = ()  # local wheel directories
    offline: bool = False  # never touch the network: wheelhouse only
    # requirements.txt may name its own sources (indexes, links, URLs, includes); the
    # installer's egress rules apply all the same.
    allow_requirement_sources: bool = False
    # HOST or HOST:PORT the installer may reach whatever they resolve to (besides the
    # index's own host and public addresses on web ports).
    installer_allow_hosts: tuple[str, ...] = ()
    # The import cache (zygotes).
    zygotes: bool = True  # fork cold starts from pre-initialised zygotes (linux isolation)
    zygote_after: int = 2  # cold starts of a package set before it gets its own zygote
    # Build a package set's zygote as soon as a function with those packages is deployed
    # (the first invocations after a deploy fork from it), not only after zygote_after.
    zygote_at_deploy: bool = True
    zygote_budget_mb: int = 4096  # zygotes' PSS before LRU eviction
    zygote_uid: int = 200000  # the host uid a zygote runs as (uid 0 inside its namespace)
    # Container images.
    image_pull: str = "auto"  # auto: lazy when every layer is eStargz; lazy; full
    image_budget_mb: int = 20480  # the content store's disk budget (LRU beyond it)
    image_layers: str = "auto"  # full pulls: squashfs images where possible, or "dirs"
    insecure_registries: tuple[str, ...] = ()  # hosts reached over plain HTTP
    image_background_fetch: bool = True  # lazy mounts fetch the rest after the start
    # An image mounted here that no instance has used for this long is unmounted (its
    # functions become Inactive until the next invocation); 0: kept while a function uses it.
    image_idle_release_s: float = 0.0
    # Deploys without the deployer's registry credentials: False = the node's own pull
    # them (single tenant); True = only images anonymous pulls may read.
    require_deployer_credentials: bool = False
    registry_access_ttl_s: float = 60.0  # a deployer's successful access check is reused
    # Colocation (differentiated SLO).
    qos: bool = True  # the QoS loop: reclaimed capacity, BE suppression, LS burst, eviction
    qos_config: QoSConfig = field(default_factory=QoSConfig)
    min_be_concurrency: int = 1  # best-effort instances allowed even with nothing reclaimed
    # Cluster mode (None: a single node, state in SQLite).
    cluster: ClusterSettings | None = None

    def __post_init__(self) -> None:
        limits = {
            "max_request_bytes": self.max_request_bytes,
            "max_response_bytes": self.max_response_bytes,
            "max_event_bytes": self.max_event_bytes,
            "max_job_bytes": self.max_job_bytes,
        }
        for name, value in limits.items():
            if value <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, not {value}")
        if self.max_event_bytes > EVENT_BYTES_MAX:
            raise ValueError(
                f"max_event_bytes may be at most {EVENT_BYTES_MAX} (1 MB), "
                f"not {self.max_event_bytes}"
            )
        if not self.event_retention_hours > 0:
            raise ValueError(
                f"event_retention_hours must be positive, not {self.event_retention_hours}"
            )
        if not self.function_log_max_mb > 0:
            raise ValueError(f"function_log_max_mb must be positive, not {self.function_log_max_mb}")
        if self.function_log_backups < 1:
            raise ValueError(
                f"function_log_backups must be at least 1, not {self.function_log_backups}"
            )
        for name in ("max_request_bytes", "max_response_bytes"):
            if limits[name] > MAX_PAYLOAD:
                raise ValueError(
                    f"{name} may be at most {MAX_PAYLOAD} (what an instance's socket carries), "
                    f"not {limits[name]}"
                )
