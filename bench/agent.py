"""Agent benchmark: the agent end to end through a real Mosquitto on loopback.

The bench starts its own Mosquitto on a free loopback port and the agent as a subprocess
(``segwatch-agent run``, so its memory is the agent's alone, without TensorFlow), with 200
single-channel assets on the shipped Dodgers bundle: 100 fed one sample per message
(``{"ts", "value"}``), 100 fed batched payloads (JSON lists of ``--batch`` samples). Each
asset gets the same stretch of the Dodgers test half (real counts, with their real gaps and
games), so every channel cuts snapshots and raises alarms.

Figures, each printed next to the issue's target (2-core machine):

- time from start to ready: process start to the agent's first ``online`` status (models
  loaded and self-tested, broker connected);
- sustained samples/s ingested and scored, single-sample messages and batched payloads,
  100 channels at once: a publisher process sends at the target rate (``--single-rate``,
  ``--batched-rate``); the rate is samples / (first send to the status that shows every
  message received and the queue empty). No loss: every message received, every sample
  accepted, no rejection, and as many snapshots scored as the same samples give offline;
- alarm delay: for every alarm raise, from the send of the sample that completes its
  evidence (found by running the same samples offline through the agent's pipeline one
  sample at a time) to the alarm's arrival at a subscriber; the wait for the hop is not in
  it (the hop is the time between snapshots, a choice of the model's operating point).
  Measured in its own phase with the agent keeping up (``delay_phase``: 100 more channels
  complete their evidence at the same moment), and also under the batched load, where it
  includes the backlog;
- agent resident memory (peak, VmHWM), and that no TensorFlow library is mapped.

Run: ``python bench/agent.py``: about 20 s per phase at the target rates; a phase the
agent cannot keep up with lasts as long as the agent needs (2 to 3 minutes in all on the
loaded development machine). ``--samples`` per channel and the rates change the load,
``--phases`` picks phases, ``--backend`` the agent's inference backend, ``--qos`` the
publisher's, ``--profile DIR`` records the agent with py-spy.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import ROOT, header, verdict, write_results  # noqa: E402

BUNDLE = ROOT / "models" / "dodgers-unet"
DODGERS = ROOT.parent / "shared" / "data" / "dodgers" / "Dodgers.data"
CHANNELS = 100
PREFIX = "segwatch-bench"
TARGETS = {"single": 20_000.0, "batched": 200_000.0, "delay_p99_ms": 100.0, "rss_mb": 250.0}


# Broker -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    port = _free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 0\n")
    log = open(workdir / "mosquitto.log", "w")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mosquitto exited; see {workdir / 'mosquitto.log'}")
            time.sleep(0.05)
    raise SystemExit("mosquitto did not listen within 10 s")


# Data and the offline reference -----------------------------------------------------------

def dodgers_stretch(samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` 5-minute counts from the start of the Dodgers test half."""
    from agent.datasets import dodgers_split, read_dodgers

    series = read_dodgers(DODGERS)
    first = int(np.searchsorted(series.ts, dodgers_split(series)))
    return series.ts[first:first + samples], series.values[first:first + samples, 0]


def offline_reference(ts: np.ndarray, values: np.ndarray) -> tuple[int, dict[str, int]]:
    """Snapshots one channel scores, and the sample index that raises each alarm (by start).

    The same samples through the agent's own pipeline, one sample per step, without MQTT.
    """
    from agent.bundle import load_bundle
    from agent.inference import load_backend
    from agent.pipeline import AssetPipeline, Pipeline, settings_from_bundle
    from agent.timeutil import to_iso

    bundle = load_bundle(BUNDLE)
    backend = load_backend(bundle, "onnxruntime", strict=True)
    settings = settings_from_bundle(bundle, "ref", sample_period=300.0)
    asset = AssetPipeline(settings, bundle, backend)
    pipeline = Pipeline([asset])
    triggers: dict[str, int] = {}
    for i, (t, v) in enumerate(zip(ts, values)):
        if np.isfinite(v):
            asset.add([("count", float(t), float(v))])
        for event in pipeline.step():
            if event.state == "active":
                triggers.setdefault(to_iso(event.start), i)
    return pipeline.counter_totals().get("snapshots_scored", 0), triggers


# Publisher (its own process) --------------------------------------------------------------

def _payloads(kind: str, group: str, ts, values, batch: int) -> tuple[list, list, list]:
    """Messages in send order: (topic, payload); and per message its last sample index."""
    topics = [f"bench/{group}{c:03d}/count" for c in range(CHANNELS)]
    valid = [i for i in range(len(ts)) if np.isfinite(values[i])]
    messages, last_index, counts = [], [], []
    step = 1 if kind == "single" else batch
    for lo in range(0, len(valid), step):
        chunk = valid[lo:lo + step]
        if kind == "single":
            body = json.dumps({"ts": float(ts[chunk[0]]), "value": float(values[chunk[0]])})
        else:
            body = json.dumps([{"ts": float(ts[i]), "value": float(values[i])} for i in chunk])
        for topic in topics:
            messages.append((topic, body.encode()))
            last_index.append(chunk[-1])
            counts.append(len(chunk))
    return messages, last_index, counts


def publisher(port: int, messages: list, rate_samples: float, samples_per_message: list,
              qos: int, out: str, ready, go) -> None:
    """Send ``messages`` paced at ``rate_samples`` samples/s; save the send times.

    paho queues QoS 1 messages until the broker acknowledges them; when its queue is full
    (or message ids would wrap around), the send waits, so nothing is dropped here.
    """
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(30000)  # under the 65,535 message ids
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent_at = np.zeros(len(messages))

    def send(topic, payload, qos):
        while True:
            info = client.publish(topic, payload, qos=qos)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                return info
            time.sleep(0.001)
    cumulative = np.cumsum(samples_per_message)
    ready.set()
    go.wait()
    started = time.time()
    for k, (topic, payload) in enumerate(messages):
        due = started + cumulative[k] / rate_samples if rate_samples > 0 else 0.0
        wait = due - time.time()
        if wait > 0.002:
            time.sleep(wait)
        sent_at[k] = time.time()
        send(topic, payload, qos)
    send("bench/done", b"", 1).wait_for_publish(120)
    client.loop_stop()
    client.disconnect()
    np.save(out, sent_at)


# Watcher: status and alarms ---------------------------------------------------------------

class Watcher:
    """Subscribes to the agent's status and alarms; records arrival times."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.status: dict | None = None
        self.status_at = 0.0
        self.first_online: float | None = None
        self.alarms: list[tuple[float, dict]] = []
        self.changed = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-watch",
                                  protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{PREFIX}/#", 1)])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, _client, _userdata, message) -> None:
        now = time.time()
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        with self.changed:
            if message.topic.endswith("/status"):
                if body.get("state") == "online" and self.first_online is None:
                    self.first_online = now
                if "counters" in body:
                    self.status, self.status_at = body, now
            elif message.topic.endswith("/alarm"):
                self.alarms.append((now, body))
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float):
        deadline = time.time() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.time()
                if left <= 0:
                    return None
                self.changed.wait(left)
            return self.status_at

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# Agent ------------------------------------------------------------------------------------

def write_config(path: Path, port: int, status_interval: float) -> None:
    lines = [
        f"broker: {{host: 127.0.0.1, port: {port}, client_id: bench-agent}}",
        f"alarm_prefix: {PREFIX}",
        f"database: {path.parent / 'bench.db'}",
        f"status_interval: {status_interval}",
        "inference: {queue_size: 100000}",
        "assets:",
    ]
    for group in ("s", "b", "d"):
        for c in range(CHANNELS):
            lines += [f"  - name: {group}{c:03d}", "    sample_period: 5min",
                      f"    model: {BUNDLE}",
                      f"    channels: [{{name: count, topic: bench/{group}{c:03d}/count}}]"]
    path.write_text("\n".join(lines) + "\n")


def memory(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    maps = Path(f"/proc/{pid}/maps").read_text()
    fields["tensorflow_mapped"] = "tensorflow" in maps
    fields["litert_mapped"] = "ai_edge_litert" in maps
    fields["onnxruntime_mapped"] = "onnxruntime" in maps
    return fields


def run_phase(kind, group, watcher, port, ts, values, batch, rate, qos, tmp, expected_scored,
              triggers) -> dict:
    messages, last_index, counts = _payloads(kind, group, ts, values, batch)
    samples = int(sum(counts))
    before = dict(watcher.status["counters"])
    ctx = multiprocessing.get_context("spawn")
    ready, go = ctx.Event(), ctx.Event()
    out = str(tmp / f"sent-{kind}.npy")
    proc = ctx.Process(target=publisher, args=(port, messages, rate, counts, qos, out, ready, go))
    proc.start()
    ready.wait(60)
    alarms_before = len(watcher.alarms)
    go.set()
    started = time.time()

    def done():
        if proc.exitcode not in (None, 0):
            return True  # the publisher failed: stop waiting
        s = watcher.status["counters"]
        got = s.get("messages_received", 0) - before.get("messages_received", 0)
        return got >= len(messages) and watcher.status.get("queue_depth", 1) == 0 \
            and watcher.status_at > started
    finished = watcher.wait_for(done, timeout=600)
    proc.join(120)
    if proc.exitcode != 0:
        raise SystemExit(f"{kind}: the publisher failed (exit {proc.exitcode}); see above")
    sent_at = np.load(out)
    if finished is None:
        raise SystemExit(f"{kind}: the agent did not process every message within 600 s")
    after = watcher.status["counters"]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    rejected = {k: v for k, v in delta.items() if k.startswith("rejected.") and v}
    publish_seconds = sent_at[-1] - sent_at[0]
    # Alarm delays: sample that completes the evidence -> alarm at the subscriber. Messages
    # go out chunk by chunk, each chunk to every channel in turn: message j * CHANNELS + c
    # carries chunk j of channel c, whose last sample index is chunk_last[j].
    chunk_last = np.asarray(last_index[::CHANNELS])
    delays = []
    for arrived, body in watcher.alarms[alarms_before:]:
        index = triggers.get(body.get("start"))
        if body.get("state") != "active" or index is None:
            continue
        j = int(np.searchsorted(chunk_last, index))
        c = int(str(body.get("asset"))[1:])
        if j < len(chunk_last):
            delays.append(arrived - sent_at[j * CHANNELS + c])
    result = {
        "messages": len(messages), "samples": samples,
        "samples_per_message": 1 if kind == "single" else batch,
        "offered_samples_per_s": rate,
        "publish_samples_per_s": round(samples / max(publish_seconds, 1e-9), 1),
        "sustained_samples_per_s": round(samples / (finished - sent_at[0]), 1),
        "lag_after_last_send_s": round(finished - sent_at[-1], 3),
        "messages_received": delta.get("messages_received", 0),
        "samples_accepted": delta.get("samples_accepted", 0),
        "snapshots_scored": delta.get("snapshots_scored", 0),
        "snapshots_expected": expected_scored * CHANNELS,
        "rejected": rejected,
        "alarm_raises": len(delays),
        "alarm_delay_ms_median": round(statistics.median(delays) * 1e3, 1) if delays else None,
        "alarm_delay_ms_p99": round(float(np.percentile(delays, 99)) * 1e3, 1)
        if delays else None,
    }
    result["lossless"] = (result["messages_received"] == len(messages)
                          and result["samples_accepted"] == samples and not rejected
                          and result["snapshots_scored"] >= result["snapshots_expected"])
    return result


def delay_phase(watcher, port, ts, values, batch, triggers) -> dict:
    """Alarm delay with the agent keeping up: 100 channels complete their evidence at once.

    For each alarm the offline run found (same sample index on every channel), the samples
    before it go out in batched payloads and the agent drains them; then the sample that
    completes the evidence goes out on all 100 channels at once, and the delay of each
    channel's alarm is measured from its sample's send.
    """
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-delay",
                         protocol=mqtt.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    topics = [f"bench/d{c:03d}/count" for c in range(CHANNELS)]
    received = watcher.status["counters"].get("messages_received", 0)
    delays, expected, lo = [], 0, 0
    try:
        for index in sorted(set(triggers.values())):
            infos = []
            for start in range(lo, index, batch):
                body = json.dumps([{"ts": float(ts[i]), "value": float(values[i])}
                                   for i in range(start, min(start + batch, index))
                                   if np.isfinite(values[i])]).encode()
                if body != b"[]":
                    infos += [client.publish(topic, body, qos=1) for topic in topics]
            received += len(infos)
            for info in infos:
                info.wait_for_publish(60)
            drained = watcher.wait_for(
                lambda: watcher.status["counters"].get("messages_received", 0) >= received
                and watcher.status.get("queue_depth", 1) == 0, timeout=120)
            if drained is None:
                raise SystemExit("delay: the agent did not drain the samples before an alarm")
            time.sleep(0.5)  # the worker finishes the batch it took from the queue
            alarms_before = len(watcher.alarms)
            body = json.dumps({"ts": float(ts[index]), "value": float(values[index])}).encode()
            sent = {}
            for c, topic in enumerate(topics):
                sent[f"d{c:03d}"] = time.time()
                client.publish(topic, body, qos=1)
            received += len(topics)
            expected += len(topics)
            watcher.wait_for(lambda: sum(1 for _, a in watcher.alarms[alarms_before:]
                                         if a.get("state") == "active") >= len(topics), 30)
            for arrived, alarm in watcher.alarms[alarms_before:]:
                if alarm.get("state") == "active" and alarm.get("asset") in sent:
                    delays.append(arrived - sent[alarm["asset"]])
            lo = index + 1
    finally:
        client.loop_stop()
        client.disconnect()
    return {
        "expected": expected,
        "alarm_raises": len(delays),
        "alarm_delay_ms_median": round(statistics.median(delays) * 1e3, 1) if delays else None,
        "alarm_delay_ms_p99": round(float(np.percentile(delays, 99)) * 1e3, 1)
        if delays else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2400,
                        help="samples per channel and phase (5-minute counts; 2,400 = 8 days)")
    parser.add_argument("--batched-samples", type=int, default=6000,
                        help="samples per channel for the batched phase (6,000 = 21 days)")
    parser.add_argument("--batch", type=int, default=100, help="samples per batched message")
    parser.add_argument("--single-rate", type=float, default=TARGETS["single"],
                        help="offered samples/s, single-sample messages (0: as fast as sent)")
    parser.add_argument("--batched-rate", type=float, default=TARGETS["batched"],
                        help="offered samples/s, batched payloads (0: as fast as sent)")
    parser.add_argument("--qos", type=int, choices=[0, 1], default=1,
                        help="QoS of the publisher's messages (gateways send 1)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "onnxruntime", "litert", "tensorrt"])
    parser.add_argument("--status-interval", type=float, default=0.2)
    parser.add_argument("--phases", default="single,batched,delay",
                        help="phases to run (targets of phases left out show as not run)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the agent with py-spy into this folder (one flame "
                             "graph per phase)")
    parser.add_argument("--seed", type=int, default=0, help="recorded; the data are fixed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    record = header("agent")
    record.update(seed=args.seed, backend_requested=args.backend, channels=CHANNELS, qos=args.qos,
                  bundle=str(BUNDLE.relative_to(ROOT)), phases={}, targets=[])
    ts_single, v_single = dodgers_stretch(args.samples)
    ts_batch, v_batch = dodgers_stretch(args.batched_samples)
    scored_single, _ = offline_reference(ts_single, v_single)
    scored_batch, triggers = offline_reference(ts_batch, v_batch)
    print(f"   offline reference: {scored_single} and {scored_batch} snapshots per channel, "
          f"{len(triggers)} alarm raises per channel in the batched phase")

    with tempfile.TemporaryDirectory(prefix="segwatch-bench-agent-") as tmp_name:
        tmp = Path(tmp_name)
        broker, port = start_mosquitto(tmp)
        watcher = agent = None
        try:
            watcher = Watcher(port)
            config = tmp / "agent.yaml"
            write_config(config, port, args.status_interval)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            log = open(tmp / "agent.log", "w")
            started = time.time()
            agent = subprocess.Popen([sys.executable, "-m", "agent", "--log-level", "warning",
                                      "run", "--config", str(config), "--backend",
                                      args.backend], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=tmp)
            if watcher.wait_for(lambda: watcher.status is not None, 120) is None:
                raise SystemExit(f"the agent did not report ready; see {tmp / 'agent.log'}:\n"
                                 + (tmp / "agent.log").read_text()[-2000:])
            ready_s = watcher.first_online - started
            backends = watcher.status.get("backends", {})
            record["agent_backend"] = next(iter(backends.values()), None) if backends else None
            print(f"   agent ready {ready_s:.2f} s after start; backend "
                  f"{record['agent_backend']}")
            record["ready_seconds"] = round(ready_s, 2)

            phases = args.phases.split(",")
            for kind, group, ts, values, rate, scored, trig in (
                    ("single", "s", ts_single, v_single, args.single_rate, scored_single, {}),
                    ("batched", "b", ts_batch, v_batch, args.batched_rate, scored_batch,
                     triggers)):
                if kind not in phases:
                    continue
                spy = _profile(args.profile, agent.pid, kind)
                result = run_phase(kind, group, watcher, port, ts, values, args.batch, rate,
                                   args.qos, tmp, scored, trig)
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(60)
                record["phases"][kind] = result
                print(f"   {kind}: {result['samples']:,} samples in {result['messages']:,} "
                      f"messages; sent at {result['publish_samples_per_s']:,.0f}/s, sustained "
                      f"{result['sustained_samples_per_s']:,.0f}/s, done "
                      f"{result['lag_after_last_send_s']:.2f} s after the last send; scored "
                      f"{result['snapshots_scored']} of {result['snapshots_expected']} "
                      f"snapshots; lossless {result['lossless']}; rejected {result['rejected']}")
            spy = _profile(args.profile, agent.pid, "delay") if "delay" in phases else None
            delay = (delay_phase(watcher, port, ts_batch, v_batch, args.batch, triggers)
                     if "delay" in phases else None)
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
            record["phases"]["delay"] = delay
            if delay:
                    print(f"   delay: {delay['alarm_raises']} alarm raises of {delay['expected']}, "
                      f"delay median {delay['alarm_delay_ms_median']} ms, p99 "
                      f"{delay['alarm_delay_ms_p99']} ms")
            record["memory_mb"] = {k: (round(v, 1) if isinstance(v, float) else v)
                                   for k, v in memory(agent.pid).items()}
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(60)
                except subprocess.TimeoutExpired:
                    agent.kill()
            if watcher is not None:
                watcher.close()
            broker.terminate()
            broker.wait(10)
    _targets(record)
    write_results("agent", record, args.out)
    return 0


def _profile(folder: Path | None, pid: int, phase: str):
    """py-spy recording the agent (all threads, native frames off) until interrupted."""
    if folder is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"agent-{phase}.txt"
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw",
                             "--output", str(out), "--rate", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _targets(record: dict) -> None:
    phases = record["phases"]
    single, batched, quiet = (phases.get(k) for k in ("single", "batched", "delay"))

    def rate(phase):
        if phase is None:
            return None
        return phase["sustained_samples_per_s"] if phase["lossless"] else 0.0

    rows = [
        ("single-sample messages/s, lossless", rate(single), TARGETS["single"], True,
         f">= {TARGETS['single']:,.0f}"),
        ("batched samples/s, lossless", rate(batched), TARGETS["batched"], True,
         f">= {TARGETS['batched']:,.0f}"),
        ("alarm delay p99 (ms)", quiet and (quiet["alarm_delay_ms_p99"] or float("inf")),
         TARGETS["delay_p99_ms"], False, f"< {TARGETS['delay_p99_ms']:.0f} beyond the hop"),
        ("agent peak RSS (MB)", record["memory_mb"]["VmHWM"], TARGETS["rss_mb"], False,
         f"< {TARGETS['rss_mb']:.0f}, TensorFlow mapped: "
         f"{record['memory_mb']['tensorflow_mapped']}"),
        ("start to ready (s)", record["ready_seconds"], None, False, "(no target)"),
    ]
    print("\n== targets (100 channels at once)")
    for label, value, target, higher, wanted in rows:
        if value is None:
            mark, shown = "not run", "-"
        else:
            mark = verdict(value, target, higher) if target is not None else "-"
            shown = f"{value:,.1f}"
        print(f"   {label:<36} {shown:>12}   target {wanted:<40} {mark}")
        record["targets"].append({"figure": label, "value": value, "target": target,
                                  "verdict": mark})
    if quiet and quiet["alarm_delay_ms_median"] is not None:
        print(f"   alarm delay median {quiet['alarm_delay_ms_median']:.1f} ms over "
              f"{quiet['alarm_raises']} raises of {quiet['expected']} (agent keeping up)")
    if batched and batched["alarm_delay_ms_median"] is not None:
        print(f"   under the batched load: median {batched['alarm_delay_ms_median']:.0f} ms, "
              f"p99 {batched['alarm_delay_ms_p99']:.0f} ms (includes the backlog)")


if __name__ == "__main__":
    sys.exit(main())
