"""`dynamo serve GRAPH`: run a whole inference graph on this machine, under circus.

    dynamo serve examples/graphs/agg.yaml                       # run it; Ctrl-C stops it all
    dynamo serve examples/graphs/agg.yaml --dry-run             # print the commands instead
    dynamo serve graph.yaml --only backend --discovery-backend etcd   # this node's part
    dynamo serve graph.yaml --backend.replicas 3 --frontend.http-port 9000

What happens, in order:

1. **Validation, before anything starts.** The graph file is read and checked (`read_graph`,
   shared with `dynamo deploy`), the overrides applied, every selected component module imported
   (never its engine) for its `Deployment` and its parser in Dynamo-only mode, the plan built
   (flags, env, GPUs), and each component's flags and environment handed to *that component's own
   parser*, once (`validate_plan`, whose parse also gives the HTTP port): a misspelt arg is
   reported by the parser that would have rejected it, with its suggestion, naming the component.
   An engine's own flags are checked by the engine's parser in the child, at start. Then the
   machine is checked (`_claims`): a component of this namespace that another `dynamo serve`
   already runs here, or an HTTP port already taken, is a conflict. Any problem: one line each
   on stderr, exit status 2, no process started.
2. **Start**: one circus watcher per component, its replicas as processes (`_supervisor`). Output
   is streamed with a coloured prefix and kept in one file per process under the log dir
   (`_logs`).
3. **Ready**: each process is followed until it is ready (`_ready`: registered in discovery under
   its own pid, or its health port answering 200); then a summary (processes, pids, API URL,
   models, log dir). Every exit of a process is reported once, with its exit code; it is
   restarted with backoff. A component whose processes exit `--max-start-failures` times before
   the graph was ever ready stops the graph, with its last lines, exit status 1. One that exits
   with `EXIT_CONFIG` (78: a bad setting, a missing model, a taken port; its last line says
   which) stops the graph at once. "Ready" is only ever said of this graph's own processes
   (`_ready`).
4. **Stop** on SIGINT, SIGTERM or SIGHUP: ingress first, then the rest; SIGTERM, `--grace-period`
   seconds, SIGKILL; then a sweep of anything left in our process groups or below us. A second
   signal kills at once. Exit status 0 after a requested stop.

The launcher's own loop is asyncio (tornado's IOLoop runs on it, which is what circus uses), so the
discovery watch, the HTTP probes, the signal handlers and circus share one thread: no locks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dynamo_core.errors import EXIT_CONFIG, BackendUnavailableError, ConfigError
from dynamo_serve._claims import Claims, claim_components, port_owner, port_taken
from dynamo_serve.graph import (
    RUNTIME_FLAGS,
    ComponentPlan,
    GraphError,
    Plan,
    Resolved,
    build_plan,
    flag_value,
    format_dry_run,
    parse_gpus,
    read_graph,
    validate_plan,
)

if TYPE_CHECKING:
    from dynamo_serve._logs import ComponentLog
    from dynamo_serve._ready import ProcessState

__all__ = ["build_parser", "main", "prepare", "split_overrides"]

PROG = "dynamo serve"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run an inference graph: every component as `python -m <module> <flags>`, "
        "under circus, until Ctrl-C.",
        epilog="Overrides: --<component>.<arg> VALUE sets a component's arg (e.g. "
        "--frontend.http-port 9000); --<component>.replicas N its process count. Relative paths "
        "in args resolve against the current directory.",
        allow_abbrev=False,
    )
    parser.add_argument("graph", metavar="GRAPH", help="Graph file (YAML).")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the command of every process (with its environment), ready to paste; start nothing.",
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        action="append",
        help="Run only these components (the others run elsewhere: multi-node).",
    )
    parser.add_argument("--namespace", help="Namespace of every component (default: the graph's).")
    runtime = parser.add_argument_group(
        "backends (passed to every component as its environment variable)"
    )
    for flag, var in RUNTIME_FLAGS.items():
        runtime.add_argument(f"--{flag}", metavar="VALUE", help=f"Sets {var}.")
    parser.add_argument(
        "--gpus",
        metavar="IDS",
        help="GPUs to hand out, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES, else every GPU "
        "nvidia-smi lists, asked only when a component needs GPUs).",
    )
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="Where each process's log file goes (default: a new folder per run under the temp dir).",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=40.0,
        metavar="SECONDS",
        help="On stop, how long a process may take after SIGTERM before SIGKILL (default 40, above "
        "the components' own 30 s drain).",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="Warn when the graph is not ready after this long (it keeps waiting; default 300).",
    )
    parser.add_argument(
        "--max-start-failures",
        type=int,
        default=3,
        metavar="N",
        help="Give up when a component's processes have exited N times before the graph was "
        "ever ready: each exit counts, whatever the process got to (default 3).",
    )
    parser.add_argument("--no-color", action="store_true", help="No colours in the output.")
    return parser


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--<component>.<arg> [VALUE]` tokens from `dynamo serve`'s own arguments."""
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token.startswith("--") and "." in token.split("=", 1)[0]:
            overrides.append(token)
            if "=" not in token and i < len(argv) and not argv[i].startswith("--"):
                overrides.append(argv[i])
                i += 1
        else:
            rest.append(token)
    return rest, overrides


def _only(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _detect_gpus() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _gpus(args: argparse.Namespace, environ: Mapping[str, str], needed: bool) -> list[str] | None:
    if args.gpus is not None:
        return parse_gpus(args.gpus)
    if "CUDA_VISIBLE_DEVICES" in environ:
        return parse_gpus(environ["CUDA_VISIBLE_DEVICES"])
    return _detect_gpus() if needed else None


def prepare(
    args: argparse.Namespace, override_tokens: Sequence[str], environ: Mapping[str, str]
) -> tuple[Plan, Resolved]:
    """Everything that can fail before a process starts; raises `GraphError`. The plan, and
    each component's one parse (its flags and environment, through its own parser)."""
    graph, infos = read_graph(args.graph, override_tokens, _only(args.only))
    needed = any(
        (
            spec.resources.over(infos[n].deployment.resources)
            if spec.resources
            else infos[n].deployment.resources
        ).gpu
        for n, spec in graph.components.items()
        if n in infos
    )
    runtime_env = {
        var: str(getattr(args, flag.replace("-", "_")))
        for flag, var in RUNTIME_FLAGS.items()
        if getattr(args, flag.replace("-", "_")) is not None
    }
    if "DYN_FILE_KV" in runtime_env:
        runtime_env["DYN_FILE_KV"] = os.path.abspath(runtime_env["DYN_FILE_KV"])
    plan = build_plan(
        graph,
        infos,
        only=_only(args.only),
        namespace=args.namespace,
        runtime_env=runtime_env,
        gpus=_gpus(args, environ, needed),
    )
    resolved = validate_plan(plan, infos, base_env=environ, where=str(args.graph))
    return plan, resolved


def _default_log_dir(namespace: str) -> Path:
    user = os.environ.get("USER") or str(os.getuid())
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (
        Path(tempfile.gettempdir())
        / f"dynamo-{user}"
        / "runs"
        / f"{stamp}-{namespace}-{os.getpid()}"
    )


def _http_listen(comp: ComponentPlan, resolved: Resolved) -> tuple[str, int] | None:
    """(host, port) a component's HTTP server will listen on, as its own parser read its flags
    (the host is its `http_host` where it has one)."""
    arg = comp.health_http_port_arg
    parsed = resolved.get(comp.name)
    if arg is None or parsed is None:
        return None
    value = flag_value(parsed, arg)
    if not value:
        return None
    host = getattr(parsed.config, "http_host", None)
    return (host if isinstance(host, str) and host else "0.0.0.0"), int(value)


def _conflict(plan: Plan, listen: Mapping[str, tuple[str, int]]) -> tuple[Claims, str | None]:
    """Claim this graph's components on this machine and check its HTTP ports (`_claims`)."""
    claims, conflict = claim_components(
        plan.namespace, [c.name for c in plan.components if c.replicas]
    )
    if conflict is not None:
        return claims, conflict
    for name, (host, port) in listen.items():
        if port_taken(host, port):
            claims.release()
            arg = next(c.health_http_port_arg for c in plan.components if c.name == name)
            return claims, (
                f"port {port} ({name}'s --{arg}) is already in use by {port_owner(port)}: "
                f"stop it, or pass --{name}.{arg} PORT"
            )
    return claims, None


def main(argv: Sequence[str] | None = None) -> int:
    tokens = list(sys.argv[1:] if argv is None else argv)
    rest, override_tokens = split_overrides(tokens)
    args = build_parser().parse_args(rest)
    try:
        plan, resolved = prepare(args, override_tokens, os.environ)
    except GraphError as exc:
        sys.stderr.write("".join(f"{PROG}: error: {e}\n" for e in exc.errors))
        return 2
    if args.dry_run:
        sys.stdout.write(format_dry_run(plan))
        return 0
    if not plan.processes:
        sys.stderr.write(
            f"{PROG}: error: nothing to run (every selected component has 0 replicas)\n"
        )
        return 2
    listen: dict[str, tuple[str, int]] = {}
    for comp in plan.components:
        found = _http_listen(comp, resolved) if comp.replicas else None
        if found:
            listen[comp.name] = found
    claims, conflict = _conflict(plan, listen)
    if conflict is not None:
        sys.stderr.write(f"{PROG}: error: {conflict}\n")
        return 2
    try:
        log_dir = Path(args.log_dir) if args.log_dir else _default_log_dir(plan.namespace)
        log_dir.mkdir(parents=True, exist_ok=True)
        http_ports = {name: port for name, (_, port) in listen.items()}
        return asyncio.run(_Run(plan, args, http_ports, log_dir.resolve()).run())
    finally:
        claims.release()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


class _Run:
    """One `dynamo serve` run: supervisor, readiness and signals on one asyncio loop."""

    def __init__(
        self, plan: Plan, args: argparse.Namespace, http_ports: dict[str, int], log_dir: Path
    ) -> None:
        self.plan = plan
        self.args = args
        self.http_ports = http_ports
        self.log_dir = log_dir
        self.exit_code = 0
        self.start_failures: dict[str, int] = {}
        self.t0 = time.monotonic()

    async def run(self) -> int:
        from dynamo_serve._logs import ComponentLog, Console
        from dynamo_serve._ready import Readiness
        from dynamo_serve._supervisor import Supervisor

        width = max([len("dynamo"), *(len(p.label) for p in self.plan.processes)])
        self.console = Console(color=False if self.args.no_color else None, width=width)
        self.console.open_file(self.log_dir / "dynamo.log")
        self.logs: dict[str, ComponentLog] = {
            c.name: ComponentLog(self.console, self.log_dir, i)
            for i, c in enumerate(self.plan.components)
        }
        self.stop = asyncio.Event()
        worker_env = next(
            (c.env for c in self.plan.components if c.name not in self.http_ports),
            self.plan.components[0].env,
        )
        self.readiness = Readiness(
            self.plan,
            self.http_ports,
            {**os.environ, **worker_env},
            self._on_ready,
            warn=self.console.system,
        )
        self.supervisor = Supervisor(
            self.plan,
            self.logs,
            grace=self.args.grace_period,
            on_spawn=self._on_spawn,
            on_exit=self._on_exit,
        )
        loop = asyncio.get_running_loop()
        self.signals = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.console.system(
            f"starting {len(self.plan.processes)} process(es) of {self.args.graph} "
            f"(namespace {self.plan.namespace}); logs in {self.log_dir}"
        )
        watchers: list[asyncio.Task[None]] = []
        try:
            try:
                await self.readiness.start()
            except (ConfigError, BackendUnavailableError) as exc:
                self.console.system(f"error: cannot watch discovery: {exc}")
                self.exit_code = 1
                return self.exit_code
            await self.supervisor.start()
            watchers.append(asyncio.create_task(self._summary_when_ready()))
            watchers.append(asyncio.create_task(self._warn_if_slow()))
            await self.stop.wait()
        finally:
            for task in watchers:
                task.cancel()
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return self.exit_code

    # -- events -------------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        if self.signals == 1:
            self.console.system(
                f"{sig.name}: stopping the graph (SIGTERM, SIGKILL after "
                f"{self.args.grace_period:g}s; send it again to kill at once)"
            )
            self.stop.set()
        else:
            self.console.system(f"{sig.name} again: killing every process now")
            self.supervisor.kill_now()

    def _on_spawn(self, comp: ComponentPlan, label: str, pid: int, restarted: bool) -> None:
        self.readiness.spawned(comp.name, label, pid)
        verb = "restarted" if restarted else "started"
        self.console.system(f"{label} {verb}: pid {pid}")

    def _on_exit(
        self, comp: ComponentPlan, label: str, pid: int, code: int | None, delay: float
    ) -> float | None:
        """Every exit of a process, exactly once (`_supervisor`): report it, count it, decide."""
        self.readiness.exited(pid)
        if self.stop.is_set():
            return None
        if code == EXIT_CONFIG:  # its own last line says why; a restart would say it again
            self.console.system(
                f"{label} (pid {pid}) exited with a configuration error (status {code}): "
                "stopping the graph"
            )
            self.exit_code = 1
            self.stop.set()
            return 3600.0  # no restart while we stop
        if not self.readiness.ever_ready:
            # every exit before the graph was up is a failed start, whatever the process got to
            failures = self.start_failures.get(comp.name, 0) + 1
            self.start_failures[comp.name] = failures
            if failures >= self.args.max_start_failures:
                return self._give_up(
                    comp, label, pid, code, f"{failures} time(s) before it became ready"
                )
        self.console.system(
            f"{label} (pid {pid}) exited with {_exit_text(code)}; restarting in {delay:.2g}s"
        )
        return None

    def _give_up(
        self, comp: ComponentPlan, label: str, pid: int, code: int | None, why: str
    ) -> float:
        """Stop the graph because `comp` cannot run; show its last lines. The delay returned
        keeps circus from starting it again while we stop."""
        log = self.logs[comp.name]
        self.console.system(
            f"{label} (pid {pid}) exited with {_exit_text(code)}, {why}: giving up. "
            f"Its last lines ({log.path(label)}):"
        )
        for line in log.tail(label)[-15:]:
            self.console.system(f"    {line}")
        self.exit_code = 1
        self.stop.set()
        return 3600.0

    def _on_ready(self, state: ProcessState, again: bool) -> None:
        what = f" ({state.instance})" if state.instance else ""
        suffix = " again" if again else ""
        self.console.system(f"{state.label} ready{suffix}: pid {state.pid}{what}")

    async def _summary_when_ready(self) -> None:
        await self.readiness.all_ready.wait()
        elapsed = time.monotonic() - self.t0
        models = await self.readiness.models()  # before the first line: the summary is one block
        c = self.console
        c.system(
            f"graph ready in {elapsed:.2f}s: namespace {self.plan.namespace}, "
            f"{len(self.plan.processes)} process(es)"
        )
        states = sorted(self.readiness.processes.values(), key=lambda s: s.label)
        width = max(len(s.label) for s in states)
        for comp in self.plan.components:
            for s in [s for s in states if s.component == comp.name]:
                c.system(f"  {s.label:<{width}}  pid {s.pid:<7} {comp.module}  {s.instance}")
            if not comp.replicas:
                c.system(f"  {comp.name:<{width}}  (0 replicas)")
        for name, port in self.http_ports.items():
            shown = f" (models: {', '.join(models)})" if models else ""
            c.system(f"API ({name}): http://127.0.0.1:{port}/v1{shown}")
        if self.plan.skipped:
            c.system(f"not run here (--only): {', '.join(self.plan.skipped)}")
        c.system(f"logs: {self.log_dir}")
        c.system(f"stop: Ctrl-C (or kill -TERM {os.getpid()})")

    async def _warn_if_slow(self) -> None:
        await asyncio.sleep(self.args.ready_timeout)
        if not self.readiness.all_ready.is_set():
            waiting = [s.label for s in self.readiness.processes.values() if not s.ready]
            self.console.system(
                f"not ready after {self.args.ready_timeout:g}s: {', '.join(waiting) or '(none running)'}; "
                "still waiting (see their logs)"
            )

    async def _shutdown(self) -> None:
        t = time.monotonic()
        count = len(self.supervisor.all_pids())
        killed = await self.supervisor.stop()
        await self.readiness.close()
        for log in self.logs.values():
            log.close()
        if killed:
            self.console.system(f"killed {len(killed)} leftover process(es): {killed}")
        self.console.system(
            f"stopped {count} process(es) in {time.monotonic() - t:.2f}s; logs in {self.log_dir}"
        )
        self.console.close()
