"""Multi-node drill driver: a 2-node Ray cluster on this machine, prep + 2-worker training, a node lost mid-run.

    RAY_TMPDIR=$(mktemp -d /tmp/rgmnXXXX) python tests/multinode_driver.py --shared-data ../shared/data \
        --work /tmp/mn-work --out /tmp/mn-work/result.json

Run by tests/test_multinode.py in its own process: a process can be connected to only one Ray cluster, and
the pytest process may already hold the session's local Ray. Steps: start a head node and one worker
node with `ray.cluster_utils.Cluster` (2 CPUs each, plus one `raygpt_train_slot` resource per node, which
every training worker asks for, so the two ranks land on different nodes); prep char-level Tiny
Shakespeare with `pipelines.data.run`; train 2 workers with `pipelines.train.run` (max_failures=1); once
checkpoint 4 is committed and step 6 logged, kill the worker node's processes (a lost VM: no graceful drain), then add a
fresh node with the same resources (what an autoscaler does) so the restarted worker group can be placed.
Writes the facts the test asserts on (node ids, which rank ran where in each attempt, the last train step
seen before the restart, the resume step) to --out as JSON. Does not: assert anything (the test does),
or run without ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "pipelines" / "train"))  # train_testlib.base_config

SLOT = "raygpt_train_slot"  # custom resource: 1 per node, 1 per training worker -> one worker per node
NODE_ARGS = {"num_cpus": 2, "resources": {SLOT: 1}, "object_store_memory": 200 * 1024 * 1024}
# a killed node's raylet refuses connections at once; 5 failed health checks 1 s apart mark it dead
# (default: 5 x 3 s), which is when Ray Train's controller can tear the broken worker group down
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5,
                 "health_check_timeout_ms": 5000}
# the worker node is killed once checkpoint 4 is committed AND step 6 is logged: the restart must redo
# steps 5-6 from checkpoint 4 (lost work < one checkpoint interval)
STEPS, CKPT_INTERVAL, KILL_AFTER_CKPT, KILL_AT_STEP = 12, 4, 4, 6


def say(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet / a line half written
        return []


def _ppid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class Drill:
    """Runs in the MAIN thread (Ray's node objects register signal handlers, so nodes can only be added
    there) while training runs in another: once checkpoint KILL_AFTER_CKPT is committed and step
    KILL_AT_STEP logged, kill the worker node and add a replacement.

    It also records, while the processes live, each training worker's parent pid (a Ray worker process is
    a child of its node's raylet): a second view, besides the GCS actor table, of which node each rank ran
    on; and the highest train step logged before the restart (metrics.jsonl is rewritten on resume)."""

    def __init__(self, cluster, victim, run_dir: Path, training: threading.Thread):
        self.cluster, self.victim, self.run_dir, self.training = cluster, victim, run_dir, training
        self.facts: dict = {"worker_ppid": {}, "max_step_before_restart": None}

    def _watch_pids(self) -> None:
        for a in _jsonl(self.run_dir / "workers" / "attempts.jsonl"):
            if a["pid"] not in self.facts["worker_ppid"]:
                self.facts["worker_ppid"][a["pid"]] = _ppid(a["pid"])

    def run(self) -> None:
        f = self.facts
        ckpts = self.run_dir / "checkpoints.jsonl"
        metrics = self.run_dir / "metrics.jsonl"
        max_step = 0
        while self.training.is_alive():
            self._watch_pids()
            max_step = max([max_step] + [r["step"] for r in _jsonl(metrics) if r.get("kind") == "train"])
            done = [c["step"] for c in _jsonl(ckpts)]
            if done and max(done) >= KILL_AFTER_CKPT and max_step >= KILL_AT_STEP:
                break
            time.sleep(0.05)
        else:
            return  # training ended (or failed) before the drill could start
        f["checkpoints_before_removal"] = done
        f["max_step_at_removal"] = max_step
        say(f"checkpoint {max(done)} committed, train step {max_step} logged: killing the worker node "
            f"{self.victim.node_id[:12]}")
        t0 = time.time()
        self.cluster.remove_node(self.victim, allow_graceful=False)
        f["removed_node"] = self.victim.node_id
        say(f"worker node removed in {time.time() - t0:.1f}s; adding a replacement node (autoscaler)")
        new = self.cluster.add_node(**NODE_ARGS)
        f["replacement_node"] = new.node_id
        f["replacement_raylet_pid"] = new.all_processes["raylet"][0].process.pid
        say(f"replacement node {new.node_id[:12]} is up ({time.time() - t0:.1f}s after the removal)")
        # until the restarted group reports its resume: the last step the lost attempt logged
        while self.training.is_alive():
            self._watch_pids()
            recs = _jsonl(metrics)
            resumed = [r for r in recs if r.get("event") == "resumed"]
            if resumed:
                f["max_step_before_restart"] = max_step
                f["resumed_from_step"] = resumed[0]["from_step"]
                say(f"restarted: resumed from step {resumed[0]['from_step']} (lost attempt logged step {max_step})")
                break
            max_step = max([max_step] + [r["step"] for r in recs if r.get("kind") == "train"])
            time.sleep(0.05)
        while self.training.is_alive():  # the new workers' parents, while they live
            self._watch_pids()
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared-data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"ok": False}
    # SIGTERM (the test's timeout) -> SystemExit -> the finally below stops the cluster (once a node is
    # up, Ray's own SIGTERM handler kills the node processes first, then exits the same way)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import ray
    from ray.cluster_utils import Cluster

    cluster = None
    t_start = time.time()
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            **NODE_ARGS, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
        worker = cluster.add_node(**NODE_ARGS)
        nodes = {"head": cluster.head_node.node_id, "worker": worker.node_id}
        raylets = {cluster.head_node.all_processes["raylet"][0].process.pid: nodes["head"],
                   worker.all_processes["raylet"][0].process.pid: nodes["worker"]}
        say(f"cluster up in {time.time() - t_start:.1f}s: head {nodes['head'][:12]}, worker {nodes['worker'][:12]}")
        ray.init(address=cluster.address, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        alive = [n for n in ray.nodes() if n["Alive"]]
        out["cluster_nodes"] = sorted(n["NodeID"] for n in alive)
        out["slots_per_node"] = {n["NodeID"]: n["Resources"].get(SLOT, 0) for n in alive}

        # ---- prep, on the 2-node cluster ----------------------------------------------------
        from pipelines.config import load_config
        from pipelines.data import PrepConfig
        from pipelines.data import run as prep

        t0 = time.time()
        src = Path(args.shared_data) / "tinyshakespeare" / "input.txt"
        pcfg = load_config(PrepConfig, None, base={
            "name": "mn-shakespeare-char", "output": str(work / "data"), "kind": "pretrain", "progress": False,
            "inputs": [{"path": str(src), "format": "text", "text_mode": "file"}], "steps": [],
            "tokenizer": {"kind": "char"}, "pack": {"block_size": 64, "val_fraction": 0.0},
            "write": {"data_card": False}})
        manifest = prep(pcfg)
        out["prep"] = {"rows": manifest["splits"]["train"]["rows"], "vocab_size": manifest["vocab_size"],
                       "id": manifest.get("id"), "seconds": time.time() - t0}
        say(f"prep done in {time.time() - t0:.1f}s: {out['prep']['rows']} train rows")

        # ---- train: 2 workers, one per node; lose the worker node after checkpoint 4 ---------
        from train_testlib import base_config

        from pipelines.train.trainer import run as train

        run_dir = work / "run"
        cfg = base_config(work / "data", run_dir, **{
            "num_workers": 2, "zero_stage": 2, "max_steps": STEPS, "ckpt_interval": CKPT_INTERVAL,
            "eval_interval": 0, "keep_last_k": 2, "max_failures": 1, "testing.throttle_s": 0.25,
            "testing.pid_dir": str(run_dir / "workers"),
            # both "nodes" share this machine: without this, DeepSpeed's collectives would go through
            # /dev/shm; the drill is about gloo across nodes
            "shm_collectives": False,
            "resources_per_worker": {"CPU": 1, SLOT: 1}, "optim.decay_steps": STEPS + 4,
            "log.tensorboard": False, "log.plot": False})
        box: dict = {}

        def _train() -> None:
            try:
                box["result"] = train(cfg)
            except BaseException as e:
                box["error"] = e

        training = threading.Thread(target=_train, name="train", daemon=True)
        t0 = time.time()
        training.start()
        drill = Drill(cluster, worker, run_dir, training)
        drill.run()
        training.join()
        if "error" in box:
            raise box["error"]
        res = box["result"]
        say(f"training finished by itself in {time.time() - t0:.1f}s at step {res.steps}")

        # which Ray node each training worker process ran on: the GCS actor table (dead actors stay listed)
        from pipelines._ray_compat import global_state

        ray_state = global_state()

        actors = [a for a in ray_state.actors().values() if a.get("ActorClassName") == "RayTrainWorker"]
        pid_node = {a["Pid"]: a["Address"]["NodeID"] for a in actors if a.get("Pid")}
        if drill.facts.get("replacement_raylet_pid"):
            raylets[drill.facts["replacement_raylet_pid"]] = drill.facts["replacement_node"]
        attempts = _jsonl(run_dir / "workers" / "attempts.jsonl")
        for a in attempts:
            a["node_id_gcs"] = pid_node.get(a["pid"])
            # the loop may record it itself one day; keep what it wrote
            a.setdefault("node_id", a["node_id_gcs"])
            a["node_id_raylet"] = raylets.get(drill.facts["worker_ppid"].get(a["pid"]))
        out.update({
            "ok": True, "nodes": {**nodes, "replacement": drill.facts.get("replacement_node")},
            "attempts": attempts, "drill": {k: v for k, v in drill.facts.items() if k != "worker_ppid"},
            "steps": res.steps, "run_dir": str(run_dir), "ckpt_interval": CKPT_INTERVAL, "max_steps": STEPS,
            "kill_at_step": KILL_AT_STEP,
            "train_steps": [r["step"] for r in _jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"],
            "resumed": [r for r in _jsonl(run_dir / "metrics.jsonl") if r.get("event") == "resumed"],
            "checkpoints": _jsonl(run_dir / "checkpoints.jsonl"),
            "collectives": [r.get("collectives") for r in _jsonl(run_dir / "metrics.jsonl")
                            if r.get("event") == "worker_ready"],
            "wall_s": time.time() - t_start,
        })
        return 0
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        say(f"FAILED: {out['error']}")
        return 1
    finally:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
                say(f"cluster shut down ({time.time() - t_start:.1f}s in all)")


if __name__ == "__main__":
    sys.exit(main())
