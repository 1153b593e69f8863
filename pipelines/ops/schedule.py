"""Schedules for the nightly generation: a validated crontab line, or Kubernetes manifests (a CronJob
that creates a KubeRay RayJob, or KubeRay's RayCronJob).

    raygpt schedule cron --at "0 2 * * *" [--install] [--address http://HOST:8265] [-- extra nightly args]
    raygpt schedule k8s --at "0 2 * * *" --image REGISTRY/raygpt:TAG [--kind cronjob|raycronjob] > nightly.yaml

Cron expressions: 5 fields (minute hour day-of-month month day-of-week) with `*`, lists, ranges,
steps, month/day names, day-of-week 0-7 (0 and 7 = Sunday), and the @hourly/@daily/@midnight/
@weekly/@monthly/@yearly/@annually macros; day-of-month and day-of-week combine with OR when both
are restricted (Vixie cron). `CronExpr.next_after(dt)` gives the next fire times.
Does not: talk to a Kubernetes API server (it prints YAML), or run anything itself.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pipelines.errors import UserError

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
_MONTHS = {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lo, hi, names)
_FIELDS = (("minute", 0, 59, {}), ("hour", 0, 23, {}), ("day-of-month", 1, 31, {}),
           ("month", 1, 12, _MONTHS), ("day-of-week", 0, 7, _DAYS))
MARKER = "# raygpt-schedule:"


class CronError(UserError, ValueError):
    """An invalid cron expression; the message names the field, the value and the allowed range."""


def _value(tok: str, name: str, lo: int, hi: int, names: dict[str, int], expr: str) -> int:
    t = tok.lower()
    if t in names:
        return names[t]
    if not t.isdigit():
        allowed = f"{lo}-{hi}" + (f" or names {', '.join(names)}" if names else "")
        raise CronError(f"cron {expr!r}: {name} value {tok!r} is not a number ({allowed})")
    v = int(t)
    if not lo <= v <= hi:
        raise CronError(f"cron {expr!r}: {name} value {v} is out of range {lo}-{hi}")
    return v


def _parse_field(text: str, name: str, lo: int, hi: int, names: dict[str, int], expr: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        if not part:
            raise CronError(f"cron {expr!r}: empty list item in {name} field {text!r}")
        rng, _, step_s = part.partition("/")
        step = 1
        if _:
            if not step_s.isdigit() or int(step_s) == 0:
                raise CronError(f"cron {expr!r}: {name} step {step_s!r} must be a positive integer")
            step = int(step_s)
        if rng == "*":
            a, b = lo, hi
        elif "-" in rng:
            a_s, b_s = rng.split("-", 1)
            a = _value(a_s, name, lo, hi, names, expr)
            b = _value(b_s, name, lo, hi, names, expr)
            if a > b:
                raise CronError(f"cron {expr!r}: {name} range {rng!r} runs backwards ({a} > {b})")
        else:
            a = _value(rng, name, lo, hi, names, expr)
            b = hi if _ else a  # "5/15" = from 5 every 15
        out.update(range(a, b + 1, step))
    if name == "day-of-week" and 7 in out:
        out.discard(7)
        out.add(0)
    return frozenset(out)


@dataclass(frozen=True)
class CronExpr:
    text: str
    minute: frozenset[int]
    hour: frozenset[int]
    dom: frozenset[int]
    month: frozenset[int]
    dow: frozenset[int]
    dom_any: bool
    dow_any: bool

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        expr = (text or "").strip()
        src = MACROS.get(expr.lower(), expr)
        if src.startswith("@"):
            raise CronError(f"cron {expr!r}: unknown macro; use one of {sorted(MACROS)} or 5 fields")
        parts = src.split()
        if len(parts) != 5:
            raise CronError(f"cron {expr!r} has {len(parts)} field(s); it needs 5: minute hour day-of-month month "
                            f"day-of-week (e.g. \"0 2 * * *\" = every day at 02:00)")
        sets = [_parse_field(p, n, lo, hi, names, expr) for p, (n, lo, hi, names) in zip(parts, _FIELDS)]
        return cls(expr, *sets, dom_any=parts[2].startswith("*"), dow_any=parts[4].startswith("*"))

    def matches(self, dt: datetime) -> bool:
        if dt.minute not in self.minute or dt.hour not in self.hour or dt.month not in self.month:
            return False
        dom_ok = dt.day in self.dom
        dow_ok = (dt.isoweekday() % 7) in self.dow
        if self.dom_any or self.dow_any:
            return dom_ok and dow_ok
        return dom_ok or dow_ok  # both restricted: either matches (Vixie cron)

    def next_after(self, dt: datetime, count: int = 1) -> list[datetime]:
        """The next `count` fire times strictly after `dt` (same tz as dt)."""
        out = []
        t = dt.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 8)  # Feb 29 on a given weekday recurs within 28 years; 8 is plenty
        while len(out) < count:
            if t > limit:
                if not out:
                    raise CronError(f"cron {self.text!r} never fires (e.g. 30 February)")
                break
            if t.month not in self.month:
                t = (t.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
                continue
            day_ok = self.matches(t.replace(hour=min(self.hour), minute=min(self.minute)))
            if not day_ok:
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hour:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minute:
                t += timedelta(minutes=1)
                continue
            out.append(t)
            t += timedelta(minutes=1)
        return out


# ---------------------------------------------------------------------------------------------
# crontab


def nightly_command(repo: str, python: str, config: str, *, address: str | None = None,
                    extra: list[str] | None = None, log: str | None = None) -> str:
    """The shell command cron runs: the nightly entrypoint directly, or submitted to a cluster."""
    args = ["--date", "yesterday", "--config", config, *(extra or [])]
    if address:
        cmd = [python, "-m", "pipelines.cli", "submit", "nightly", "--address", address, "--", *args]
    else:
        cmd = [python, "-m", "jobs.nightly_generate", *args]
    line = f"cd {shlex.quote(repo)} && " + " ".join(shlex.quote(c) for c in cmd)
    if log:
        line += f" >> {shlex.quote(log)} 2>&1"
    return line.replace("%", r"\%")  # cron turns a bare % into a newline


def crontab_line(at: str, command: str, name: str = "nightly") -> str:
    CronExpr.parse(at)
    return f"{at} {command} {MARKER}{name}"


def install_crontab(line: str, name: str = "nightly", crontab: str = "crontab") -> str:
    """Replace the raygpt line called `name` in the user's crontab (others are kept); returns the new table."""
    try:
        cur = subprocess.run([crontab, "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{crontab!r} is not installed; install cron (apt-get install cron) or add the line "
                           f"by hand:\n{line}") from None
    existing = cur.stdout if cur.returncode == 0 else ""  # "no crontab for user" -> empty
    kept = [ln for ln in existing.splitlines() if not ln.rstrip().endswith(f"{MARKER}{name}")]
    table = "\n".join(kept + [line]) + "\n"
    res = subprocess.run([crontab, "-"], input=table, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"crontab - failed ({res.returncode}): {res.stderr.strip()}")
    return table


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _ray_cluster_spec(image: str, ray_version: str, head_cpu: str, worker_replicas: int, worker_cpu: str,
                      worker_gpu: int, auth_secret: str | None) -> dict[str, Any]:
    def container(name: str, cpu: str, gpu: int) -> dict[str, Any]:
        limits: dict[str, Any] = {"cpu": cpu, "memory": "8Gi"}
        if gpu:
            limits["nvidia.com/gpu"] = gpu
        c: dict[str, Any] = {"name": name, "image": image, "resources": {"limits": limits, "requests": dict(limits)}}
        return c

    spec: dict[str, Any] = {
        "rayVersion": ray_version,
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0"},  # the head schedules no work: drivers and actors go to workers
            "template": {"spec": {"containers": [container("ray-head", head_cpu, 0)]}},
        },
        "workerGroupSpecs": [{
            "groupName": "generate", "replicas": worker_replicas, "minReplicas": worker_replicas,
            "maxReplicas": worker_replicas, "rayStartParams": {},
            "template": {"spec": {"containers": [container("ray-worker", worker_cpu, worker_gpu)]}},
        }],
    }
    if auth_secret:
        # Ray token auth through KubeRay (>= 1.6.0 for secretName): the operator puts RAY_AUTH_MODE and
        # RAY_AUTH_TOKEN (from the Secret's key `auth_token`) into every Ray container, the autoscaler and the
        # RayJob submitter, and uses the token for its own dashboard calls. Env vars alone reach only the pods.
        spec["authOptions"] = {"mode": "token", "secretName": auth_secret}
    return spec


def rayjob_spec(*, image: str, entrypoint: str, ray_version: str = "2.60.0", head_cpu: str = "2",
                worker_replicas: int = 1, worker_cpu: str = "4", worker_gpu: int = 0,
                auth_secret: str | None = None, active_deadline_s: int = 6 * 3600) -> dict[str, Any]:
    return {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,  # the cluster lives only as long as the night's job
        "ttlSecondsAfterFinished": 3600,
        "activeDeadlineSeconds": active_deadline_s,
        "backoffLimit": 0,  # a failed night is retried by the next schedule (resume makes that cheap)
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": _ray_cluster_spec(image, ray_version, head_cpu, worker_replicas, worker_cpu, worker_gpu,
                                            auth_secret),
    }


def _cronjob_spec(at: str, name: str, namespace: str, kubectl_image: str) -> dict[str, Any]:
    """The batch/v1 CronJob spec whose pod renders tonight's RayJob from the ConfigMap, creates it once
    (named after the date) and waits for it to finish."""
    script = "\n".join([
        "set -eu",
        'DATE=$(date -u -d "@$(( $(date +%s) - 86400 ))" +%Y-%m-%d)  # yesterday, UTC (busybox-compatible)',
        'DAY=$(echo "$DATE" | tr -d -)',
        'sed -e "s/__DATE__/$DATE/g" -e "s/__DAY__/$DAY/g" /template/rayjob.yaml > /tmp/rayjob.yaml',
        f'NAME={name}-$DAY',
        '# one RayJob per date: if it exists (a retried pod), wait for it instead of starting another',
        f'kubectl -n {namespace} get rayjob "$NAME" >/dev/null 2>&1 || kubectl -n {namespace} create -f /tmp/rayjob.yaml',
        'while true; do',
        f'  S=$(kubectl -n {namespace} get rayjob "$NAME" -o jsonpath="{{.status.jobDeploymentStatus}}")',
        '  case "$S" in Complete|Failed) break;; esac',
        '  sleep 30',
        'done',
        f'J=$(kubectl -n {namespace} get rayjob "$NAME" -o jsonpath="{{.status.jobStatus}}")',
        'echo "RayJob $NAME: $J"',
        'test "$J" = SUCCEEDED',
    ])
    cron_spec: dict[str, Any] = {
        "schedule": at,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {"spec": {"backoffLimit": 1, "template": {"spec": {
            "serviceAccountName": name, "restartPolicy": "Never",
            "containers": [{"name": "create-rayjob", "image": kubectl_image,
                            "command": ["/bin/sh", "-c", script],
                            "volumeMounts": [{"name": "template", "mountPath": "/template"}]}],
            "volumes": [{"name": "template", "configMap": {"name": f"{name}-rayjob"}}],
        }}}},
    }
    return cron_spec


def k8s_manifests(*, at: str, image: str, name: str = "raygpt-nightly", namespace: str = "default",
                  kind: str = "cronjob", config: str = "jobs/configs/nightly.yaml", extra: list[str] | None = None,
                  kubectl_image: str | None = None, time_zone: str | None = "Etc/UTC",
                  **spec_kw: Any) -> list[dict[str, Any]]:
    """Manifests for `kubectl apply -f`: kind="cronjob" -> ServiceAccount, Role, RoleBinding, ConfigMap and a
    batch/v1 CronJob whose pod creates one RayJob per night (named after the date: idempotent) and waits for
    it; kind="raycronjob" -> one ray.io/v1 RayCronJob (KubeRay's own cron: alpha, KubeRay >= 1.6.0 with the
    operator's feature gate RayCronJob=true; `timeZone` needs KubeRay >= 1.7.0, pass time_zone=None for 1.6).
    The CronJob's pod runs kubectl from `kubectl_image`, by default the raygpt image (cluster/Dockerfile
    installs a pinned kubectl)."""
    CronExpr.parse(at)
    if kind not in ("cronjob", "raycronjob"):
        raise ValueError(f"kind must be cronjob or raycronjob, got {kind!r}")
    args = " ".join(shlex.quote(a) for a in (extra or []))
    if kind == "raycronjob":
        entry = f"python -m jobs.nightly_generate --date yesterday --config {shlex.quote(config)} {args}".strip()
        return [{
            "apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "raygpt"}},
            # RayCronJobSpec has only jobTemplate, schedule, suspend and timeZone: no concurrency policy or
            # history limits. Two nights never overlap on one date because jobs/nightly_generate.py holds the
            # run lock (pipelines/ops/lock.py) in the output root.
            "spec": {"schedule": at, **({"timeZone": time_zone} if time_zone else {}),
                     "jobTemplate": rayjob_spec(image=image, entrypoint=entry, **spec_kw)},
        }]

    # The CronJob's pod computes the date, renders the RayJob template and waits for it, so that
    # concurrencyPolicy Forbid really covers the whole night's run (not only the `kubectl create`).
    entry = f"python -m jobs.nightly_generate --date __DATE__ --config {shlex.quote(config)} {args}".strip()
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {"name": f"{name}-__DAY__", "namespace": namespace,
                           "labels": {"app.kubernetes.io/name": "raygpt", "raygpt/schedule": name}},
              "spec": rayjob_spec(image=image, entrypoint=entry, **spec_kw)}
    import yaml

    cron_spec = _cronjob_spec(at, name, namespace, kubectl_image or image)
    if time_zone:
        cron_spec["timeZone"] = time_zone
    meta = {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/name": "raygpt"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
         "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta,
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": f"{name}-rayjob"},
         "data": {"rayjob.yaml": yaml.safe_dump(rayjob, sort_keys=False)}},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta, "spec": cron_spec},
    ]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    import yaml

    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
