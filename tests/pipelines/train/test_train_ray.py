"""End to end on a real local Ray + real DeepSpeed (CPU accelerator, gloo), `debug` preset, few steps.

Determinism: on CPU with fixed seeds, a run's per-step losses are a pure function of (config, step), so a
run that was killed and restarted (or stopped and resumed) from checkpoint M must reproduce the
uninterrupted run's losses after M bit for bit; the tests allow 1e-6.
ZeRO: stage 1/2/3 with 2 workers x micro batch 4 are compared with the same global batch trained in ONE
process with plain PyTorch (grad_accum 2 over the same rows, see pipelines/train/data.py): same init,
same AdamW param groups, LR schedule and clipping. They differ only in the order fp32 partial sums are
added (all-reduce / reduce-scatter across ranks vs accumulation in one process; CPUAdam vs torch AdamW
for offload), ~1e-7 relative per step; Adam divides by sqrt(v), which can amplify the relative error of
tiny gradient components, so over 8 steps we allow 1e-5 absolute on losses of 3-4 nats (measured: <4e-7;
30x margin for other CPUs and thread counts). A different seed moves the losses by >1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from train_testlib import base_config, reference_losses, train_losses

from pipelines.config import ConfigError
from pipelines.train import state as st
from pipelines.train.trainer import run

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = {"num_workers": 2, "zero_stage": 2, "max_steps": STEPS, "ckpt_interval": 4, "eval_interval": 4,
          "optim.decay_steps": 16, "keep_last_k": 2}


def _cfg(data, run_dir, **kw):
    # testing.pid_dir: the workers record their pids (attempts.jsonl), which the drills below read
    return base_config(data, run_dir, **{**COMMON, "testing.pid_dir": str(run_dir / "workers"), **kw})


# ref_run (conftest.py): the uninterrupted 2-worker ZeRO-2 run of _cfg, 16 steps, shared with test_train_stream_s3.py


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """Losses of the same global batch trained in one process with plain PyTorch (no Ray, no DeepSpeed)."""
    return reference_losses(_cfg(char_data, tmp_path_factory.mktemp("plain") / "run"), 8)


def test_run_outputs(ref_run):
    from gptcore.checkpoint import load_checkpoint

    rd, res = ref_run
    losses = train_losses(rd)
    assert sorted(losses) == list(range(1, 17))
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["kind"] == "train"]
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_rss_mb"):
        assert all(isinstance(r[k], float) and r[k] == r[k] for r in tr), k
    assert tr[0]["lr"] < tr[1]["lr"]  # warmup
    ev = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [4, 8, 12, 16] and all(r["val_ppl"] > 1 for r in ev)
    assert list((rd / "tb").glob("events.out.tfevents.*"))
    assert (rd / "loss_curve.png").stat().st_size > 1000
    # inference checkpoints: last and best, loadable by gptcore
    ck = load_checkpoint(rd / "last")
    assert ck.meta["step"] == 16 and ck.meta["parents"]["data_manifest_id"]
    assert (rd / "best" / "model.safetensors").is_file()
    # retention: the last keep_last_k=2 full checkpoints (Ray deletes older ones in the background)
    for _ in range(50):
        kept = sorted(p.name for p in (rd / "ray").glob("checkpoint_*") if p.is_dir())
        if kept == ["checkpoint_00000012", "checkpoint_00000016"]:
            break
        time.sleep(0.1)
    assert kept == ["checkpoint_00000012", "checkpoint_00000016"]
    man = st.verify_checkpoint_dir(rd / "ray" / "checkpoint_00000016")  # every rank's shard, checksums ok
    ranks = {v["rank"] for v in man["files"].values()}
    assert ranks == {0, 1}
    assert res.final_val_loss is not None and res.extra["peak_rss_mb"].keys() == {"rank_0", "rank_1"}


def _check_matches_reference(losses: dict[int, float], reference: dict[int, float], what: str) -> None:
    assert losses[8] < losses[1] - 0.3, f"{what} did not converge: {losses}"  # loss drops
    diff = max(abs(losses[s] - reference[s]) for s in range(1, 9))
    print(f"{what}: max |dloss| vs 1-process reference = {diff:.2e}")
    assert diff < 1e-5, f"{what} vs the 1-process reference: max |dloss| {diff:.2e}"


def test_zero2_two_workers_match_one_process(ref_run, reference):
    import platform

    from pipelines.train.metrics import read_metrics

    _check_matches_reference(train_losses(ref_run[0]), reference, "ZeRO-2, 2 workers")
    # the two CPU workers share this machine: DeepSpeed's collectives went through shared memory
    ready = [r for r in read_metrics(ref_run[0], "event") if r["event"] == "worker_ready"]
    if platform.machine() in ("x86_64", "AMD64"):
        assert ready and ready[0]["collectives"] == "shm", ready


@pytest.mark.parametrize("stage, extra", [
    (1, {}),
    # ZeRO-3 with optimizer AND parameter offload: DeepSpeed's CPUAdam (a JIT-built C++ op, ~90 s the first
    # time on a machine, cached in ~/.cache/torch_extensions) steps the offloaded partitions
    pytest.param(3, {"offload_optimizer": True, "offload_params": True}, marks=pytest.mark.cpu_adam),
])
def test_zero_stage_two_workers_match_one_process(ray_session, char_data, tmp_path, reference, stage, extra):
    from gptcore.checkpoint import load_checkpoint

    rd = tmp_path / f"z{stage}"
    run(_cfg(char_data, rd, zero_stage=stage, max_steps=8, ckpt_interval=0, eval_interval=0, **extra))
    _check_matches_reference(train_losses(rd), reference, f"ZeRO-{stage} {extra or ''}")
    # the consolidated checkpoint holds full weights (ZeRO-3: gathered from the partitions)
    ck = load_checkpoint(rd / "last")
    assert ck.model.transformer.wte.weight.shape == (ck.config.vocab_size, ck.config.n_embd)
    st.verify_checkpoint_dir(rd / "ray" / "checkpoint_00000008")


def _one_worker(char_data, rd, **kw):
    # the reference's global batch (2 micro batches of 4 rows) as 1 worker x grad_accum 2: the same rows
    return _cfg(char_data, rd, num_workers=1, zero_stage=0, max_steps=8, ckpt_interval=0, eval_interval=4,
                **{"batch.grad_accum": 2}, **kw)


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_one_worker_without_zero_matches_one_process(ray_session, char_data, tmp_path, reference, launcher):
    """1 worker, ZeRO-0: DeepSpeed's gradient all-reduce over a group of one is skipped (it only costs
    time), and the run is still exactly the reference's math: as a Ray Train actor (launcher=ray) and in
    this process (launcher=local, Ray Train's local mode), which leaves no process group behind."""
    import torch
    import torch.distributed as dist

    rd = tmp_path / "one"
    threads = torch.get_num_threads()
    res = run(_one_worker(char_data, rd, launcher=launcher))
    assert res.extra["launcher"] == launcher
    _check_matches_reference(train_losses(rd), reference, f"1 worker, ZeRO-0, launcher={launcher}")
    assert not dist.is_initialized() and torch.get_num_threads() == threads
    assert not {"RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)


def test_auto_launcher_is_local_for_one_worker_and_ray_otherwise(ray_session, char_data, tmp_path, monkeypatch):
    from pipelines.train.trainer import resolve_launcher

    one = _one_worker(char_data, tmp_path / "a")
    assert resolve_launcher(one) == "local"  # the session's Ray was started by this process (ensure_ray)
    assert resolve_launcher(_cfg(char_data, tmp_path / "b")) == "ray"  # 2 workers
    assert resolve_launcher(_one_worker(char_data, tmp_path / "c", max_failures=1)) == "ray"  # restarts
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster to join
    assert resolve_launcher(one) == "ray"
    with pytest.raises(ConfigError, match="launcher=ray: run .* was checkpointed by launcher=local; resume it "
                                          "with launcher=local"):
        resolve_launcher(_one_worker(char_data, tmp_path / "d", launcher="ray"), resumed_by="local")


def test_local_launcher_killed_then_resumed_continues_with_identical_losses(ray_session, char_data, tmp_path):
    """launcher=local commits its own checkpoints: `raygpt train` SIGKILLed after checkpoint 4 and resumed
    (launcher auto -> local, the launcher that wrote them) reproduces the uninterrupted run's losses, and keeps
    keep_last_k complete checkpoints with no half-written directory."""
    import subprocess
    import sys

    from pipelines.config import to_dict

    kw = {"num_workers": 1, "zero_stage": 0, "max_steps": 8, "ckpt_interval": 2, "launcher": "local"}
    ref = tmp_path / "ref"
    run(_cfg(char_data, ref, **kw))  # uninterrupted, in this process
    rd = tmp_path / "killed"
    conf = tmp_path / "killed.yaml"  # JSON is YAML
    conf.write_text(json.dumps(to_dict(_cfg(char_data, rd, **kw, **{"testing.throttle_s": 0.5}))))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", "--config", str(conf), "-q"],
                            cwd=Path(__file__).resolve().parents[3], env=env, stdout=subprocess.DEVNULL)
    snap = rd / "ray" / st.LOCAL_SNAPSHOT
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline:
            if snap.is_file() and json.loads(snap.read_text())["latest_checkpoint_dir_name"] >= "checkpoint_00000004":
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    # what a resume continues from is the committed snapshot; the published log (checkpoints.jsonl, last/) is
    # written just after each commit, so a kill in between leaves it one checkpoint behind, never ahead
    killed_at = int(json.loads(snap.read_text())["latest_checkpoint_dir_name"].rsplit("_", 1)[1])
    assert 4 <= killed_at < 8
    published = [json.loads(x)["step"] for x in (rd / "checkpoints.jsonl").read_text().splitlines()]
    assert max(published) in (killed_at, killed_at - 2), published

    res = run(_resume_cfg(rd, max_steps=8, launcher="auto", **{"testing": {"throttle_s": 0}}), resume=rd)
    assert res.extra["launcher"] == "local" and res.steps == 8
    resumed = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()
               if json.loads(x).get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["from_step"] == killed_at
    got, want = train_losses(rd), train_losses(ref)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    kept = json.loads(snap.read_text())["checkpoints"]
    assert kept == ["checkpoint_00000006", "checkpoint_00000008"]  # keep_last_k=2
    assert sorted(p.name for p in (rd / "ray").iterdir() if p.name != st.LOCAL_SNAPSHOT) == kept
    st.verify_checkpoint_dir(rd / "ray" / "checkpoint_00000008")


def test_bf16_autocast_with_torch_compile_tracks_the_fp32_run(ray_session, char_data, tmp_path, reference):
    """The nanoGPT recipe's settings (precision bf16 = autocast on CPU, compile true) train the same
    model: every step's loss within bf16 rounding of the fp32 reference, and evaluation runs through
    the compiled model too."""
    from pipelines.train.metrics import read_metrics
    from pipelines.train.trainer import _cpu_bf16_ok

    if not _cpu_bf16_ok():
        pytest.skip("this CPU has no bf16 matmul support (AVX512-BF16 / AMX): precision=bf16 is refused here")
    rd = tmp_path / "bf16c"
    run(_one_worker(char_data, rd, precision="bf16", compile=True))
    losses = train_losses(rd)
    diff = max(abs(losses[s] - reference[s]) for s in range(1, 9))
    print(f"bf16 + compile vs the fp32 reference: max |dloss| = {diff:.2e}")
    assert losses[8] < losses[1] - 0.3 and diff < 1e-2, (losses, reference)  # measured 5e-4
    assert [r["step"] for r in read_metrics(rd, "eval")] == [4, 8]


def _kill_after_checkpoint(run_dir: Path, step: int, rank: int, out: dict) -> threading.Thread:
    """Background: once checkpoint `step` is reported, SIGKILL the process of `rank`."""

    def go():
        log = run_dir / "checkpoints.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline:
            if log.is_file() and any(json.loads(x)["step"] >= step for x in log.read_text().splitlines()):
                pid = int((run_dir / "workers" / f"rank_{rank}.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                out["killed"] = pid
                out["after_step"] = max(json.loads(x)["step"] for x in log.read_text().splitlines())
                return
            time.sleep(0.05)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def killed_run(ray_session, char_data, tmp_path_factory):
    rd = tmp_path_factory.mktemp("kill") / "run"
    out: dict = {}
    killer = _kill_after_checkpoint(rd, 4, rank=1, out=out)
    res = run(_cfg(char_data, rd, max_failures=1, **{"testing.throttle_s": 0.3}))  # finishes by itself
    killer.join(timeout=5)
    return rd, res, out


def test_killed_worker_recovers_with_identical_losses(killed_run, ref_run):
    rd, res, out = killed_run
    assert out.get("killed"), "the worker was never killed"
    attempts = [json.loads(x) for x in (rd / "workers" / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 4, attempts  # 2 workers x 2 attempts: the group was restarted once
    assert out["killed"] in {a["pid"] for a in attempts[:2]} and out["killed"] not in {a["pid"] for a in attempts[2:]}
    resumed = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()
               if json.loads(x).get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["from_step"] >= 4
    got, want = train_losses(rd), train_losses(ref_run[0])
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once, from the run that counts
    for s in range(1, STEPS + 1):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    assert res.steps == STEPS


def test_resume_continues_with_identical_losses(killed_run, ref_run, capsys):
    """`raygpt train --resume RUN_DIR max_steps=16`: the stopped run (ended at step 12) continues."""
    from pipelines.cli import main

    rd = killed_run[0]
    assert main(["train", "--resume", str(rd), "max_steps=16", "testing.throttle_s=0"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex('{\n  "run_dir"'):])["steps"] == 16
    got, want = train_losses(rd), train_losses(ref_run[0])
    assert sorted(got) == list(range(1, 17))
    for s in range(1, 17):
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])


# ---- missing / corrupt checkpoints: loud errors before any worker starts --------------------------


def _copy_run(ref_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(ref_dir, dst)
    return dst


def _resume_cfg(rd: Path, **changes):
    """The run's saved config (what `raygpt train --resume RUN_DIR key=value` starts from) + changes."""
    from pipelines.config import from_dict
    from pipelines.train.config import TrainConfig

    saved = json.loads((rd / "config.json").read_text())["config"]
    saved.update({"max_steps": 20, "run_dir": str(rd), **changes})
    return from_dict(TrainConfig, saved)


def _attempts(rd: Path) -> int:
    return len((rd / "workers" / "attempts.jsonl").read_text().splitlines())


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "corrupt", "bytes"]),
    ("flip", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "corrupt", "sha256"]),
    ("delete_shard", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "missing"]),
    ("delete_checkpoint", ["checkpoint_00000016", "does not exist"]),
    ("no_checkpoints", ["holds no checkpoint"]),
])
def test_corrupt_or_missing_checkpoint_is_a_loud_error(ref_run, tmp_path, damage, words):
    rd = _copy_run(ref_run[0], tmp_path)
    ck = rd / "ray" / "checkpoint_00000016"
    shard = ck / "ds" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    before = _attempts(rd)
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip":
        b = bytearray(shard.read_bytes())
        b[len(b) // 2] ^= 0xFF
        shard.write_bytes(bytes(b))
    elif damage == "delete_shard":
        shard.unlink()
    elif damage == "delete_checkpoint":
        shutil.rmtree(ck)
    else:
        shutil.rmtree(rd / "ray")
    with pytest.raises(ConfigError) as e:
        run(_resume_cfg(rd), resume=rd)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert _attempts(rd) == before  # no worker started: never a silent fresh start


def test_fresh_run_refuses_an_existing_run_dir(ref_run, tmp_path):
    rd = _copy_run(ref_run[0], tmp_path)
    cfg = _resume_cfg(rd)
    with pytest.raises(ConfigError, match="already holds a training run.*--resume"):
        run(cfg)
    cfg = _resume_cfg(rd)
    cfg.seed = 99
    with pytest.raises(ConfigError, match="cannot resume .* seed=99"):
        run(cfg, resume=rd)
