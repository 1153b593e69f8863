"""Cron parsing, crontab lines and Kubernetes manifests of `raygpt schedule`."""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import datetime

import pytest
import yaml

from pipelines.ops.schedule import (
    MARKER,
    CronError,
    CronExpr,
    crontab_line,
    install_crontab,
    k8s_manifests,
    nightly_command,
)

REPO_ARGS = dict(cwd=str(__import__("pathlib").Path(__file__).resolve().parents[3]))


def nxt(expr: str, after: str, n: int = 3) -> list[str]:
    return [t.strftime("%Y-%m-%d %H:%M %a") for t in CronExpr.parse(expr).next_after(datetime.fromisoformat(after), n)]


def test_cron_fields_ranges_steps_lists_names():
    c = CronExpr.parse("0 2 * * *")
    assert c.minute == {0} and c.hour == {2} and len(c.dom) == 31 and len(c.dow) == 7
    assert CronExpr.parse("*/15 9-17/4 1,15 jan-mar mon-fri").hour == {9, 13, 17}
    assert CronExpr.parse("*/15 * * * *").minute == {0, 15, 30, 45}
    assert CronExpr.parse("5/20 * * * *").minute == {5, 25, 45}
    assert CronExpr.parse("0 0 * * 7").dow == {0}  # 7 = Sunday
    assert CronExpr.parse("@daily").minute == {0} and CronExpr.parse("@hourly").hour == set(range(24))


@pytest.mark.parametrize("bad, needle", [
    ("0 2 * *", "needs 5"), ("60 2 * * *", "minute value 60 is out of range 0-59"),
    ("0 24 * * *", "hour value 24"), ("0 0 0 * *", "day-of-month value 0"), ("0 0 * 13 *", "month value 13"),
    ("0 0 * * 8", "day-of-week value 8"), ("*/0 * * * *", "step"), ("5-1 * * * *", "backwards"),
    ("a * * * *", "not a number"), ("@sometimes", "unknown macro"), ("0 0 30 feb *", "never fires"),
])
def test_cron_rejects_bad_expressions(bad, needle):
    with pytest.raises(CronError, match=needle):
        CronExpr.parse(bad).next_after(datetime(2024, 1, 1), 1)


def test_cron_next_fire_times():
    assert nxt("0 2 * * *", "2024-05-01T01:59") == ["2024-05-01 02:00 Wed", "2024-05-02 02:00 Thu",
                                                      "2024-05-03 02:00 Fri"]
    assert nxt("0 2 * * *", "2024-05-01T02:00", 1) == ["2024-05-02 02:00 Thu"]  # strictly after
    assert nxt("30 23 * * sat,sun", "2024-05-01T00:00", 2) == ["2024-05-04 23:30 Sat", "2024-05-05 23:30 Sun"]
    # day-of-month and day-of-week both restricted: either matches (Vixie cron)
    assert nxt("0 0 13 * fri", "2024-09-01T00:00", 3) == ["2024-09-06 00:00 Fri", "2024-09-13 00:00 Fri",
                                                          "2024-09-20 00:00 Fri"]
    assert nxt("0 0 29 2 *", "2024-03-01T00:00", 1) == ["2028-02-29 00:00 Tue"]
    assert nxt("0 12 1 */3 *", "2024-02-15T00:00", 2) == ["2024-04-01 12:00 Mon", "2024-07-01 12:00 Mon"]


def test_crontab_line_and_install_replace_only_our_line(tmp_path):
    cmd = nightly_command("/srv/raygpt", "/srv/raygpt/.venv/bin/python", "jobs/configs/nightly.yaml",
                          extra=["generate.concurrency=2"], log="/var/log/raygpt.log")
    line = crontab_line("0 2 * * *", cmd)
    fields = line.split()
    CronExpr.parse(" ".join(fields[:5]))
    assert fields[:5] == ["0", "2", "*", "*", "*"] and line.endswith(f"{MARKER}nightly")
    assert "-m jobs.nightly_generate --date yesterday --config jobs/configs/nightly.yaml generate.concurrency=2" in line
    with pytest.raises(CronError):
        crontab_line("0 2 * *", cmd)
    sub = nightly_command("/r", "/r/.venv/bin/python", "c.yaml", address="http://10.0.0.1:8265")
    assert "-m pipelines.cli submit nightly --address http://10.0.0.1:8265 -- --date yesterday" in sub

    # a stand-in `crontab` binary (the real one edits the user's table): -l prints, - stores stdin
    store = tmp_path / "table"
    store.write_text("# keep me\n15 * * * * other-job\n0 1 * * * old # raygpt-schedule:nightly\n")
    fake = tmp_path / "crontab"
    fake.write_text(f"#!/bin/sh\nif [ \"$1\" = -l ]; then cat {store}; else cat > {store}; fi\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    install_crontab(line, crontab=str(fake))
    install_crontab(line, crontab=str(fake))  # idempotent
    lines = store.read_text().splitlines()
    assert lines == ["# keep me", "15 * * * * other-job", line]


def test_schedule_cron_cli_validates_and_prints():
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "schedule", "cron", "--at", "0 3 * * 1-5",
                          "--repo", "/srv/raygpt", "--", "generate.batch_size=8"], capture_output=True, text=True,
                         **REPO_ARGS)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("0 3 * * 1-5 cd /srv/raygpt && ") and "generate.batch_size=8" in out.stdout
    assert "next runs" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "schedule", "cron", "--at", "0 3 * * 9"],
                         capture_output=True, text=True, **REPO_ARGS)
    assert bad.returncode == 2 and "day-of-week value 9" in bad.stderr and "Traceback" not in bad.stderr


def _by_kind(docs):
    return {d["kind"]: d for d in docs}


def test_k8s_cronjob_creates_a_rayjob_per_night():
    docs = k8s_manifests(at="0 2 * * *", image="registry/raygpt:1", name="gen", namespace="ml",
                         extra=["generate.concurrency=4"], worker_gpu=1, auth_secret="ray-token")
    k = _by_kind(docs)
    assert set(k) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    cj = k["CronJob"]
    assert cj["apiVersion"] == "batch/v1" and cj["metadata"]["namespace"] == "ml"
    assert cj["spec"]["schedule"] == "0 2 * * *" and cj["spec"]["concurrencyPolicy"] == "Forbid"
    CronExpr.parse(cj["spec"]["schedule"])
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "gen" and pod["restartPolicy"] == "Never"
    script = pod["containers"][0]["command"][-1]
    assert "create -f /tmp/rayjob.yaml" in script and "SUCCEEDED" in script
    assert {"apiGroups": ["ray.io"], "resources": ["rayjobs"],
            "verbs": ["get", "list", "create", "watch"]} in k["Role"]["rules"]
    rayjob = yaml.safe_load(k["ConfigMap"]["data"]["rayjob.yaml"])
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"] == "gen-__DAY__"  # one RayJob per date: a retry cannot start a second
    spec = rayjob["spec"]
    assert spec["entrypoint"] == ("python -m jobs.nightly_generate --date __DATE__ --config "
                                  "jobs/configs/nightly.yaml generate.concurrency=4")
    assert spec["shutdownAfterJobFinishes"] is True
    rcs = spec["rayClusterSpec"]
    assert rcs["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "registry/raygpt:1"
    worker = rcs["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    # token auth through KubeRay's authOptions, not pod env (issue 14): the operator and the submitter read it there
    assert rcs["authOptions"] == {"mode": "token", "secretName": "ray-token"} and "env" not in worker
    assert pod["containers"][0]["image"] == "registry/raygpt:1"  # kubectl comes from the raygpt image


def test_k8s_raycronjob_alternative_and_cli_yaml():
    (doc,) = k8s_manifests(at="@daily", image="img", kind="raycronjob")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCronJob"
    # RayCronJobSpec is jobTemplate, schedule, suspend, timeZone only (issue 14): the run lock guards overlap
    assert doc["spec"]["schedule"] == "@daily" and set(doc["spec"]) == {"schedule", "timeZone", "jobTemplate"}
    jt = doc["spec"]["jobTemplate"]
    assert jt["entrypoint"].startswith("python -m jobs.nightly_generate --date yesterday")
    assert "headGroupSpec" in jt["rayClusterSpec"] and jt["rayClusterSpec"]["workerGroupSpecs"]
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "schedule", "k8s", "--at", "0 2 * * *",
                          "--image", "img:2"], capture_output=True, text=True, **REPO_ARGS)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]


def test_shipped_kuberay_manifests_are_consistent():
    from pathlib import Path

    d = Path(__file__).resolve().parents[3] / "cluster" / "kuberay"
    cron = list(yaml.safe_load_all((d / "cronjob-nightly.yaml").read_text()))
    rcj = yaml.safe_load((d / "raycronjob-nightly.yaml").read_text())
    cj = _by_kind(cron)["CronJob"]
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    CronExpr.parse(cj["spec"]["schedule"])
    assert rcj["kind"] == "RayCronJob" and "rayClusterSpec" in rcj["spec"]["jobTemplate"]
    CronExpr.parse(rcj["spec"]["schedule"])
