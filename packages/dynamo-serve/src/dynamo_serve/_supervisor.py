"""Running a plan under circus: one watcher per component, replicas as its processes.

Why circus *embedded* (its `Arbiter` on our own event loop) rather than `circusd` as a child:
the launcher has to see every process's output, pid, exit and restart as they happen (to prefix
logs, to match discovery records to pids, to report crashes), and it must own the stop sequence.
Embedded, all of that is a method call on the same loop: no config file, no control socket to
poll, and no second daemon that could outlive `dynamo serve`. Circus still does what it is good
at: spawning, reaping, respawning, pipes, SIGTERM-then-SIGKILL. Its controller socket is bound to
a private `ipc://` path (no TCP port to collide with another graph); its own signal handling is
switched off, because `dynamo serve` decides what a signal means.

How processes are made (and why nothing is left behind):

- Every process is exactly its `ProcessPlan.argv` (no shell, no circus `$(...)` substitution) with
  its own environment (`CUDA_VISIBLE_DEVICES` differs per replica, so the env is chosen by the
  circus worker id, which is the replica number).
- Circus starts each process in its own session (`setsid`), so its pid is also its process
  group. Stop signals go to the whole group (`killpg`), as a terminal's Ctrl-C would, so an
  engine's helper processes get them too; the terminal's own Ctrl-C reaches only `dynamo serve`.
- The launcher makes itself a *child subreaper* (Linux `PR_SET_CHILD_SUBREAPER`): a grandchild
  whose parent died is re-parented to us, not to init, so the final sweep still finds it.
- Each child gets `PR_SET_PDEATHSIG=SIGTERM`: if `dynamo serve` itself is killed with `kill -9`,
  the kernel still tells its children to stop.
- Stop: the ingress components (those with a health port: the frontend) are stopped first, so no
  new request comes in while the workers still drain the in-flight ones; then all the others, in
  parallel. Each process gets SIGTERM (to its group), `grace` seconds, then SIGKILL (to it and its
  descendants). A last sweep SIGKILLs anything still alive in our process groups or below us.

Restarts: a process that exits is restarted by circus's respawn, but not before its component's
backoff (0.25 s, doubling per consecutive crash, capped at 30 s; reset once a process ran for 60 s).
`on_exit` and `on_spawn` report each step on the console.

Exit accounting is exact: every pid spawned is reported to `on_exit` exactly once, with its exit
code. Circus alone loses some: its periodic pass drops a process whose status reads "zombie"
without reaping it (and so without its after-reap hook), and a multi-threaded process reads
"zombie" while it cannot be reaped yet (its main thread is done, another thread is still being
torn down): circus's reap pass finds nothing, the next pass drops it, and its exit is never
reported nor counted (`--max-start-failures` then never triggers). The watcher's own pass
(`manage_processes`) reaps what can be reaped, with its status, and keeps counting the rest until
they can be, without ever blocking the loop; the supervisor keeps every spawned process
(`_live`) until its exit was reported, so nothing can vanish unreported.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shlex
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from circus.arbiter import Arbiter
from circus.controller import Controller
from circus.process import DEAD_OR_ZOMBIE, UNEXISTING, Process
from circus.watcher import Watcher
from tornado import gen
from tornado.ioloop import IOLoop

from dynamo_serve._logs import ComponentLog
from dynamo_serve.graph import ComponentPlan, Plan

__all__ = ["Supervisor", "set_child_subreaper"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 30.0
_STABLE_AFTER = 60.0
_CHECK_DELAY = 0.1  # seconds between two circus reap/respawn passes


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def set_child_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process (Linux only)."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


_launcher_pid = 0


def _child_after_fork() -> None:
    # Runs in the forked child before exec (subprocess runs fork hooks when preexec_fn is set,
    # as circus always sets it). The parent may have died between fork and here: then exit.
    if (
        _launcher_pid
        and _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        and os.getppid() != _launcher_pid
    ):
        os._exit(1)


def _install_pdeathsig() -> None:
    global _launcher_pid
    if not _launcher_pid:
        _launcher_pid = os.getpid()
        os.register_at_fork(after_in_child=_child_after_fork)


class _GraphProcess(Process):  # type: ignore[misc]
    """A circus process that runs exactly its plan's argv with its replica's environment."""

    watcher: _ComponentWatcher

    def spawn(self) -> None:
        self.env = self.watcher.env_for(self.wid)
        super().spawn()

    def format_args(self, sockets_fds: Any = None) -> list[str]:
        return list(self.watcher.argv)

    def close_output_channels(self) -> None:
        # Read what the process wrote just before it died (a traceback, usually) before the pipes
        # are closed: circus would drop it. Then unhook the pipes from the loop, so that a later
        # pipe given the same fd number is never mistaken for this one.
        redirector = self.watcher.stream_redirector
        for name, pipe in (("stdout", self._worker.stdout), ("stderr", self._worker.stderr)):
            if pipe is None or pipe.closed:
                continue
            with contextlib.suppress(OSError, ValueError):
                fd = pipe.fileno()
                os.set_blocking(fd, False)
                while chunk := os.read(fd, 65536):
                    self.watcher.log({"data": chunk, "pid": self.pid, "name": name})
        if redirector is not None:
            with contextlib.suppress(Exception):
                redirector.remove_redirections(self)
        self.watcher.log.ended(self.pid)
        super().close_output_channels()


class _ComponentWatcher(Watcher):  # type: ignore[misc]
    """The circus watcher of one component."""

    def __init__(
        self,
        comp: ComponentPlan,
        log: ComponentLog,
        vanished: Callable[[_ComponentWatcher], None],
        **kwargs: Any,
    ) -> None:
        self.plan = comp
        self.argv = comp.processes[0].argv
        self.log = log
        self.vanished = vanished
        self.not_before = 0.0
        self.failures = 0
        super().__init__(
            name=comp.name,
            cmd=shlex.quote(self.argv[0]),
            args=list(self.argv[1:]),
            numprocesses=comp.replicas,
            env=dict(comp.processes[0].env),
            stdout_stream={"stream": log},
            stderr_stream={"stream": log},
            respawn=True,
            max_retry=3,
            **kwargs,
        )

    @property
    def _process_class(self) -> type[Process]:
        return _GraphProcess

    def _replica(self, wid: int) -> int:
        return (int(wid) - 1) % len(self.plan.processes) + 1

    def env_for(self, wid: int) -> dict[str, str]:
        return {**os.environ, **self.plan.processes[self._replica(wid) - 1].env}

    def label_for(self, wid: int) -> str:
        return self.plan.processes[self._replica(wid) - 1].label

    @gen.coroutine
    def spawn_processes(self) -> Any:
        if time.monotonic() < self.not_before:
            return  # backing off: the next circus pass tries again
        yield super().spawn_processes()

    @gen.coroutine
    def manage_processes(self) -> Any:
        """Circus's pass, minus its flaw (module docstring): a dead process is reaped with its
        status, and one that cannot be reaped yet stays counted until it can, so circus neither
        forgets its exit nor starts its replacement before the exit is reported. (The rest of
        circus's pass -- max_age, on-demand, scaling down -- is not used by dynamo serve.)"""
        if self.is_stopped():
            return
        for pid, process in list(self.processes.items()):
            if process.status not in (DEAD_OR_ZOMBIE, UNEXISTING):
                continue
            try:
                status = _try_wait(pid)
            except ChildProcessError:
                self.reap_process(pid)  # reaped elsewhere: circus reports what it knows
                continue
            if status is not None:
                self.reap_process(pid, status)
        if len(self.processes) < self.numprocesses and not self.is_stopping():
            yield self.spawn_processes()
        self.vanished(self)

    def send_signal(self, pid: int, signum: int) -> None:
        """Signal the process's whole group (the process is its group leader: circus setsid)."""
        if pid not in self.processes:
            return
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            super().send_signal(pid, signum)

    def backoff(self, uptime: float) -> float:
        """Count one crash; the delay before the next spawn."""
        self.failures = 1 if uptime >= _STABLE_AFTER else self.failures + 1
        delay = float(min(_BACKOFF_FIRST * 2 ** (self.failures - 1), _BACKOFF_MAX))
        self.not_before = time.monotonic() + delay
        return delay


class _QuietController(Controller):  # type: ignore[misc]
    """Circus's controller without its signal handlers: `dynamo serve` owns the signals."""

    def _init_syshandler(self) -> None:
        self.sys_hdl = _NoSysHandler()


class _NoSysHandler:
    def stop(self) -> None:
        pass


class _Arbiter(Arbiter):  # type: ignore[misc]
    def _init_context(self, context: Any) -> None:
        import zmq

        self.context = context or zmq.Context.instance()
        self._ensure_ioloop()
        self.ctrl = _QuietController(
            self.endpoint,
            self.multicast_endpoint,
            self.context,
            self.loop,
            self,
            self.check_delay,
            self.endpoint_owner,
        )


SpawnCallback = Callable[[ComponentPlan, str, int, bool], None]
#: (component, label, pid, exit code or None when unknown, restart delay) -> a delay override
ExitCallback = Callable[[ComponentPlan, str, int, int | None, float], float | None]


class Supervisor:
    """Starts, restarts and stops the processes of a plan (must run on an asyncio loop)."""

    def __init__(
        self,
        plan: Plan,
        logs: dict[str, ComponentLog],
        *,
        grace: float,
        on_spawn: SpawnCallback,
        on_exit: ExitCallback,
    ) -> None:
        self.plan = plan
        self.logs = logs
        self.grace = grace
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.stopping = False
        self.groups: set[int] = set()  # every process group we created (pgid == leader pid)
        self._ipc_dir = Path(tempfile.mkdtemp(prefix="dynamo-serve-"))
        self.endpoint = f"ipc://{self._ipc_dir}/control"
        self._arbiter: Any = None
        self.watchers: dict[str, _ComponentWatcher] = {}
        #: every spawned process not yet reported to `on_exit`: pid -> (watcher, start, process)
        #: (holding the process keeps `subprocess` from reaping it behind our back)
        self._live: dict[int, tuple[_ComponentWatcher, float, Process | None]] = {}

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        set_child_subreaper()
        _install_pdeathsig()
        loop = IOLoop.current()
        for comp in self.plan.components:
            if comp.replicas == 0:
                continue
            self.watchers[comp.name] = _ComponentWatcher(
                comp,
                self.logs[comp.name],
                self._vanished,
                graceful_timeout=self.grace,
                working_dir=self.plan.cwd,
                loop=loop,
                hooks={
                    "after_spawn": (self._after_spawn, False),
                    "after_reap": (self._after_reap, True),
                },
            )
        self._arbiter = _Arbiter(
            list(self.watchers.values()),
            self.endpoint,
            f"ipc://{self._ipc_dir}/pubsub",
            check_delay=_CHECK_DELAY,
            loop=loop,
            multicast_endpoint=None,
        )
        await self._arbiter.start()

    def _after_spawn(self, watcher: _ComponentWatcher, pid: int, **_: Any) -> bool:
        process = watcher.processes.get(pid)
        label = watcher.label_for(process.wid if process is not None else 1)
        watcher.log.started(pid, label)
        self.groups.add(pid)
        self._live[pid] = (watcher, time.monotonic(), process)
        self.on_spawn(watcher.plan, label, pid, watcher.failures > 0)
        return True

    def _after_reap(
        self, watcher: _ComponentWatcher, process_pid: int, exit_code: Any = None, **_: Any
    ) -> bool:
        self._exited(process_pid, int(exit_code) if exit_code is not None else None)
        return True

    def _vanished(self, watcher: _ComponentWatcher) -> None:
        """Processes circus dropped without reaping them: collect their status ourselves."""
        for pid, (owner, _, _) in list(self._live.items()):
            if owner is watcher and pid not in watcher.processes:
                try:
                    status = _try_wait(pid)
                except ChildProcessError:  # reaped by someone else: the status is lost
                    self._exited(pid, None)
                    continue
                if status is not None:
                    self._exited(pid, _exit_code(status))

    def _exited(self, pid: int, code: int | None) -> None:
        """The one place an exit is accounted for (`None`: the status was lost)."""
        known = self._live.pop(pid, None)
        if known is None:
            return  # reported already
        watcher, started, _ = known
        label = watcher.log.label_of(pid, watcher.name)
        if self.stopping or watcher.is_stopping() or watcher.is_stopped():
            return
        delay = watcher.backoff(time.monotonic() - started)
        override = self.on_exit(watcher.plan, label, pid, code, delay)
        if override is not None:
            watcher.not_before = time.monotonic() + override

    # -- state ------------------------------------------------------------------------------

    def pids(self, component: str) -> dict[int, str]:
        """Live pids of a component -> their label."""
        watcher = self.watchers.get(component)
        if watcher is None:
            return {}
        return {pid: watcher.label_for(p.wid) for pid, p in list(watcher.processes.items())}

    def all_pids(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for name in self.watchers:
            out.update(self.pids(name))
        return out

    # -- stop -------------------------------------------------------------------------------

    async def stop(self) -> list[int]:
        """Stop everything (ingress first); returns the pids the final sweep had to kill."""
        if self._arbiter is None:
            return []
        self.stopping = True
        self._arbiter._stopping = True  # no more respawns
        caller = getattr(self._arbiter.ctrl, "caller", None)
        if caller is not None:
            caller.stop()
        ingress = [w for w in self.watchers.values() if w.plan.health_http_port_arg]
        others = [w for w in self.watchers.values() if not w.plan.health_http_port_arg]
        for stage in (ingress, others):
            if stage:
                await gen.multi([w._stop(True) for w in stage])
        with contextlib.suppress(Exception):
            self._arbiter.stop_controller_and_close_sockets()
        leftovers = self.sweep()
        self._arbiter = None
        with contextlib.suppress(OSError):
            for f in self._ipc_dir.iterdir():
                f.unlink()
            self._ipc_dir.rmdir()
        return leftovers

    def kill_now(self) -> None:
        """A second Ctrl-C: SIGKILL every process group at once (stop() then finishes fast)."""
        for pgid in list(self.groups):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)

    def leftovers(self) -> list[psutil.Process]:
        """Processes still alive in our groups or below us (ourselves excluded)."""
        me = psutil.Process()
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for child in me.children(recursive=True):
                found[child.pid] = child
        if self.groups:
            for proc in psutil.process_iter():
                try:
                    if proc.pid != me.pid and os.getpgid(proc.pid) in self.groups:
                        found[proc.pid] = proc
                except (OSError, psutil.Error):
                    continue
        alive = []
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def sweep(self, wait: float = 2.0) -> list[int]:
        """Give stragglers `wait` seconds (they had SIGTERM with their group), then SIGKILL."""
        procs = self.leftovers()
        if procs:
            _, procs = psutil.wait_procs(procs, timeout=wait)
        killed = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
        if procs:
            psutil.wait_procs(procs, timeout=5)
        _reap_children()
        return killed


def _try_wait(pid: int) -> int | None:
    """The wait status of child `pid` if it can be reaped now (it is, then), else None.
    Raises ChildProcessError when it is not (or no longer) our child to reap."""
    reaped, status = os.waitpid(pid, os.WNOHANG)
    return status if reaped == pid else None


def _exit_code(status: int) -> int:
    """As `Popen.returncode`: the exit status, or minus the signal that ended the process."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _reap_children() -> None:
    """Collect the exit status of any child (or adopted orphan) so that none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except OSError as exc:
            if exc.errno == errno.ECHILD:
                return
            raise
        if pid == 0:
            return
