"""Telemetry: counter parsers, rates, counter resets, the monitor thread, the store relay
between two processes, secret redaction, and accuracy against known limits (a veth pair
capped at 200 Mbit/s by tc tbf between two network namespaces; a known disk write).

Run as a script, this file is also the child processes of the multi-process tests
(`python tests/test_telemetry.py gloo-worker|node-1 ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.metrics import REDACTED, is_secret_name, redact, redact_tree
from trainer.telemetry import (
    _GPU_NAMES, DiskCounters, NetCounters, NodeMonitor, StoreRelay, TelemetryConfig, build_host_sources,
    connect_store, get_node_name, get_rates, network_metrics, parse_diskstats, parse_net_dev, rename, select_disks,
    start_node_telemetry,
)

ROOT = Path(__file__).resolve().parents[1]

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 157412881548 4069823    0    0    0     0          0         0 157412881548 4069823    0    0    0     0       0          0
  eth0: 1322358001   42254    0    0    0     0          0         0  2350670   22195    0    0    0     0       0          0
 ib0:9000 12 0 0 0 0 0 0 7000 13 0 0 0 0 0 0
"""

DISKSTATS = """\
   7       0 loop0 10 0 80 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 547703 35747 26448746 758153 303012 504500 65193992 270254 0 199888 1130580 311577 63 49421696 69763 67183 32408
 254       1 vda1 547000 35000 26400000 758000 303000 504000 65190000 270000 0 199800 1130000 0 0 0 0 0 0
 253       0 zram0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 259       0 nvme0n1 100 0 2048 5 50 0 4096 3 0 8 8
"""


# ---- parsers and rates -------------------------------------------------------------------

def test_parse_net_dev_reads_rx_and_tx_bytes_of_each_interface():
    counters = parse_net_dev(NET_DEV)
    assert counters["eth0"] == NetCounters(rx_bytes=1322358001, tx_bytes=2350670)
    assert counters["lo"].rx_bytes == 157412881548
    assert counters["ib0"] == NetCounters(rx_bytes=9000, tx_bytes=7000)  # no space after the colon


def test_parse_diskstats_counts_requests_and_512_byte_sectors():
    counters = parse_diskstats(DISKSTATS)
    assert counters["vda"] == DiskCounters(reads=547703, read_bytes=26448746 * 512,
                                           writes=303012, write_bytes=65193992 * 512)
    assert counters["nvme0n1"] == DiskCounters(reads=100, read_bytes=2048 * 512, writes=50, write_bytes=4096 * 512)
    assert set(counters) == {"loop0", "vda", "vda1", "zram0", "nvme0n1"}  # 11-field lines of old kernels too


def test_rates_are_deltas_per_second():
    before = {"eth0": NetCounters(1000, 0)}
    after = {"eth0": NetCounters(1000 + 25_000_000, 5_000_000), "new0": NetCounters(5, 5)}
    rates = get_rates(before, after, dt_s=2.0)
    assert rates == {"eth0": {"rx_bytes": 12_500_000, "tx_bytes": 2_500_000}}  # new0: no previous sample yet
    metrics = network_metrics("system/n/", rates, ["eth0"])
    assert metrics["system/n/network/eth0/rx_gbps"] == pytest.approx(0.1)  # 12.5 MB/s = 100 Mbit/s
    assert metrics["system/n/network_tx_gbps"] == pytest.approx(0.02)


def test_counter_reset_or_wrap_skips_the_device_for_one_sample():
    """An interface re-created (or a 32-bit counter wrapping) between two samples: its counters
    fall. That sample has no rate for it, and no total (a partial total would be a fake drop)."""
    before = {"eth0": NetCounters(10_000_000, 10_000_000), "eth1": NetCounters(100, 100)}
    after = {"eth0": NetCounters(4_000, 20_000_000), "eth1": NetCounters(200, 200)}
    rates = get_rates(before, after, dt_s=1.0)
    assert "eth0" not in rates and rates["eth1"]["rx_bytes"] == 100
    metrics = network_metrics("p/", rates, ["eth0", "eth1"])
    assert "p/network_rx_gbps" not in metrics and "p/network/eth0/rx_gbps" not in metrics
    assert "p/network/eth1/rx_gbps" in metrics
    later = get_rates(after, {"eth0": NetCounters(4_000 + 125, 20_000_000), "eth1": NetCounters(200, 200)}, 1.0)
    assert later["eth0"]["rx_bytes"] == 125  # counting resumes from the new base, no spike


def test_default_disks_are_whole_disks_with_a_device(tmp_path):
    sys_block = tmp_path / "block"
    for name, has_device in [("vda", True), ("nvme0n1", True), ("loop0", False), ("zram0", False)]:
        (sys_block / name).mkdir(parents=True)
        if has_device:
            (sys_block / name / "device").mkdir()
    names = parse_diskstats(DISKSTATS)
    assert select_disks(names, TelemetryConfig(), sys_block) == ["nvme0n1", "vda"]  # no vda1: a partition
    assert select_disks(names, TelemetryConfig(disks=["vda*"]), sys_block) == ["vda", "vda1"]
    assert select_disks(names, TelemetryConfig(exclude_disks=["nvme*"]), sys_block) == ["vda"]


def test_gpu_names_of_mlflows_monitor_become_ours():
    mlflow_names = {"gpu_0_utilization_percentage": 97.0, "gpu_0_memory_usage_percentage": 41.5,
                    "gpu_0_memory_usage_megabytes": 33000.0, "gpu_1_power_usage_watts": 310.2,
                    "gpu_1_power_usage_percentage": 44.3, "gpu_0_something_new": 1.0}
    assert rename(mlflow_names, _GPU_NAMES) == {
        "gpu_0_utilization_percent": 97.0, "gpu_0_memory_percent": 41.5, "gpu_0_memory_used_mb": 33000.0,
        "gpu_1_power_w": 310.2, "gpu_1_power_percent": 44.3}


def test_nvml_on_without_nvml_warns_and_keeps_host_metrics(caplog):
    pytest.importorskip("mlflow")
    try:
        import pynvml  # noqa: F401
        pytest.skip("nvidia-ml-py is installed: this checks a machine without it")
    except ImportError:
        pass
    with caplog.at_level(logging.INFO, "trainer.telemetry"):
        sources = build_host_sources("on")
    assert [s.name for s in sources] == ["CPUMonitor"]
    assert any(r.levelno == logging.WARNING and "no GPU metrics" in r.getMessage() for r in caplog.records)
    assert set(sources[0].read()) == {"cpu_percent", "memory_percent", "memory_used_mb"}


def test_node_name_from_torchrun_group_rank_or_mlflow_node_id():
    assert get_node_name({"GROUP_RANK": "3"}) == "node3"
    assert get_node_name({"GROUP_RANK": "3", "MLFLOW_SYSTEM_METRICS_NODE_ID": "gpu017"}) == "gpu017"
    assert get_node_name({}) == "node0"


# ---- the monitor -----------------------------------------------------------------------

class FakeProc:
    """A /proc with net/dev and diskstats that the test rewrites, and a clock it sets."""

    def __init__(self, root: Path):
        self.root = root
        (root / "net").mkdir(parents=True)
        (root / "block" / "vda" / "device").mkdir(parents=True)
        self.now = 100.0
        self.write(0, 0, 0)

    def write(self, rx_bytes: int, tx_bytes: int, sectors_written: int) -> None:
        (self.root / "net" / "dev").write_text(
            "h1\nh2\n"
            f"    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n"
            f"  eth0: {rx_bytes} 1 0 0 0 0 0 0 {tx_bytes} 1 0 0 0 0 0 0\n")
        (self.root / "diskstats").write_text(f" 254 0 vda 0 0 0 0 {sectors_written // 8} 0 {sectors_written} 0 0 0 0\n")

    def monitor(self, sink=None, **cfg) -> NodeMonitor:
        return NodeMonitor(TelemetryConfig(**cfg), sink or (lambda m, t: None), node="n0", proc=self.root,
                           sys_block=self.root / "block", clock=lambda: self.now)


def test_monitor_sample_names_units_and_totals(tmp_path):
    proc = FakeProc(tmp_path)
    monitor = proc.monitor()
    assert monitor.sample() == {}  # the first sample has no previous counters: no rates
    proc.now += 10.0
    proc.write(rx_bytes=250_000_000, tx_bytes=125_000_000, sectors_written=2 * 1_000_000)  # 1024 MB
    metrics = monitor.sample()
    assert metrics == pytest.approx({
        "system/n0/network/eth0/rx_gbps": 0.2, "system/n0/network/eth0/tx_gbps": 0.1,
        "system/n0/network_rx_gbps": 0.2, "system/n0/network_tx_gbps": 0.1,  # lo excluded by default
        "system/n0/disk/vda/read_mb_s": 0.0, "system/n0/disk/vda/write_mb_s": 102.4,
        "system/n0/disk/vda/read_iops": 0.0, "system/n0/disk/vda/write_iops": 25_000.0,
        "system/n0/disk_read_mb_s": 0.0, "system/n0/disk_write_mb_s": 102.4,
    })


def test_monitor_survives_a_counter_reset_and_a_missing_file(tmp_path, caplog):
    proc = FakeProc(tmp_path)
    monitor = proc.monitor()
    proc.write(10**9, 10**9, 8000)
    monitor.sample()
    proc.now += 1
    proc.write(1_000, 10**9, 8000)  # eth0 re-created: rx fell
    metrics = monitor.sample()
    assert not any("network" in k for k in metrics) and "system/n0/disk_write_mb_s" in metrics
    (tmp_path / "diskstats").unlink()
    with caplog.at_level(logging.WARNING, "trainer.telemetry"):
        for _ in range(3):
            proc.now += 1
            metrics = monitor.sample()
    assert "system/n0/network_rx_gbps" in metrics and not any("disk" in k for k in metrics)
    assert sum("/proc/diskstats failed" in r.message for r in caplog.records) == 1  # once, not per sample


def test_monitor_thread_samples_on_interval_and_stops_promptly(tmp_path, caplog):
    samples, calls = [], []

    def sink(metrics, timestamp_ms):
        calls.append(timestamp_ms)
        if len(calls) == 2:
            raise ValueError("a broken sink")  # logged once; the monitor goes on
        samples.append((metrics, timestamp_ms))

    monitor = NodeMonitor(TelemetryConfig(interval_s=0.3, nvml="off"), sink, node="n0").start()
    deadline = time.monotonic() + 30
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.perf_counter()
    monitor.stop()
    assert time.perf_counter() - start < 1.0
    assert len(calls) >= 4, calls
    metrics, timestamp_ms = samples[-1]
    assert {"system/n0/cpu_percent", "system/n0/memory_percent"} <= set(metrics)
    assert abs(timestamp_ms / 1000 - time.time()) < 30
    assert sum("sink failed" in r.message for r in caplog.records) == 1

    slow = NodeMonitor(TelemetryConfig(interval_s=3600, nvml="off"), sink, node="n0").start()
    time.sleep(0.2)
    start = time.perf_counter()
    slow.stop()
    assert time.perf_counter() - start < 1.0  # Event.wait, not sleep(3600)


# ---- the relay ---------------------------------------------------------------------------

def test_relay_keeps_at_most_max_pending_samples_per_node():
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    relay = StoreRelay(store, max_pending=3)
    for i in range(5):
        relay.push(2, {"system/node2/cpu_percent": float(i)}, 1000 + i)
    assert relay.num_dropped == 2
    assert [(m["system/node2/cpu_percent"], t) for m, t in relay.drain(2)] == [(0.0, 1000), (1.0, 1001), (2.0, 1002)]
    assert relay.drain(2) == [] and relay.drain(5) == []  # consumed; an unknown node has nothing
    relay.push(2, {"x": 9.0}, 2000)  # room again after the drain
    assert relay.drain(2) == [({"x": 9.0}, 2000)]
    assert not any(store.check([f"telemetry/2/{seq}"]) for seq in range(1, 5))  # consumed samples are deleted


def _torchrun_env(port: int, rank: int, local_rank: int, node_index: int) -> dict[str, str]:
    """What torchrun sets for a 2-node x 2-process job."""
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "GROUP_RANK": str(node_index), "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_only_a_nodes_local_rank_0_runs_telemetry():
    cfg = TelemetryConfig(nvml="off")
    assert start_node_telemetry(cfg, None, _torchrun_env(1, rank=1, local_rank=1, node_index=0)).parts == []
    assert start_node_telemetry(cfg.model_copy(update={"enabled": False}), None,
                                _torchrun_env(1, rank=0, local_rank=0, node_index=0)).parts == []
    single = start_node_telemetry(cfg, lambda m, t: None, {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                                                            "LOCAL_WORLD_SIZE": "2"})
    assert [type(p) for p in single.parts] == [NodeMonitor]  # one node: no store, no relay
    single.stop()


@pytest.mark.multiproc
def test_two_nodes_samples_reach_rank_0_over_the_tcpstore():
    """Node 1's local rank 0 (a child process) relays its monitor's samples through the job's
    TCPStore; rank 0 (this process) gets them, with its own node's, in its one sink."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # as rank 0's process group
    received = []
    cfg = TelemetryConfig(interval_s=0.3, nvml="off")
    telemetry = start_node_telemetry(cfg, lambda m, t: received.append((m, t)),
                                     _torchrun_env(store.port, rank=0, local_rank=0, node_index=0))
    child = subprocess.run([sys.executable, __file__, "node-1", "--port", str(store.port), "--samples", "3"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    telemetry.stop()  # the pump collects what arrived since its last round
    node1 = [t for m, t in received if "system/node1/cpu_percent" in m]
    num_published = int(store.add("t5ja/telemetry/1/head", 0))
    assert len(node1) == num_published >= 3 and node1 == sorted(node1)  # every sample, in order
    assert any("system/node0/cpu_percent" in m for m, _ in received)
    assert all(len({k.split("/")[1] for k in m}) == 1 for m, _ in received)  # each sample of one node


def node_1(port: int, num_samples: int) -> None:
    """Child of the two-node test: node 1's local rank 0 (rank 2 of 4) until it sent `num_samples`."""
    env = _torchrun_env(port, rank=2, local_rank=0, node_index=1)
    telemetry = start_node_telemetry(TelemetryConfig(interval_s=0.3, nvml="off"), None, env)
    store = connect_store(env)
    deadline = time.monotonic() + 60
    while int(store.add("telemetry/1/head", 0)) < num_samples and time.monotonic() < deadline:
        time.sleep(0.05)
    telemetry.stop()


# ---- redaction -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hf_token", "HF_TOKEN", "api_key", "apiKey", "mlflow.password",
                                  "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "AWS_SESSION_TOKEN",
                                  "secrets.db.host", "wandb.api_key", "data.credentials", "private_key_path"])
def test_secret_names_are_redacted(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["tokenizer.path", "tokenizer.vocab_size", "run.tokens_dir", "num_tokens",
                                  "max_tokens", "train.consumed_tokens", "model.key_dim", "tokenizer.eos_token",
                                  "pad_token_id", "monkey", "keyboard", "train.lr", "SLURM_JOB_ID"])
def test_ordinary_names_are_kept(name):
    assert not is_secret_name(name)


def test_redact_params_tree_and_urls():
    params = {"tokenizer.path": "/data/tok", "hf_token": "hf_abc",
              "mlflow.tracking_uri": "https://bob:s3cret@mlflow:5000"}
    assert redact(params) == {"tokenizer.path": "/data/tok", "hf_token": REDACTED,
                              "mlflow.tracking_uri": f"https://bob:{REDACTED}@mlflow:5000"}
    tree = {"mlflow": {"password": "x", "experiment": "t5ja"}, "data": {"inputs": [{"path": "a", "api_key": "k"}]}}
    assert redact_tree(tree) == {"mlflow": {"password": REDACTED, "experiment": "t5ja"},
                                 "data": {"inputs": [{"path": "a", "api_key": REDACTED}]}}


# ---- accuracy against known limits ---------------------------------------------------------

RATE_CAP_MBIT = 200
TENSOR_FLOATS = 12_500_000  # 50 MB: a 2-rank ring all-reduce moves it once each way, 2 s at 200 Mbit/s
ALL_REDUCES = 4


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, text=True, timeout=30)


def _make_capped_link(ns: list[str], veth: list[str]) -> None:
    """Namespaces a and b joined by a veth pair, each end's egress capped by tc tbf."""
    for name in ns:
        _run("ip", "netns", "add", name)
    _run("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
    for i in (0, 1):
        _run("ip", "link", "set", veth[i], "netns", ns[i])
        _run("ip", "-n", ns[i], "addr", "add", f"10.213.0.{i + 1}/24", "dev", veth[i])
        _run("ip", "-n", ns[i], "link", "set", veth[i], "up")
        _run("ip", "-n", ns[i], "link", "set", "lo", "up")
        # burst: at least rate/HZ (100 KB at 200 Mbit/s, HZ 250), and more than a GSO segment (64 KB)
        _run("ip", "netns", "exec", ns[i], "tc", "qdisc", "add", "dev", veth[i], "root", "tbf",
             "rate", f"{RATE_CAP_MBIT}mbit", "burst", "256kb", "latency", "100ms")


def _remove_link(ns: list[str], veth: list[str]) -> None:
    for name in ns:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes its veth end along
    subprocess.run(["ip", "link", "del", veth[0]], capture_output=True)  # if set-up failed before the move


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and a tc qdisc"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


@pytest.mark.multiproc
@pytest.mark.skipif(_netns_unavailable() is not None, reason=str(_netns_unavailable()))
def test_network_rate_matches_a_tbf_capped_link(tmp_path):
    """A 2-process gloo all-reduce across two namespaces whose veth link tbf caps at 200 Mbit/s
    each way: rank 0's monitor (1 s samples, in its namespace as a node's monitor is) must log
    200 Mbit/s +-15% on the veth while the transfer runs."""
    tag = str(os.getpid() % 100_000)
    ns, veth = [f"t5ja_{tag}_a", f"t5ja_{tag}_b"], [f"t5a{tag}", f"t5b{tag}"]
    try:
        _make_capped_link(ns, veth)
        out = tmp_path / "rank0.json"
        procs = [subprocess.Popen(["ip", "netns", "exec", ns[i], sys.executable, __file__, "gloo-worker",
                                   "--rank", str(i), "--iface", veth[i], "--out", str(out)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in (0, 1)]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    finally:
        _remove_link(ns, veth)
    result = json.loads(out.read_text())
    prefix = f"system/node0/network/{veth[0]}/"
    # Samples whose whole window lies inside the transfer (the window ends at the timestamp).
    inside = [m for t, m in result["samples"]
              if t / 1000 - result["interval_s"] >= result["start"] and t / 1000 <= result["end"]]
    assert len(inside) >= 3, result
    for direction in ("tx", "rx"):
        rates_mbit = sorted(m[f"{prefix}{direction}_gbps"] * 1000 for m in inside)
        median = rates_mbit[len(rates_mbit) // 2]
        print(f"{direction}: {RATE_CAP_MBIT} Mbit/s cap, logged {[round(r, 1) for r in rates_mbit]} Mbit/s, "
              f"median {median:.1f}")
        assert abs(median - RATE_CAP_MBIT) <= 0.15 * RATE_CAP_MBIT, (direction, rates_mbit)
    assert all(m["system/node0/network_tx_gbps"] == m[f"{prefix}tx_gbps"] for m in inside)  # lo is not counted


def gloo_worker(rank: int, iface: str, out: Path) -> None:
    """One rank of the capped-link test, run inside its network namespace."""
    from datetime import timedelta

    os.environ["GLOO_SOCKET_IFNAME"] = iface
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://10.213.0.1:29533", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    samples, interval_s = [], 1.0
    if rank == 0:
        cfg = TelemetryConfig(interval_s=interval_s, interfaces=[iface], nvml="off")
        monitor = NodeMonitor(cfg, lambda m, t: samples.append((t, m)), node="node0").start()
        while not samples:  # the monitor is set up (it imports MLflow) and has its first counters
            time.sleep(0.05)
    dist.barrier()
    tensor = torch.ones(TENSOR_FLOATS)
    start = time.time()
    for _ in range(ALL_REDUCES):
        dist.all_reduce(tensor)
    end = time.time()
    dist.barrier()
    if rank == 0:
        time.sleep(interval_s * 1.5)
        monitor.stop()
        out.write_text(json.dumps({"start": start, "end": end, "interval_s": interval_s, "samples": samples}))
    dist.destroy_process_group()


def _disk_of(path: Path) -> str | None:
    """The /proc/diskstats name of the block device holding `path` (None for overlay/tmpfs)."""
    st_dev = path.stat().st_dev
    number = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if f"{fields[0]}:{fields[1]}" == number:
            return fields[2]
    return None


def test_disk_write_rate_matches_a_known_write(tmp_path):
    """A 256 MiB write, fsync'ed, between two samples: write_mb_s x the window = the write +-20%
    (other processes writing to the same disk meanwhile are the error's budget)."""
    device = _disk_of(tmp_path)
    if device is None:
        pytest.skip(f"{tmp_path} is on no device of /proc/diskstats (overlay or tmpfs?)")
    clock_reads = []

    def clock() -> float:
        clock_reads.append(time.monotonic())
        return clock_reads[-1]

    monitor = NodeMonitor(TelemetryConfig(disks=[device], nvml="off"), lambda m, t: None, node="n0", clock=clock)
    num_bytes, chunk = 256 * 2**20, os.urandom(4 * 2**20)
    os.sync()  # others' dirty pages out before the window, not in it
    monitor.sample()
    with open(tmp_path / "known.bin", "wb") as f:
        for _ in range(num_bytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    metrics = monitor.sample()
    window_s = clock_reads[-1] - clock_reads[-2]
    expected_mb_s = num_bytes / 1e6 / window_s
    logged = metrics[f"system/n0/disk/{device}/write_mb_s"]
    print(f"{device}: wrote {num_bytes / 1e6:.0f} MB in a {window_s:.2f} s window: expected {expected_mb_s:.1f} "
          f"MB/s, logged {logged:.1f} MB/s ({metrics[f'system/n0/disk/{device}/write_iops']:.0f} IOPS)")
    assert abs(logged - expected_mb_s) <= 0.2 * expected_mb_s


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["gloo-worker", "node-1"])
    parser.add_argument("--rank", type=int)
    parser.add_argument("--iface")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--samples", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if args.role == "gloo-worker":
        gloo_worker(args.rank, args.iface, args.out)
    else:
        node_1(args.port, args.samples)
