"""Console commands forked from a warm interpreter: a zygote process imports torch, transformers and genrecal once,
then forks each `python -m genrecal_cache|genrecal_train COMMAND ...` a test starts (issue 25: ~6 s saved a launch),
and torchrun's ranks from a zygote forked by the torchrun (`python -m torch.distributed.run ...`).

The child is still a process of its own, with the test's argv, environment, directory and stdio, its exit code and
signals as a cold start's, and a normal interpreter exit (atexit, thread joins). What an interpreter fixes at
start-up it shares with its zygote: so each environment that differs in a name an import may read (all but
`WARM_ENV`'s: OMP_, HF_, TRITON_... are read at import) gets a zygote started with it, and the string hash seed is
the zygote's (fresh each test session). `GENRECAL_COLD_COMMANDS=1` (`make test-all`) starts every command cold.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

# `python -m` targets a zygote runs: the commands, torchrun (whose ranks a zygote of its own forks), the test probe
MODULES = ("genrecal_cache", "genrecal_train", "genrecal_train.cli", "torch.distributed.run", "tests.warm_probe")
TORCHRUN = "torch.distributed.run"
# Names a command reads when it runs, not at import (torchrun's for its ranks among them); XDG_CACHE_HOME only while
# HF_HOME is set (tests/conftest.py).
WARM_ENV = ("GENRECAL_", "SLURM_", "AWS_", "WANDB_", "MLFLOW_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OLDPWD", "PYTEST_CURRENT_TEST", "XDG_CACHE_HOME")
_STATUS = struct.Struct("i")  # a child's raw wait status, as os.waitpid gives it


def _preload() -> None:
    """Import what the commands import (not vLLM or Ray: a vLLM command imports it in its own process)."""
    import importlib
    import pkgutil

    import torch  # noqa: F401
    import transformers

    for package in ("genrecal_cache", "genrecal_train", "genrecal_kernels"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            if not any(part in info.name for part in ("vllm", "ray_launch", "__main__")):
                importlib.import_module(info.name)
    for name in ("LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration",
                 "Qwen2VLForConditionalGeneration", "AutoModelForCausalLM", "AutoProcessor", "AutoTokenizer"):
        getattr(transformers, name)


def _threads() -> list[str]:
    """The names of this process's OS threads other than the main one (none may run at a fork but jemalloc's)."""
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")
             if int(t) != os.getpid()]
    return [n for n in names if n != "jemalloc_bg_thd"]


def _become(request: dict, fds: list[int], own_fds: list[int], started: int) -> None:
    """In the forked child: take the request's stdio, session, directory and environment, then run the module as
    `python -m` does. Its SystemExit (or exception) leaves through the zygote's main to a normal interpreter exit."""
    for fd in own_fds:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        if fd > 2:
            os.close(fd)
    if request["new_session"]:
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.close(started)  # the pid is answered now, the session set, as Popen returns after a cold exec
    for fd, name in enumerate(("stdin", "stdout", "stderr")):  # as the interpreter makes them at start-up
        old, raw = getattr(sys, name), io.FileIO(fd, "rb" if fd == 0 else "wb", closefd=False)
        unbuffered = fd > 0 and (old.write_through or request.get("unbuffered", False))  # PYTHONUNBUFFERED, -u
        buffer = raw if unbuffered else io.BufferedReader(raw) if fd == 0 else io.BufferedWriter(raw)
        new = io.TextIOWrapper(buffer, encoding=old.encoding, errors=old.errors, write_through=unbuffered,
                               line_buffering=fd == 2 or (fd == 1 and raw.isatty()))
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    import numpy as np

    np.random.seed()  # numpy's global generator fresh, as a cold start's (random reseeds itself at fork)
    sys.path[0] = os.getcwd()
    sys.argv = ["-m", *request["args"]]  # runpy sets argv[0] to the module's file
    if request["module"] == TORCHRUN:
        _fork_ranks_from_a_zygote()
    import runpy

    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)


def _fork_ranks_from_a_zygote() -> None:
    """In a warm torchrun, before it runs: fork a zygote of its own (nothing run yet, no thread) for the ranks it
    starts, so they start warm too. They are that zygote's children, in this torchrun's process group (until they
    start their own session, as torchrun asks); the zygote dies with this process."""
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    from genrecal_cache.core.process import die_with_parent

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    if os.fork() == 0:
        mine.close()
        die_with_parent()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # the ranks get torchrun's stdio through their requests, not from this one
            os.dup2(null, fd)
        pid = os.getpid()
        try:
            serve(theirs)
        finally:
            if os.getpid() == pid:  # the rank it forks leaves through here to its own interpreter exit
                os._exit(0)
    theirs.close()
    zygote = Zygote(mine, env)
    subprocess_handler.Popen = lambda args, env, **kwargs: popen(args, env, via=zygote, **kwargs)


def serve(sock: socket.socket) -> None:
    """The zygote: for each request on `sock` (JSON + stdin/stdout/stderr/status fds), fork a child and answer its
    pid; write each child's wait status to its status fd when it ends. Returns once the socket is closed and the
    children it started have ended."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    status_fds: dict[int, int] = {}  # child pid -> its status fd
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    closed = False
    while not closed or status_fds:
        for key, _ in sel.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
                if not message:  # closed: wait for the running children, then exit
                    sel.unregister(sock)
                    closed = True
                    continue
                request = json.loads(message)
                sys.stdout.flush()
                sys.stderr.flush()
                started_r, started_w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _become(request, fds[:3], [sock.fileno(), wake_r, wake_w, fds[3], started_r,
                                               *status_fds.values()], started_w)
                os.close(started_w)
                os.read(started_r, 1)  # EOF: the child has closed it (or ended)
                os.close(started_r)
                status_fds[pid] = fds[3]
                for fd in fds[:3]:
                    os.close(fd)
                sock.sendall(_STATUS.pack(pid))
            else:
                os.read(wake_r, 4096)
        while status_fds:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            fd = status_fds.pop(pid)
            os.write(fd, _STATUS.pack(status))
            os.close(fd)


class Zygote:
    """A warm interpreter serving `sock`, whose imports saw the environment `env`."""

    def __init__(self, sock: socket.socket, env: Mapping[str, str], error: str | None = None,
                 proc: subprocess.Popen | None = None) -> None:
        self.sock, self.key, self.error, self.proc = sock, _import_env(env), error, proc
        self.lock = threading.Lock()

    @classmethod
    def launch(cls, env: Mapping[str, str]) -> Zygote:
        """One started from this process with the environment `env`."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        proc = subprocess.Popen([sys.executable, "-m", "tests.warm", str(theirs.fileno())], cwd=root, env=env,
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)  # its children get the requests' own stdio
        theirs.close()
        ready = mine.recv(4096)
        z = cls(mine, env, None if ready == b"ready" else ready.decode() or "it exited", proc)
        if z.error:
            print(f"tests/warm.py: this command starts cold ({z.error})", file=sys.stderr)
        return z

    def start(self, request: dict, fds: list[int]) -> int:
        """Send one request with its four fds; the child's pid."""
        with self.lock:
            socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
            answer = self.sock.recv(_STATUS.size)
        if len(answer) != _STATUS.size:
            raise RuntimeError("the warm launcher died: run with GENRECAL_COLD_COMMANDS=1")
        return _STATUS.unpack(answer)[0]

    def close(self) -> None:
        """Stop taking requests; the zygote exits once its running children have ended."""
        self.sock.close()


def _import_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """What of `env` an import may read: all but WARM_ENV's names (XDG_CACHE_HOME counts unless HF_HOME is set)."""
    free = WARM_ENV if "HF_HOME" in env else tuple(n for n in WARM_ENV if n != "XDG_CACHE_HOME")
    return tuple(sorted((k, v) for k, v in env.items() if not k.startswith(free)))


_zygotes: dict[tuple, Zygote] = {}  # by _import_env, the most recently used last
_started: list[Zygote] = []
MAX_ZYGOTES = 2  # ~0.9 GB each, shared copy-on-write with their children


@atexit.register
def _close_all() -> None:
    for z in _started:
        z.close()
    for z in _started:
        try:
            z.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a child still running keeps it: the child is left to run
            z.proc.kill()


def zygote(env: Mapping[str, str]) -> Zygote | None:
    """A zygote whose imports saw `env` (started at first use), or None: GENRECAL_COLD_COMMANDS=1, or its imports
    failed. The oldest of more than MAX_ZYGOTES is closed."""
    if os.environ.get("GENRECAL_COLD_COMMANDS") == "1":
        return None
    key = _import_env(env)
    z = _zygotes.pop(key, None)
    if z is None:
        z = Zygote.launch(env)
        _started.append(z)
    _zygotes[key] = z
    while len(_zygotes) > MAX_ZYGOTES:
        _zygotes.pop(next(iter(_zygotes))).close()
    return None if z.error else z


class WarmPopen(subprocess.Popen):
    """`subprocess.Popen` whose child the zygote forks: the same stdio, pipes, `communicate`, `wait`, `kill`."""

    def __init__(self, args: Sequence[str], *, zygote: Zygote, **kwargs) -> None:
        self._zygote = zygote
        super().__init__(list(args), **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, startupinfo,
                       creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite, *rest):
        start_new_session = rest[5]  # after restore_signals, gid, gids, uid, umask
        status_r, status_w = os.pipe()
        stdio = [fd if fd != -1 else default for fd, default in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
        unbuffered, (_, module, *argv) = _python_m(args)
        request = {"module": module, "args": argv, "cwd": os.fspath(cwd or os.getcwd()), "unbuffered": unbuffered,
                   "env": dict(os.environ if env is None else env), "new_session": bool(start_new_session)}
        try:
            self.pid = self._zygote.start(request, [*stdio, status_w])
        finally:
            os.close(status_w)
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)
        self._status_fd = status_r
        self._child_created = True

    def _try_wait(self, wait_flags):
        """(pid, status) from the zygote's status pipe, (0, 0) under WNOHANG while the child runs."""
        if wait_flags & os.WNOHANG:
            if not select.select([self._status_fd], [], [], 0)[0]:
                return 0, 0
        data = os.read(self._status_fd, _STATUS.size)
        os.close(self._status_fd)
        if len(data) != _STATUS.size:
            raise RuntimeError(f"the warm launcher died before command pid {self.pid} ended")
        return self.pid, _STATUS.unpack(data)[0]

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


def _python_m(args: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether `-u` is given, the rest of `args` from `-m`) of `python [-u] -m MODULE ...`."""
    unbuffered = len(args) > 1 and args[1] == "-u"
    return unbuffered, list(args[1 + unbuffered:])


def popen(args: Sequence[str], env: Mapping[str, str], via: Zygote | None = None, **kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args, env=env, **kwargs)`: forked from a zygote (`via`, if its imports saw the same
    environment) when `args` is `python [-u] -m <MODULES> ...` (and no fds are passed), else a cold start."""
    rest = _python_m(args)[1]
    python_m = args[0] == sys.executable and len(rest) > 1 and rest[0] == "-m" and rest[1] in MODULES
    z = None
    if python_m and not kwargs.get("pass_fds") and kwargs.get("close_fds", True):
        z = zygote(env) if via is None else via if via.key == _import_env(env) else None
    if z is not None:
        return WarmPopen(args, zygote=z, env=env, **kwargs)
    return subprocess.Popen(args, env=env, **kwargs)


def run(args: Sequence[str], env: Mapping[str, str], input: str | bytes | None = None, timeout: float | None = None,
        check: bool = False, capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` through `popen`."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    with popen(args, env, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            exc.stdout, exc.stderr = process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check:
        done.check_returncode()
    return done


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        _preload()
        left = _threads()
        sock.sendall(b"ready" if not left else f"threads running after the imports: {left}".encode())
    except Exception as exc:  # the tests then start their commands cold
        sock.sendall(f"the imports failed: {exc!r}".encode())
        return
    serve(sock)


if __name__ == "__main__":
    main()
