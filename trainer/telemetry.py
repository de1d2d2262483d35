"""Per-node system telemetry for the job's MLflow run.

MLflow's own system-metrics monitor logs cumulative network megabytes (reset at every
restart) and disk *space*. This module keeps what it does well (its CPU, memory and NVML GPU
monitors, the `system/<node>/` prefix) and adds rates from kernel counter deltas:

    network   /proc/net/dev       -> Gbit/s received and transmitted, per interface and in total
    disk      /proc/diskstats     -> MB/s and IOPS read and written, per block device
    host      psutil (via MLflow) -> cpu_percent, memory_percent
    GPU       NVML (via MLflow)   -> utilisation %, memory %, power W

One `NodeMonitor` per node (in local rank 0) samples every `interval_s` in a daemon thread
and hands each sample to a sink. Rank 0's sink is the metric logger; the other nodes' sink
is a `StoreRelay`, which carries the samples to rank 0 over the torch.distributed store, so
that every node's series lands in the one MLflow run whatever the tracking URI is. See
docs/telemetry.md.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("trainer.telemetry")

Sink = Callable[[dict[str, float], int], None]  # (metrics, timestamp in ms since the epoch)

SECTOR_BYTES = 512  # /proc/diskstats counts 512-byte sectors whatever the device's block size


class TelemetryConfig(BaseModel):
    """System metrics of every node (network, disk, CPU, memory, GPU) in the job's MLflow run."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="sample system metrics on every node (local rank 0 of each)")
    interval_s: float = Field(10.0, ge=0.2, description="seconds between two samples; rates are averages over it")
    interfaces: list[str] = Field(
        default_factory=list,
        description="network interfaces to report (shell globs); empty: all but `exclude_interfaces`",
    )
    exclude_interfaces: list[str] = Field(["lo"], description="network interfaces never reported (shell globs)")
    disks: list[str] = Field(
        default_factory=list,
        description="block devices to report (shell globs, names as in /proc/diskstats); empty: whole disks "
                    "backed by a device (no partitions, loop, ram, zram or device-mapper volumes)",
    )
    exclude_disks: list[str] = Field(default_factory=list, description="block devices never reported (shell globs)")
    nvml: Literal["auto", "on", "off"] = Field(
        "auto", description="NVIDIA GPU metrics through NVML (nvidia-ml-py): auto = when importable and a GPU "
                            "answers; on = also warn when not; off = never"
    )
    max_pending_samples: int = Field(
        360, gt=0, description="samples a node keeps in the store for rank 0 to collect; beyond, new ones are dropped"
    )
    peak_flops_per_device: float | None = Field(
        None, gt=0, description="peak FLOP/s of one device (e.g. 989e12 for an H100's dense bf16): logs train/mfu "
                                "(model FLOPs utilisation); None: not logged"
    )
    busbw_probe_mb: int = Field(
        64, ge=0, description="MB all-reduced at every run start to log system/allreduce_busbw_gbps "
                              "(nccl-tests' bus bandwidth); 0: no probe"
    )


# ---- counters -------------------------------------------------------------------------

@dataclass(frozen=True)
class NetCounters:
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class DiskCounters:
    reads: int  # completed read requests
    read_bytes: int
    writes: int  # completed write requests
    write_bytes: int


def parse_net_dev(text: str) -> dict[str, NetCounters]:
    """/proc/net/dev -> {interface: counters}. Two header lines, then `name: 8 rx fields, 8 tx fields`."""
    counters = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        values = rest.split()
        if not sep or len(values) < 16:
            continue
        counters[name.strip()] = NetCounters(rx_bytes=int(values[0]), tx_bytes=int(values[8]))
    return counters


def parse_diskstats(text: str) -> dict[str, DiskCounters]:
    """/proc/diskstats -> {device: counters}. Fields 4-10: reads, merged, sectors read, ms,
    writes, merged, sectors written (Documentation/admin-guide/iostats.rst)."""
    counters = {}
    for line in text.splitlines():
        values = line.split()
        if len(values) < 10:
            continue
        counters[values[2]] = DiskCounters(
            reads=int(values[3]), read_bytes=int(values[5]) * SECTOR_BYTES,
            writes=int(values[7]), write_bytes=int(values[9]) * SECTOR_BYTES,
        )
    return counters


def get_rates(previous: dict[str, Any], current: dict[str, Any], dt_s: float) -> dict[str, dict[str, float]]:
    """Per-second rates of each counter field of the devices present in both samples.

    A device whose counters went down (interface re-created, module reloaded, 32-bit wrap)
    is left out of this sample: a negative delta is no rate, and a delta against the
    wrapped value would be a huge spike.
    """
    rates = {}
    for name, now in current.items():
        before = previous.get(name)
        if before is None or dt_s <= 0:
            continue
        deltas = [b - a for a, b in zip(astuple(before), astuple(now))]
        if min(deltas) < 0:
            continue
        rates[name] = {f.name: d / dt_s for f, d in zip(fields(now), deltas)}
    return rates


# ---- which devices --------------------------------------------------------------------

def select_names(names, include: list[str], exclude: list[str]) -> list[str]:
    """Names matching any `include` glob (all when empty) and no `exclude` glob, sorted."""
    def matches(name: str, globs: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    return sorted(n for n in names if (not include or matches(n, include)) and not matches(n, exclude))


def is_whole_disk(name: str, sys_block: Path = Path("/sys/block")) -> bool:
    """A disk with a device behind it: partitions are not in /sys/block, and loop, ram, zram,
    dm-* and md* have no `device` link there (they would count the same I/O twice or none)."""
    return (sys_block / name.replace("/", "!") / "device").exists()


def select_disks(names, cfg: TelemetryConfig, sys_block: Path = Path("/sys/block")) -> list[str]:
    candidates = names if cfg.disks else [n for n in names if is_whole_disk(n, sys_block)]
    return select_names(candidates, cfg.disks, cfg.exclude_disks)


# ---- metric names and units -------------------------------------------------------------

def get_node_name(env=os.environ) -> str:
    """`node<N>` from torchrun's GROUP_RANK (stable across restarts and hosts), unless
    MLflow's MLFLOW_SYSTEM_METRICS_NODE_ID names the node."""
    return env.get("MLFLOW_SYSTEM_METRICS_NODE_ID") or f"node{env.get('GROUP_RANK', '0')}"


def safe_name(device: str) -> str:
    """A device name as one component of a metric name: MLflow allows letters, digits and
    `_ - . : /` and space; `/` would split the component."""
    return re.sub(r"[^\w.\-]", "_", device)


def network_metrics(prefix: str, rates: dict[str, dict[str, float]], names: list[str]) -> dict[str, float]:
    """Gbit/s (1e9 bits) per interface; the total only when every selected interface has a rate."""
    metrics = {}
    for name in names:
        if name in rates:
            metrics[f"{prefix}network/{safe_name(name)}/rx_gbps"] = rates[name]["rx_bytes"] * 8 / 1e9
            metrics[f"{prefix}network/{safe_name(name)}/tx_gbps"] = rates[name]["tx_bytes"] * 8 / 1e9
    if names and all(n in rates for n in names):
        metrics[f"{prefix}network_rx_gbps"] = sum(rates[n]["rx_bytes"] for n in names) * 8 / 1e9
        metrics[f"{prefix}network_tx_gbps"] = sum(rates[n]["tx_bytes"] for n in names) * 8 / 1e9
    return metrics


def disk_metrics(prefix: str, rates: dict[str, dict[str, float]], names: list[str]) -> dict[str, float]:
    """MB/s (1e6 bytes) and IOPS (completed requests/s) per device; totals as for the network."""
    metrics = {}
    for name in names:
        if name in rates:
            rate, device = rates[name], f"{prefix}disk/{safe_name(name)}"
            metrics[f"{device}/read_mb_s"] = rate["read_bytes"] / 1e6
            metrics[f"{device}/write_mb_s"] = rate["write_bytes"] / 1e6
            metrics[f"{device}/read_iops"] = rate["reads"]
            metrics[f"{device}/write_iops"] = rate["writes"]
    if names and all(n in rates for n in names):
        metrics[f"{prefix}disk_read_mb_s"] = sum(rates[n]["read_bytes"] for n in names) / 1e6
        metrics[f"{prefix}disk_write_mb_s"] = sum(rates[n]["write_bytes"] for n in names) / 1e6
    return metrics


# MLflow's monitor names -> ours (units in the name, as train/*_s does).
_HOST_NAMES = [
    (r"cpu_utilization_percentage", "cpu_percent"),
    (r"system_memory_usage_percentage", "memory_percent"),
    (r"system_memory_usage_megabytes", "memory_used_mb"),
]
_GPU_NAMES = [
    (r"gpu_(\d+)_utilization_percentage", r"gpu_\1_utilization_percent"),
    (r"gpu_(\d+)_memory_usage_percentage", r"gpu_\1_memory_percent"),
    (r"gpu_(\d+)_memory_usage_megabytes", r"gpu_\1_memory_used_mb"),
    (r"gpu_(\d+)_power_usage_watts", r"gpu_\1_power_w"),
    (r"gpu_(\d+)_power_usage_percentage", r"gpu_\1_power_percent"),
]


def rename(metrics: dict[str, float], names: list[tuple[str, str]]) -> dict[str, float]:
    """Our names for an MLflow monitor's metrics; names without a rule are left out, so that
    what we log is what docs/telemetry.md lists."""
    renamed = {}
    for key, value in metrics.items():
        for pattern, replacement in names:
            if re.fullmatch(pattern, key):
                renamed[re.sub(pattern, replacement, key)] = value
    return renamed


class _MlflowSource:
    """One of MLflow's system-metrics monitors read once per sample, under our names."""

    def __init__(self, monitor, names: list[tuple[str, str]]):
        self.name = type(monitor).__name__
        self._monitor = monitor
        self._names = names

    def read(self) -> dict[str, float]:
        self._monitor.collect_metrics()
        metrics = self._monitor.aggregate_metrics()
        self._monitor.clear_metrics()
        return rename(metrics, self._names)


class _OnceFilter(logging.Filter):
    """MLflow's GPU monitor warns on every failed NVML query, i.e. every sample: once is enough."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def build_host_sources(nvml: str) -> list[_MlflowSource]:
    """MLflow's CPU/memory monitor, and its NVML GPU monitor when wanted and working."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    cpu = _MlflowSource(CPUMonitor(), _HOST_NAMES)
    cpu.read()  # psutil's first cpu_percent() is 0.0: it measures from the previous call
    sources = [cpu]
    if nvml != "off":
        gpu = _build_gpu_source(nvml)
        if gpu is not None:
            sources.append(gpu)
    return sources


def _nvml_errors() -> tuple[type[Exception], ...]:
    try:
        import pynvml
    except ImportError:
        return ()
    return (pynvml.NVMLError,)


def _build_gpu_source(nvml: str) -> _MlflowSource | None:
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        # ImportError without nvidia-ml-py, RuntimeError when NVML finds no driver, NVMLError
        # when a device query fails.
        monitor = GPUMonitor()
    except (ImportError, RuntimeError, *_nvml_errors()) as err:
        (log.warning if nvml == "on" else log.info)("telemetry: no GPU metrics (%s)", err)
        return None
    logging.getLogger("mlflow.system_metrics.metrics.gpu_monitor").addFilter(_OnceFilter())
    return _MlflowSource(monitor, _GPU_NAMES)


# ---- the monitor ------------------------------------------------------------------------

class _PeriodicThread:
    """Calls `tick()` every `interval_s` in a daemon thread until stopped. Event.wait, not
    sleep: stop() returns within one tick, not one interval."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None], setup: Callable[[], None] = None):
        self._interval_s = interval_s
        self._tick = tick
        self._setup = setup
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        deadline = time.monotonic() + self._interval_s
        # A steady cadence: a slow tick shortens the next wait instead of shifting every sample.
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            self._tick()
            deadline = max(deadline + self._interval_s, time.monotonic())


class NodeMonitor:
    """Samples this node's system metrics every `cfg.interval_s` and hands them to `sink`.

    Names: `system/<node>/<metric>`, as MLflow's monitor with a node id. Never raises into
    the caller: a source that fails is logged once and left out of later samples' values
    until it works again; training goes on without it.
    """

    def __init__(self, cfg: TelemetryConfig, sink: Sink, node: str | None = None,
                 proc: Path = Path("/proc"), sys_block: Path = Path("/sys/block"),
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.node = node or get_node_name()
        self.prefix = f"system/{self.node}/"
        self._sink = sink
        self._proc = proc
        self._sys_block = sys_block
        self._clock = clock
        self._failed: set[str] = set()  # sources whose failure was logged
        self._host_sources: list[_MlflowSource] = []
        self._previous: tuple[float, dict, dict] | None = None  # (monotonic s, net, disk)
        self._thread = _PeriodicThread(f"telemetry-{self.node}", cfg.interval_s, self._tick, setup=self._setup)

    def start(self) -> NodeMonitor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._thread.stop(timeout_s)

    def _setup(self) -> None:
        """In the thread: importing MLflow and initialising NVML takes seconds."""
        self._host_sources = self._guarded("host", lambda: build_host_sources(self.cfg.nvml)) or []
        self._previous = self._read_counters()
        net, disk = self._previous[1:]
        log.info("telemetry: %s is host %s; every %.0f s: interfaces %s, disks %s, %d GPU source(s)",
                 self.node, socket.gethostname(), self.cfg.interval_s,
                 self._interfaces(net) or "none", self._disks(disk) or "none", len(self._host_sources) - 1)

    def _tick(self) -> None:
        metrics = self.sample()
        if metrics:
            self._deliver(metrics, int(time.time() * 1000))

    def sample(self) -> dict[str, float]:
        """Rates since the previous call (none at the first) and the host's current figures."""
        now = self._read_counters()
        metrics = {}
        if self._previous is not None:
            dt_s = now[0] - self._previous[0]
            net_rates = get_rates(self._previous[1], now[1], dt_s)
            disk_rates = get_rates(self._previous[2], now[2], dt_s)
            metrics.update(network_metrics(self.prefix, net_rates, self._interfaces(now[1])))
            metrics.update(disk_metrics(self.prefix, disk_rates, self._disks(now[2])))
        self._previous = now
        for source in self._host_sources:
            values = self._guarded(source.name, source.read) or {}
            metrics.update({self.prefix + k: float(v) for k, v in values.items()})
        return metrics

    def _read_counters(self) -> tuple[float, dict, dict]:
        t = self._clock()
        net = self._guarded("/proc/net/dev", lambda: parse_net_dev((self._proc / "net/dev").read_text())) or {}
        disk = self._guarded("/proc/diskstats", lambda: parse_diskstats((self._proc / "diskstats").read_text())) or {}
        return t, net, disk

    def _interfaces(self, net: dict) -> list[str]:
        return select_names(net, self.cfg.interfaces, self.cfg.exclude_interfaces)

    def _disks(self, disk: dict) -> list[str]:
        return select_disks(disk, self.cfg, self._sys_block)

    def _guarded(self, source: str, read: Callable[[], Any]) -> Any:
        """read(), or None when it fails with an error a source can have (missing file,
        garbled line, NVML or psutil trouble): logged once per source, not per sample."""
        try:
            value = read()
        except (OSError, ValueError, RuntimeError, ImportError) as err:
            if source not in self._failed:
                self._failed.add(source)
                log.warning("telemetry: %s failed (%s: %s); its metrics are left out", source,
                            type(err).__name__, err)
            return None
        self._failed.discard(source)
        return value

    def _deliver(self, metrics: dict[str, float], timestamp_ms: int) -> None:
        try:
            self._sink(metrics, timestamp_ms)
        except Exception:  # noqa: BLE001 - a sink bug must cost telemetry, not the run; logged with traceback
            if "sink" not in self._failed:
                self._failed.add("sink")
                log.exception("telemetry: the sink failed; samples are lost until it works again")
        else:
            self._failed.discard("sink")


# ---- other nodes -> rank 0 ------------------------------------------------------------------

class StoreRelay:
    """Carries samples from the nodes to rank 0 through a torch.distributed Store (TCPStore).

    Keys, each node on its own (one publisher per node, one reader: rank 0):
        telemetry/<node>/head   last sequence number written   (store.add counter)
        telemetry/<node>/tail   last sequence number consumed  (store.add counter)
        telemetry/<node>/<seq>  one sample as JSON, deleted once consumed
    A sample is written before `head` moves, so rank 0 never reads a missing key. The
    counters live in the store, so a restart round sharing the store resumes the sequence.
    At most `max_pending` samples wait per node: if rank 0 stops collecting, new samples are
    dropped (and counted), and the store does not grow.
    """

    def __init__(self, store, max_pending: int = 360, prefix: str = "telemetry/"):
        self._store = store
        self._max_pending = max_pending
        self._prefix = prefix
        self.num_dropped = 0
        self._failed = False

    def _key(self, node_index: int, name: str | int) -> str:
        return f"{self._prefix}{node_index}/{name}"

    def _counter(self, node_index: int, name: str, increment: int = 0) -> int:
        return int(self._store.add(self._key(node_index, name), increment))

    def sender(self, node_index: int) -> Sink:
        """The sink of node `node_index`'s monitor."""
        return lambda metrics, timestamp_ms: self.push(node_index, metrics, timestamp_ms)

    def push(self, node_index: int, metrics: dict[str, float], timestamp_ms: int) -> None:
        """Never raises: a store that fails (rank 0 gone) costs this sample, logged once."""
        try:
            head = self._counter(node_index, "head")
            if head - self._counter(node_index, "tail") >= self._max_pending:
                self._drop(node_index)
                return
            payload = json.dumps({"t": timestamp_ms, "m": metrics})
            self._store.set(self._key(node_index, head + 1), payload)
            self._counter(node_index, "head", 1)
        except RuntimeError as err:  # torch's DistStoreError and c10d errors are RuntimeErrors
            self._log_failure("push", err)
            self.num_dropped += 1

    def _drop(self, node_index: int) -> None:
        if self.num_dropped == 0:
            log.warning("telemetry: node %d: %d samples wait for rank 0 already; dropping new ones",
                        node_index, self._max_pending)
        self.num_dropped += 1

    def drain(self, node_index: int) -> list[tuple[dict[str, float], int]]:
        """On rank 0: node `node_index`'s waiting samples, oldest first, removed from the store."""
        samples = []
        try:
            tail, head = self._counter(node_index, "tail"), self._counter(node_index, "head")
            for seq in range(tail + 1, head + 1):
                raw = self._store.get(self._key(node_index, seq))
                # tail before the delete: a failure in between leaves a stray key, never a
                # consumed-but-counted-as-waiting one that a later get() would block on.
                self._counter(node_index, "tail", 1)
                self._store.delete_key(self._key(node_index, seq))
                samples.append(self._decode(raw))
        except RuntimeError as err:
            self._log_failure("drain", err)
        return [sample for sample in samples if sample is not None]

    def _decode(self, raw: bytes) -> tuple[dict[str, float], int] | None:
        try:
            record = json.loads(raw)
            return record["m"], record["t"]
        except (ValueError, KeyError, TypeError) as err:
            self._log_failure("decode", err)
            return None

    def _log_failure(self, what: str, err: Exception) -> None:
        if not self._failed:
            self._failed = True
            log.warning("telemetry: relay %s failed (%s); samples of nodes > 0 are lost while it fails", what, err)


class RelayPump:
    """On rank 0: moves the other nodes' samples from the store to `sink`, every interval_s."""

    def __init__(self, relay: StoreRelay, node_indices: list[int], sink: Sink, interval_s: float):
        self._relay = relay
        self._node_indices = node_indices
        self._sink = sink
        self._thread = _PeriodicThread("telemetry-relay", interval_s, self.pump)

    def start(self) -> RelayPump:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the thread, then collects what arrived since its last round."""
        self._thread.stop(timeout_s)
        self.pump()

    def pump(self) -> int:
        num_samples = 0
        for node_index in self._node_indices:
            for metrics, timestamp_ms in self._relay.drain(node_index):
                self._sink(metrics, timestamp_ms)
                num_samples += 1
        return num_samples


# ---- wiring: what each process runs ---------------------------------------------------------

def get_num_nodes(env=os.environ) -> int:
    """torchrun's nodes: WORLD_SIZE / LOCAL_WORLD_SIZE (every node runs as many processes)."""
    return int(env.get("WORLD_SIZE", "1")) // int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))


def connect_store(env=os.environ, timeout_s: float = 60.0):
    """A connection of its own to the job's TCPStore (torchrun's MASTER_ADDR:MASTER_PORT):
    telemetry traffic never waits behind the process group's store calls, or they behind it."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore("t5ja", store)  # keys: t5ja/telemetry/...


class NodeTelemetry:
    """The telemetry threads of one process; stop() ends them (prompt, never raises)."""

    def __init__(self, parts: list):
        self.parts = parts

    def stop(self) -> None:
        for part in self.parts:
            part.stop()


def start_node_telemetry(cfg: TelemetryConfig, sink: Sink | None, env=os.environ, store=None) -> NodeTelemetry:
    """Starts what this process runs under torchrun: a node's local rank 0 runs its NodeMonitor;
    rank 0's samples and (through the store) every other node's go to `sink` (rank 0's metric
    logger); the other nodes send theirs to the store. Other processes run nothing."""
    if not cfg.enabled or env.get("LOCAL_RANK", "0") != "0":
        return NodeTelemetry([])
    node_index, num_nodes = int(env.get("GROUP_RANK", "0")), get_num_nodes(env)
    if num_nodes > 1 and store is None:
        try:
            store = connect_store(env)
        except (RuntimeError, KeyError, ValueError) as err:
            log.warning("telemetry: no store to relay node samples (%s); node %d's samples stay off the run",
                        err, node_index)
    relay = StoreRelay(store, cfg.max_pending_samples) if store is not None else None
    node = get_node_name(env)
    if env.get("RANK", "0") == "0":
        parts = [NodeMonitor(cfg, sink, node).start()]
        if relay is not None:
            parts.append(RelayPump(relay, list(range(1, num_nodes)), sink, cfg.interval_s).start())
        return NodeTelemetry(parts)
    if relay is None:
        return NodeTelemetry([])
    return NodeTelemetry([NodeMonitor(cfg, relay.sender(node_index), node).start()])
