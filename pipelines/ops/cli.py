"""`raygpt submit`, `raygpt jobs list|logs|stop`, `raygpt schedule cron|k8s`: argument parsing only.

    raygpt submit generate --address http://127.0.0.1:8265 [--token-file F] [--no-wait] -- --checkpoint C --input I --output O
    raygpt jobs list --address http://127.0.0.1:8265
    raygpt jobs logs JOB_ID [--follow] --address ...        raygpt jobs stop JOB_ID --address ...
    raygpt schedule cron --at "0 2 * * *" [--install] [--address URL] [-- extra nightly args]
    raygpt schedule k8s --at "0 2 * * *" --image IMG [--kind cronjob|raycronjob] [--output nightly.yaml]

Everything after `--` goes to the job (or the nightly entrypoint) untouched. `--address` defaults to
$RAY_ADDRESS when that is an http(s) URL. Exit status of `submit` (waiting) = the job's: 0 SUCCEEDED,
1 FAILED, 3 STOPPED; Ctrl-C only detaches (the job keeps running: `raygpt jobs stop ID`).
Does not: import ray before a handler runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipelines import console

log = console.get_logger("submit")

SUBMIT_DESCRIPTION = """\
Run a raygpt stage (prep, train, generate, ...) on a Ray cluster as a Ray Job, through the cluster's
dashboard address, and stream its logs until it ends. Everything after `--` goes to the stage
untouched. Exit status: the job's (0 SUCCEEDED, 1 FAILED, 3 STOPPED); Ctrl-C only detaches, the
job keeps running (`raygpt jobs stop ID`).

  raygpt submit train --address http://127.0.0.1:8265 -- --config jobs/configs/train-english-bpe.yaml
  raygpt submit generate --address URL --no-wait -- --checkpoint C --input I --output O

--address defaults to $RAY_ADDRESS when that is an http(s) URL; --token-file holds the cluster's
auth token (cluster/head-up.sh starts a local cluster with token auth on).
"""

JOBS_DESCRIPTION = """\
Manage Ray Jobs on a cluster (the ones `raygpt submit` started, and any other).

  raygpt jobs list --address http://127.0.0.1:8265
  raygpt jobs logs JOB_ID --follow --address URL
  raygpt jobs stop JOB_ID --wait --address URL
"""

SCHEDULE_DESCRIPTION = """\
Run the nightly batch generation (one date partition, configured by jobs/configs/nightly.yaml) on a
schedule: a crontab line for this machine, or Kubernetes manifests for KubeRay.

  raygpt schedule cron --at "0 2 * * *"                # print the line; --install adds it to your crontab
  raygpt schedule k8s --at "0 2 * * *" --image IMG -o nightly.yaml     # a CronJob -> RayJob
"""


def _default_address() -> str | None:
    a = os.environ.get("RAY_ADDRESS", "")
    return a if a.startswith(("http://", "https://")) else None


def _conn_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=_default_address(), help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    p.add_argument("--token-file", help="file holding the cluster's auth token (default: Ray's lookup order)")


def _submit_options(p: argparse.ArgumentParser) -> None:
    _conn_options(p)
    p.add_argument("--pip", choices=["none", "pyproject"], default="none",
                   help="none: the cluster already has raygpt's requirements; pyproject: install them per job")
    p.add_argument("--python", default="python", help="interpreter of the entrypoint on the cluster")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver of the job")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver of the job")
    p.add_argument("--entrypoint-memory", type=int, help="memory (bytes) reserved for the driver of the job")
    p.add_argument("--entrypoint-resources", help='JSON, e.g. {"head": 1}')
    p.add_argument("--submission-id", help="job id to use (a second submit with the same id is refused)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var for the job")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")


def _own_and_job_args(add_options, ns: argparse.Namespace, rest: list[str], prog: str) -> list[str]:
    """Split what argparse left in REMAINDER into our options (set on `ns`) and the job's arguments.

    With `--`: before it are ours, after it the job's. Without (argparse drops a `--` that directly
    follows the positional): options we know are ours, everything else goes to the job in order."""
    from pipelines.errors import UserError

    if "--" in rest:
        i = rest.index("--")
        own, job = rest[:i], rest[i + 1:]
    else:
        own, job = rest, None
    p = argparse.ArgumentParser(prog=prog, add_help=False)
    add_options(p)
    # options written BEFORE the positional were parsed already: keep them as defaults
    p.set_defaults(**{k: v for k, v in vars(ns).items() if k in {a.dest for a in p._actions}})
    try:
        parsed, unknown = p.parse_known_args(own)
    except SystemExit:
        raise UserError(f"bad options {own}; see {prog} --help") from None
    if job is None:
        job = unknown
    elif unknown:
        raise UserError(f"unrecognized argument(s) {unknown} before `--`; arguments for the job go after `--` "
                        f"(e.g. {prog} --address URL -- --checkpoint C ...)")
    for k, v in vars(parsed).items():
        setattr(ns, k, v)
    return job


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.ops.submit import STAGES

    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("submit", help="run a stage on a Ray cluster as a Ray Job (streams logs)",
                       description=SUBMIT_DESCRIPTION, formatter_class=raw)
    s.add_argument("stage", choices=sorted(STAGES), help="the raygpt stage to run")
    _submit_options(s)
    s.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the stage's own arguments")
    s.set_defaults(func=_submit)

    j = sub.add_parser("jobs", help="list, show logs of, or stop Ray Jobs", description=JOBS_DESCRIPTION,
                       formatter_class=raw)
    jsub = j.add_subparsers(dest="jobs_command", metavar="<list|logs|stop>")
    jl = jsub.add_parser("list", help="jobs on the cluster", description="List the Ray Jobs on the cluster: "
                         "submission id, status, raygpt stage and entrypoint (--json: every field).")
    _conn_options(jl)
    jl.add_argument("--json", action="store_true", help="print JSON instead of a table")
    jl.set_defaults(func=_jobs_list)
    jg = jsub.add_parser("logs", help="a job's logs", description="Print a Ray Job's logs (--follow: stream "
                         "them until the job ends, and exit with its status).")
    jg.add_argument("job_id", help="submission id (see `raygpt jobs list`)")
    _conn_options(jg)
    jg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    jg.set_defaults(func=_jobs_logs)
    js = jsub.add_parser("stop", help="stop a running job", description="Ask the cluster to stop a running Ray "
                         "Job (--wait: until it has stopped).")
    js.add_argument("job_id", help="submission id (see `raygpt jobs list`)")
    _conn_options(js)
    js.add_argument("--wait", action="store_true", help="wait until it has stopped")
    js.set_defaults(func=_jobs_stop)
    j.set_defaults(func=lambda a: (j.print_help(), 2)[1])

    sc = sub.add_parser("schedule", help="nightly schedules: a crontab line or Kubernetes manifests",
                        description=SCHEDULE_DESCRIPTION, formatter_class=raw)
    ssub = sc.add_subparsers(dest="schedule_command", metavar="<cron|k8s>")
    c = ssub.add_parser("cron", help="print (or --install) the crontab line of the nightly generation",
                        description="Print the crontab line that runs the nightly batch generation at --at "
                                    "(locally, or submitted to --address), and the next fire times; --install "
                                    "adds it to your crontab, replacing a line with the same --name.")
    _cron_options(c)
    c.add_argument("rest", nargs=argparse.REMAINDER, help="-- then extra arguments of the nightly job")
    c.set_defaults(func=_schedule_cron)
    k = ssub.add_parser("k8s", help="print a CronJob->RayJob (or RayCronJob) manifest for KubeRay",
                        description="Print (or -o write) Kubernetes manifests that run the nightly batch "
                                    "generation at --at on KubeRay: a CronJob creating one RayJob per night "
                                    "(default), or KubeRay's RayCronJob (--kind raycronjob).")
    _k8s_options(k)
    k.add_argument("rest", nargs=argparse.REMAINDER, help="-- then extra arguments of the nightly job")
    k.set_defaults(func=_schedule_k8s)
    sc.set_defaults(func=lambda a: (sc.print_help(), 2)[1])


def _cron_options(c: argparse.ArgumentParser) -> None:
    from pipelines.ops.submit import REPO

    c.add_argument("--at", required=False, default="0 2 * * *", help='cron expression (default "0 2 * * *")')
    c.add_argument("--config", default="jobs/configs/nightly.yaml", help="nightly config (relative to --repo)")
    c.add_argument("--address", default=None, help="submit to this Ray dashboard instead of running locally")
    c.add_argument("--repo", default=str(REPO), help="project directory cron cds into")
    c.add_argument("--python", default=None, help="interpreter (default: the repo's .venv/bin/python)")
    c.add_argument("--log", default=None, help="append output here (default: <repo>/runs/nightly.log)")
    c.add_argument("--name", default="nightly", help="tag of the line, so --install replaces it")
    c.add_argument("--install", action="store_true", help="install via `crontab -` (replacing the same --name)")
    c.add_argument("--crontab", default="crontab", help=argparse.SUPPRESS)
    c.add_argument("--next", type=int, default=3, help="print the next N fire times")


def _k8s_options(k: argparse.ArgumentParser) -> None:
    k.add_argument("--at", default="0 2 * * *", help='cron expression (default "0 2 * * *")')
    k.add_argument("--image", default="rayproject/ray:2.60.0-py311", help="image with raygpt installed")
    k.add_argument("--kind", choices=["cronjob", "raycronjob"], default="cronjob",
                   help="cronjob: a batch/v1 CronJob creating a RayJob (default); raycronjob: KubeRay's own")
    k.add_argument("--name", default="raygpt-nightly", help="name of the resources (default raygpt-nightly)")
    k.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    k.add_argument("--config", default="jobs/configs/nightly.yaml", help="nightly config inside the image")
    k.add_argument("--time-zone", default="Etc/UTC", help="time zone of --at (default Etc/UTC)")
    k.add_argument("--worker-replicas", type=int, default=1, help="Ray worker pods (default 1)")
    k.add_argument("--worker-cpus", default="4", help="CPUs per worker pod (default 4)")
    k.add_argument("--worker-gpus", type=int, default=0, help="GPUs per worker pod (default 0)")
    k.add_argument("--auth-secret", default="raygpt-ray-token",
                   help="Secret with key auth_token for Ray token auth (\"\": auth off)")
    k.add_argument("--kubectl-image", default=None, help="image with kubectl and /bin/sh (default: --image)")
    k.add_argument("--output", "-o", default=None, help="write here instead of stdout")


def _submit(args: argparse.Namespace) -> int:
    from pipelines.errors import UserError
    from pipelines.ops import submit as sm

    job_args = _own_and_job_args(_submit_options, args, args.rest, f"raygpt submit {args.stage}")
    if not args.address:
        raise UserError("--address is required (the dashboard URL, e.g. http://127.0.0.1:8265), or set RAY_ADDRESS")
    env = {}
    for kv in args.env:
        if "=" not in kv:
            raise UserError(f"--env {kv!r} must look like KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    try:
        resources = json.loads(args.entrypoint_resources) if args.entrypoint_resources else None
    except json.JSONDecodeError as e:
        raise UserError(f"--entrypoint-resources must be JSON like {{\"head\": 1}}: {e}") from None
    # SubmitError, CronError and the like are UserErrors already: pipelines/cli.py prints them
    c, job_id = sm.submit(args.address, args.stage, job_args, token_file=args.token_file, pip=args.pip,
                          python=args.python, entrypoint_num_cpus=args.entrypoint_num_cpus,
                          entrypoint_num_gpus=args.entrypoint_num_gpus, entrypoint_memory=args.entrypoint_memory,
                          entrypoint_resources=resources, submission_id=args.submission_id, env_vars=env)
    log.info("job %s submitted to %s", job_id, args.address)
    if args.no_wait:
        print(job_id)
        return 0
    status = sm.follow(c, job_id)
    info = c.get_job_info(job_id)
    (log.info if status == "SUCCEEDED" else log.warning)(
        "job %s %s%s", job_id, status, f": {info.message}" if info.message else "")
    return sm.EXIT_CODES.get(status, 1)


def _client(args):
    from pipelines.errors import UserError
    from pipelines.ops import submit as sm

    if not args.address:
        raise UserError("--address is required (the dashboard URL, e.g. http://127.0.0.1:8265), or set RAY_ADDRESS")
    return sm.client(args.address, args.token_file)


def _jobs_list(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import list_jobs

    rows = list_jobs(_client(args))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'SUBMISSION_ID':<28} {'STATUS':<10} {'STAGE':<9} ENTRYPOINT")
    for r in rows:
        print(f"{r['submission_id'] or '-':<28} {r['status']:<10} {r['stage'] or '-':<9} {r['entrypoint'][:80]}")
    return 0


def _jobs_logs(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import EXIT_CODES, follow

    c = _client(args)
    if args.follow:
        return EXIT_CODES.get(follow(c, args.job_id), 1)
    sys.stdout.write(c.get_job_logs(args.job_id))
    return 0


def _jobs_stop(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import wait

    c = _client(args)
    stopped = c.stop_job(args.job_id)
    if not stopped:
        st = c.get_job_status(args.job_id)
        log.warning("job %s was not running (%s)", args.job_id, getattr(st, "value", st))
        return 0
    if args.wait:
        print(f"job {args.job_id} {wait(c, args.job_id)}")
    else:
        print(f"job {args.job_id} stop requested")
    return 0


def _schedule_cron(args: argparse.Namespace) -> int:
    from datetime import datetime

    from pipelines.errors import UserError
    from pipelines.ops.schedule import CronExpr, crontab_line, install_crontab, nightly_command

    extra = _own_and_job_args(_cron_options, args, args.rest, "raygpt schedule cron")
    expr = CronExpr.parse(args.at)
    repo = os.path.abspath(args.repo)
    python = args.python or os.path.join(repo, ".venv", "bin", "python")
    log = args.log or os.path.join(repo, "runs", "nightly.log")
    cmd = nightly_command(repo, python, args.config, address=args.address, extra=extra, log=log)
    line = crontab_line(args.at, cmd, args.name)
    print(line)
    if args.next:
        nxt = ", ".join(t.strftime("%Y-%m-%d %H:%M") for t in expr.next_after(datetime.now(), args.next))
        console.get_logger("schedule").info("next runs (local time): %s", nxt)
    if args.install:
        try:
            install_crontab(line, args.name, crontab=args.crontab)
        except RuntimeError as e:
            raise UserError(str(e)) from None
        console.get_logger("schedule").info("installed in the crontab of %s (tag %s)",
                                            os.environ.get("USER", "this user"), args.name)
    return 0


def _schedule_k8s(args: argparse.Namespace) -> int:
    from pipelines.ops.schedule import k8s_manifests, to_yaml

    extra = _own_and_job_args(_k8s_options, args, args.rest, "raygpt schedule k8s")
    docs = k8s_manifests(at=args.at, image=args.image, name=args.name, namespace=args.namespace, kind=args.kind,
                         config=args.config, extra=extra, time_zone=args.time_zone,
                         worker_replicas=args.worker_replicas, worker_cpu=args.worker_cpus,
                         worker_gpu=args.worker_gpus, auth_secret=args.auth_secret or None,
                         kubectl_image=args.kubectl_image)
    text = to_yaml(docs)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        console.get_logger("schedule").info("wrote %d manifest(s) to %s", len(docs), args.output)
    else:
        sys.stdout.write(text)
    return 0
