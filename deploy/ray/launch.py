"""`python -m deploy.ray.launch`: a Tandem cluster as the driver of one Ray job.

    ray job submit --working-dir . -- python -m deploy.ray.launch --prefill N --decode M --model DIR

Lifecycle:
  1. parse and check the flags, and every `tandem` command line this run will use, with the CLI's
     own parser, before anything starts (deploy/ray/plan.py; a user error: one line, exit 2);
  2. connect to the job's Ray cluster; resolve --gpus-per-worker (default: 1 on a cluster with
     GPUs, else 0) and --device (cuda when workers get GPUs, else cpu); make one cluster token
     for the run (or read --cluster-token-file); pick a run id (the default etcd key prefix
     /tandem/ray-<run id>, and the actors' names tandem-<run id>-<label>);
  3. membership: the --etcd endpoints, or an `etcd` process started on the head node by a
     `ManagedProcess` actor (its data in a private temp dir), ready when its /health says true;
  4. a placement group of one bundle per worker ({CPU: --cpus-per-worker, GPU:
     --gpus-per-worker}), --placement-strategy SPREAD by default, so prefill and decode land on
     different nodes where there are several; then one actor per worker in its bundle, each
     running `python -m tandem_cli.main prefill|decode ... --etcd ...` bound to its node's IP on
     a free port. All start at once; each is ready when its gRPC server answers (progress
     printed);
  5. the router actor on the head node (`tandem_cli.main router --etcd ...`), ready when its
     /health lists every worker; then the URL is printed, and a line to parse:
     `TANDEM_URL=http://<head ip>:<port>/v1`;
  6. watch: a process that exits (or an actor that dies) stops the run, exit code 1;
  7. stop, on SIGTERM/SIGINT (`ray job stop` sends SIGTERM, then SIGKILL after the cluster's
     RAY_JOB_STOP_WAIT_TIME_S, 3 s by default): every Tandem process gets SIGTERM at once (they
     leave etcd), SIGKILL after --stop-grace, then etcd; the actors are killed and the placement
     group removed; exit code 0. Should the driver die first, Ray kills the actors it owns (none
     is detached) and each actor's process dies with it (actors.py: PR_SET_PDEATHSIG).

What crosses process boundaries: Ray pickles actor calls and their results, so each one here is
a str, int, float, list of str, or a dict of those (actors.py); Tandem's own processes talk
protobuf as always. The cluster token reaches each actor as a call argument (not in a runtime
env, which Ray's dashboard shows) and its process in $TANDEM_CLUSTER_TOKEN.
"""
from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
import urllib.request

from deploy.ray.plan import Plan, UsageError, build_launch_parser, head_etcd_argv, make_plan
from engine.cluster_auth import ClusterTokenError, new_token, resolve_token

HEAD = {"node:__internal_head__": 0.001}   # Ray's resource of the head node: pins an actor there


class RunError(Exception):
    """A process or actor failed, or the start took too long (one line, exit code 1)."""


def say(text: str) -> None:
    print(text, flush=True)


class Launch:
    """The run's actors and placement group; see the module docstring for the lifecycle."""

    def __init__(self, ray, args: argparse.Namespace, run_id: str, token: str, stopping) -> None:
        from deploy.ray.actors import ManagedProcess

        self.ray, self.args, self.run_id, self.token, self.stopping = ray, args, run_id, token, stopping
        self.actor_class = ray.remote(ManagedProcess)
        self.deadline = time.monotonic() + args.start_timeout
        self.etcd_actor = None
        self.actors: dict = {}     # label -> actor handle: the workers, then the router
        self.pg = None

    def _actor(self, label: str, **options):
        return self.actor_class.options(name=f"tandem-{self.run_id}-{label}", max_restarts=0,
                                        **options).remote(label)

    def _check_time(self, what: str) -> None:
        if self.stopping():
            raise InterruptedError
        if time.monotonic() > self.deadline:
            raise RunError(f"{what} after --start-timeout {self.args.start_timeout:.0f} s")

    def _get(self, refs, what: str):
        """ray.get of one ref or a list, in slices that watch for a stop signal and the deadline;
        a dead actor or a failed call is a RunError about `what`."""
        many = isinstance(refs, list)
        pending = refs if many else [refs]
        while True:
            ready, _ = self.ray.wait(pending, num_returns=len(pending), timeout=0.5)
            if len(ready) == len(pending):
                break
            self._check_time(what)
        try:
            values = self.ray.get(pending)
        except self.ray.exceptions.RayActorError as exc:
            raise RunError(f"{what}: its actor died ({type(exc).__name__})") from None
        except self.ray.exceptions.RayTaskError as exc:
            raise RunError(f"{what}: {exc.cause}") from None
        return values if many else values[0]

    # ---- 3. etcd ---------------------------------------------------------------------

    def start_etcd(self) -> str:
        actor = self.etcd_actor = self._actor("etcd", num_cpus=0, resources=HEAD)
        ip, client, peer, data = self._get([actor.node_ip.remote(), actor.free_port.remote(),
                                            actor.free_port.remote(),
                                            actor.temp_dir.remote(f"tandem-ray-{self.run_id}-etcd")],
                                           "placing etcd on the head node")
        say(f"starting etcd on the head node ({ip}:{client}) ...")
        self._get(actor.start.remote(head_etcd_argv(self.args.etcd_binary, self.run_id, data, ip, client, peer)),
                  "cannot start etcd on the head node (install etcd, pass --etcd-binary, or give --etcd)")
        self._wait_ready({"etcd": ("http", f"http://{ip}:{client}/health", '"true"')})
        return f"{ip}:{client}"

    # ---- 4. workers --------------------------------------------------------------------

    def start_workers(self, plan: Plan, cpus: float, gpus: float) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v}
        if not bundle:
            raise UsageError("--cpus-per-worker 0 with --gpus-per-worker 0: a worker must reserve something")
        n = len(plan.workers)
        say(f"placement group: {n} bundles of {bundle}, strategy {self.args.placement_strategy} ...")
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=self.args.placement_strategy,
                                  name=f"tandem-{self.run_id}")
        t0 = said = time.monotonic()
        while not self.pg.wait(timeout_seconds=1):
            self._check_time(f"the placement group of {n} x {bundle} was not placed")
            if time.monotonic() - said > 15:
                said = time.monotonic()
                say(f"  still waiting for {n} x {bundle} (cluster: {self.ray.cluster_resources()}, "
                    f"free: {self.ray.available_resources()})")
        say(f"placement group ready ({time.monotonic() - t0:.1f} s)")
        for index, (label, _) in enumerate(plan.workers):
            self.actors[label] = self._actor(
                label, num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index))
        # each actor's node and a free port there (its metrics port, + 1000, free too)
        where = self._get([ref for label, _ in plan.workers
                           for ref in (self.actors[label].node_ip.remote(), self.actors[label].free_port.remote(1000))],
                          "starting the worker actors")
        probes, started = {}, []
        for i, (label, argv) in enumerate(plan.workers):
            ip, port = where[2 * i], where[2 * i + 1]
            say(f"starting the {label} worker on {ip}:{port} ...")
            started.append(self.actors[label].start.remote(
                ["python", "-m", "tandem_cli.main", *argv, "--host", ip, "--port", str(port),
                 "--advertise-host", ip], self.token))
            probes[label] = ("grpc", f"{ip}:{port}", "")
        self._get(started, "starting the workers")
        self._wait_ready(probes)

    # ---- 5. router -----------------------------------------------------------------------

    def start_router(self, plan: Plan) -> str:
        actor = self.actors["router"] = self._actor("router", num_cpus=self.args.router_cpus, resources=HEAD)
        ip = self._get(actor.node_ip.remote(), "placing the router on the head node")
        port = self.args.port or self._get(actor.free_port.remote(), "a port for the router")
        host = self.args.host
        say(f"starting the router on {host}:{port} (head node {ip}) ...")
        self._get(actor.start.remote(["python", "-m", "tandem_cli.main", *plan.router, "--host", host,
                                      "--port", str(port)], self.token), "starting the router")
        base = f"http://{ip if host in ('0.0.0.0', '::') else host}:{port}"
        self._wait_ready({"router": ("http", f"{base}/health", "")})
        want = {"decode": self.args.decode, "prefill": self.args.prefill}
        while True:
            self._check_time("the router's /health did not list every worker")
            members = _members(f"{base}/health")
            if all(len(members.get(role, ())) >= n for role, n in want.items()):
                break
            self.check_alive()
            time.sleep(0.3)
        say(f"the router lists every worker: {self.args.prefill} prefill, {self.args.decode} decode")
        return f"{base}/v1"

    def _wait_ready(self, probes: dict[str, tuple[str, str, str]]) -> None:
        """Probe each labelled actor's process (kind, target, expected text) until all are ready."""
        actors = dict(self.actors, etcd=self.etcd_actor)
        t0 = said = time.monotonic()
        pending = dict(probes)
        while pending:
            self._check_time(f"not ready: {', '.join(pending)}")
            labels = list(pending)
            answers = self._get([actors[label].probe.remote(*pending[label][:2], 1.0, pending[label][2])
                                 for label in labels], f"waiting for {', '.join(labels)}")
            for label, answer in zip(labels, answers):
                if answer["state"] == "exited":
                    raise RunError(f"the {label} process exited with code {answer['code']} while starting "
                                   "(its log is above)")
                if answer["state"] == "ready":
                    say(f"{label} ready ({time.monotonic() - t0:.1f} s)")
                    del pending[label]
            if pending and time.monotonic() - said > 15:
                said = time.monotonic()
                say(f"  still starting: {', '.join(pending)} ({time.monotonic() - t0:.0f} s: loading weights, "
                    "profiling memory, capturing CUDA graphs)")

    # ---- 6. watch ------------------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise RunError naming the first process (or actor) that is gone."""
        everyone = dict(self.actors, **({"etcd": self.etcd_actor} if self.etcd_actor else {}))
        refs = [a.poll.remote() for a in everyone.values()]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=30)
        for label, ref in zip(everyone, refs):
            if ref not in ready:
                raise RunError(f"the {label} actor did not answer within 30 s")
            try:
                code = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as exc:
                raise RunError(f"the {label} actor is gone ({type(exc).__name__})") from None
            if code is not None:
                raise RunError(f"the {label} process exited with code {code} (its log is above)")

    def watch(self) -> None:
        while not self.stopping():
            self.check_alive()
            for _ in range(10):
                if self.stopping():
                    return
                time.sleep(0.1)

    # ---- 7. stop ---------------------------------------------------------------------------

    def stop(self) -> None:
        t0, grace = time.monotonic(), self.args.stop_grace
        refs = [a.stop.remote(grace) for a in self.actors.values()]
        if refs:
            self.ray.wait(refs, num_returns=len(refs), timeout=grace + 1.0)
        everyone = list(self.actors.values())
        if self.etcd_actor is not None:   # last: the workers revoke their leases on the way out
            self.ray.wait([self.etcd_actor.stop.remote(0.5)], timeout=1.5)
            everyone.append(self.etcd_actor)
        for actor in everyone:
            self.ray.kill(actor, no_restart=True)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
        say(f"stopped: {len(everyone)} processes and their actors"
            f"{', the placement group' if self.pg is not None else ''} ({time.monotonic() - t0:.1f} s)")


def _members(url: str) -> dict[str, list[str]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read()).get("membership", {}).get("members", {})
    except (OSError, ValueError):
        return {}


def _check_flags(args: argparse.Namespace, run_id: str) -> str:
    """The cluster token of the run; raises UsageError / ClusterTokenError (before Ray starts)."""
    token = resolve_token(args.cluster_token_file) if args.cluster_token_file else new_token()
    for endpoint in filter(None, args.etcd.split(",")):
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--etcd {endpoint}: not host:port")
    if args.device == "cuda" and args.gpus_per_worker == 0:
        raise UsageError("--device cuda with --gpus-per-worker 0: Ray shows no GPU to an actor that reserves none")
    make_plan(args, run_id, args.etcd or "head:2379", args.device or "cpu")
    return token


def main(argv: list[str] | None = None) -> int:
    """The exit code: 0 stopped by a signal once serving, 128 + the signal's number when one came
    while starting, 1 a process failed or the start timed out, 2 a flag cannot work."""
    args = build_launch_parser().parse_args(argv)
    run_id = secrets.token_hex(4)
    try:
        token = _check_flags(args, run_id)
    except (UsageError, ClusterTokenError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2

    import ray

    try:
        ray.init(address=args.address, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        print(f"error: cannot connect to the Ray cluster{f' at {args.address}' if args.address else ''}: {exc}",
              file=sys.stderr, flush=True)
        return 1
    stopping = 0   # the signal that asks us to stop (0: none yet); set after ray.init, which sets its own

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = stopping or signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    device = args.device or ("cuda" if gpus > 0 else "cpu")
    launch = Launch(ray, args, run_id, token, lambda: bool(stopping))
    try:
        say(f"tandem on ray, run {run_id}: {args.prefill} prefill + {args.decode} decode, model {args.model}, "
            f"device {device}, {args.cpus_per_worker:g} CPU + {gpus:g} GPU per worker")
        etcd = args.etcd or launch.start_etcd()
        plan = make_plan(args, run_id, etcd, device)
        launch.start_workers(plan, args.cpus_per_worker, gpus)
        url = launch.start_router(plan)
        names = ", ".join(args.served_model_name or [args.model])
        say(f"Tandem is serving {names} at {url} ({args.prefill} prefill + {args.decode} decode; etcd {etcd}, "
            f"prefix {plan.etcd_prefix}); `ray job stop` stops it.")
        say(f"TANDEM_URL={url}")
        launch.watch()
        say(f"stopping ({signal.Signals(stopping).name}) ...")
        return 0
    except InterruptedError:
        say(f"interrupted while starting ({signal.Signals(stopping).name}); stopping")
        return 128 + stopping
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except RunError as exc:
        print(f"error: {exc}; stopping", file=sys.stderr, flush=True)
        return 1
    finally:
        launch.stop()


if __name__ == "__main__":
    sys.exit(main())
