"""fairseq's command-line tools without paying for their heaviest imports at every call.

Each call of ``fairseq-train``, ``fairseq-generate``, ``rela-analyze``, ... is a new process forked (``os.fork``) from
a server process that has imported, once, the third-party libraries fairseq imports at start (``preload()``: torch,
numpy, hydra, sacrebleu, ...) and fairseq itself with the modules its command-line tools import (``FairseqImport``).
The forked process takes the call's argv, environment, working directory and standard streams and runs the installed
console script itself as ``__main__`` (what the interpreter does with it); an uncaught exception goes through
``sys.excepthook`` (the plugin's one-line errors) and exits 1, as there. Neither fairseq's command-line modules nor
this project are imported in the server: ``--user-dir`` imports the plugin in each call, as in a new interpreter.

Importing fairseq has effects on logging that depend on *when* it happens, so the server does not let them happen:
fairseq's speech tasks call ``logging.basicConfig`` (a no-op when fairseq-train configured logging before importing
fairseq; stderr with their own format under fairseq-preprocess, which configures it after) and log a line at import.
The server records those calls and records, and whatever the import printed, instead of applying them; a call's first
import of fairseq applies them in that call, in order, then hands over the modules imported already.

What changes how an interpreter or those libraries start (``PYTHONPATH``, ``OMP_NUM_THREADS``, ...) needs a new
interpreter: helpers.start_cli runs those calls, and every call when RELA_TESTS_NEW_INTERPRETERS=1, as plain
subprocesses; the server itself answers "run it yourself" to such a call from tool_client.py (``forkable``).

Standard library only. Two ways in: the test session writes one JSON request per line on one pipe (standard streams
as files) and reads the answers on another (the pid, then the exit code as subprocess reports it); tool_client.py,
which the pipeline's scripts run through RELA_TOOL_PREFIX in the tests, sends one message on a Unix socket with its
own standard streams attached (SCM_RIGHTS) and gets the pid, then the exit code, on the same connection (or "fresh");
when that connection closes first, its caller was killed, and so is the tool. The server's own standard streams are
left alone, so nothing a preloaded library prints can garble either protocol.
"""

import ast
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import logging
import os
import re
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import entry_points, packages_distributions, requires

# what fairseq 0.12.2 and fairseq-fixed import at start, none of which configures logging when imported
PRELOAD = ["torch", "torch.onnx", "torch._dynamo", "numpy", "hydra", "omegaconf", "sacrebleu"]
IF_REQUIRED = {"scikit-learn": ["scipy.stats", "sklearn.metrics"]}  # fairseq-fixed's criterions import it
STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "TORCH_", "LD_")  # read when an interpreter or those libraries start
# fairseq's command-line modules: the fairseq modules they import are imported in the server (the modules themselves
# are not: they configure logging when imported)
FAIRSEQ_CLI_MODULES = ("fairseq_cli.train", "fairseq_cli.generate", "fairseq_cli.preprocess", "fairseq_cli.interactive")


def preload():
    """The modules the server imports: PRELOAD, and what IF_REQUIRED names for the installed fairseq."""
    modules = list(PRELOAD)
    for distribution in packages_distributions().get("fairseq", []):
        for requirement in requires(distribution) or []:
            modules += IF_REQUIRED.get(re.split(r"[\s;<>=!~\[(]", requirement)[0], [])
    return modules


def is_console_script(name):
    return bool(entry_points(group="console_scripts", name=name))


def fairseq_modules_of_the_tools():
    """The fairseq modules FAIRSEQ_CLI_MODULES import at their top level (read from their source, not imported)."""
    names = ["fairseq"]
    for cli in FAIRSEQ_CLI_MODULES:
        spec = importlib.util.find_spec(cli)
        with open(spec.origin) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fairseq" and not node.level:
                names += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                names += [alias.name for alias in node.names if alias.name.split(".")[0] == "fairseq"]
    return list(dict.fromkeys(names))


def is_fairseq_module(name):
    return name == "fairseq" or name.startswith("fairseq.")


class FairseqImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """fairseq imported in the server with its effects on logging and on the standard streams recorded, not applied
    (``record``); in a forked call, the modules are withdrawn from ``sys.modules`` (``withdraw``) until the call first
    imports fairseq, which applies those effects there, in their order, and hands the modules back (``create_module``).
    ``importlib.util.find_spec`` alone, which imports nothing, applies nothing."""

    def __init__(self):
        self.events, self.modules, self.specs, self.applied = [], {}, {}, False

    def record(self, names):
        events = self.events

        class Recorder(logging.Handler):
            def emit(self, record):
                events.append(("record", record))

        class Stream(io.TextIOBase):
            def __init__(self, name):
                self.name = name

            def write(self, text):
                events.append((self.name, text))
                return len(text)

        root, basic_config, streams = logging.getLogger(), logging.basicConfig, (sys.stdout, sys.stderr)
        level, recorder = root.level, Recorder()
        root.addHandler(recorder)
        root.setLevel(logging.NOTSET)  # the loggers' own levels decide, as they will when the records are applied
        logging.basicConfig = lambda **kwargs: events.append(("basicConfig", kwargs))
        sys.stdout, sys.stderr = Stream("stdout"), Stream("stderr")
        try:
            for name in names:
                try:
                    importlib.import_module(name)
                except ImportError:  # a name imported from a module, not a module: the call imports what is missing
                    pass
        finally:
            sys.stdout, sys.stderr = streams
            logging.basicConfig = basic_config
            root.removeHandler(recorder)
            root.setLevel(level)
        unexpected = [name for name in sys.modules if name.startswith("fairseq_cli.")]  # the package is empty
        assert not unexpected, f"importing fairseq imported {unexpected}, which configure logging when imported"
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        captured = [h for lg in loggers for h in getattr(lg, "handlers", [])
                    if isinstance(getattr(h, "stream", None), Stream)]
        assert not captured, f"importing fairseq made handlers of its own: {captured}"
        self.modules = {name: module for name, module in sys.modules.items() if is_fairseq_module(name)}
        self.specs = {name: module.__spec__ for name, module in self.modules.items() if module is not None}

    def withdraw(self):
        """In a forked call: fairseq is not imported until the call imports it."""
        for name in self.modules:
            del sys.modules[name]
        sys.meta_path.insert(0, self)

    def find_spec(self, name, path=None, target=None):
        if self.applied or name not in self.modules or self.modules[name] is None:
            return None
        original = self.modules[name].__spec__
        return importlib.machinery.ModuleSpec(name, self, origin=original.origin,
                                              is_package=original.submodule_search_locations is not None)

    def create_module(self, spec):
        if not self.applied:
            self.applied = True
            sys.meta_path.remove(self)
            self.apply()
            sys.modules.update(self.modules)
        return self.modules[spec.name]

    def exec_module(self, module):  # imported already: give back the spec the import machinery replaced
        module.__spec__ = self.specs[module.__name__]

    def apply(self):
        for kind, event in self.events:
            if kind == "basicConfig":
                logging.basicConfig(**event)
            elif kind == "record":
                logger = logging.getLogger(event.name)
                if logger.isEnabledFor(event.levelno):
                    event.created = time.time()
                    event.msecs = event.created % 1 * 1000
                    event.process = os.getpid()
                    logger.handle(event)
            else:
                getattr(sys, kind).write(event)


# --------------------------------------------------------------------------- the server process

def _run_tool(request, stdio, close_fds, fairseq_import):
    """In the forked process: become ``script args`` and run the script as the interpreter would. ``stdio``: the call's
    standard streams, as file descriptors or paths."""
    for fd in close_fds:
        os.close(fd)
    # SIGHUP at its default, as in an interpreter started from a terminal: a suite run under nohup (which ignores
    # SIGHUP, and so does the server it starts) would otherwise fork every tool ignoring it, and a tool_client.py
    # that forwards a SIGHUP would wait for a tool that lives on
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    fairseq_import.withdraw()
    for fd, stream, flags in zip((0, 1, 2), stdio, (os.O_RDONLY, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(stream, flags) if isinstance(stream, str) else stream
        if opened != fd:
            os.dup2(opened, fd)
            if opened not in stdio[fd + 1:]:
                os.close(opened)
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cwd"] is not None:
        os.chdir(request["cwd"])
    sys.argv = [request["script"], *request["args"]]
    sys.path.insert(0, os.path.dirname(request["script"]))  # as for any script: its folder first
    try:
        runpy.run_path(request["script"], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def forkable(argv, env):
    """The request a tool_client.py call can be served with (``python SCRIPT ARGS...`` with this Python and the
    server's start-up environment), else None: the client then runs its command itself."""
    if len(argv) < 2 or os.path.abspath(argv[0]) != os.path.abspath(sys.executable):  # not another environment's
        return None
    if not argv[1].endswith(".py") or not os.path.isfile(argv[1]):  # options to the interpreter, -m, -c, ...
        return None
    startup = {k: v for k, v in os.environ.items() if k.startswith(STARTUP_ENV)}
    if startup != {k: v for k, v in env.items() if k.startswith(STARTUP_ENV)}:
        return None
    return {"script": argv[1], "args": argv[2:], "env": env}


def serve(request_fd, answer_fd, socket_path):
    """Calls come from the test session (one JSON line each on ``request_fd``, standard streams as files) and from
    tool_client.py (one message each on a connection to ``socket_path``, standard streams passed along)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(64)  # clients wait here while the modules below are imported
    for module in preload():
        try:
            __import__(module)
        except ImportError:  # then the calls import it themselves
            pass
    fairseq_import = FairseqImport()
    fairseq_import.record(fairseq_modules_of_the_tools())
    running, clients, pending = {}, {}, b""  # pid -> call id or client; client socket -> pid

    def answer(message):
        os.write(answer_fd, (json.dumps(message) + "\n").encode())

    def start(request, stdio, *close):
        pid = os.fork()
        if pid == 0:
            close = [request_fd, answer_fd, listener.fileno(), *(c.fileno() for c in (*clients, *close))]
            _run_tool(request, stdio, close, fairseq_import)
        return pid

    while True:
        readable, _, _ = select.select([request_fd, listener, *clients], [], [], 0.05)
        for source in readable:
            if source == request_fd:
                data = os.read(request_fd, 1 << 16)
                if not data:  # the test session ended
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = json.loads(line)
                    pid = start(request, (request["stdin"], request["stdout"], request["stderr"]))
                    running[pid] = request["id"]
                    answer({"id": request["id"], "pid": pid})
            elif source is listener:
                client, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(client, 1 << 20, 3)
                call = json.loads(message)
                request = forkable(call["argv"], call["env"])
                with open(socket_path + ".calls", "a") as log:  # what the tests check: which calls were forked
                    log.write(json.dumps({"argv": call["argv"], "forked": request is not None}) + "\n")
                if request is None or len(fds) != 3:
                    client.send(json.dumps({"fresh": True}).encode())
                    client.close()
                else:
                    pid = start({**request, "cwd": call["cwd"]}, tuple(fds), client)
                    client.send(json.dumps({"pid": pid}).encode())
                    running[pid], clients[client] = client, pid
                for fd in fds:
                    os.close(fd)
            elif not source.recv(1 << 10):  # a client ended (killed) before its tool: so does the tool
                os.kill(clients.pop(source), signal.SIGKILL)
                source.close()
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                caller, code = running.pop(pid), os.waitstatus_to_exitcode(status)
                if isinstance(caller, socket.socket):
                    if clients.pop(caller, None) is not None:
                        try:
                            caller.send(json.dumps({"code": code}).encode())
                        except OSError:
                            pass
                        caller.close()
                else:
                    answer({"id": caller, "code": code})


# --------------------------------------------------------------------------- the test session's side

class _Server:
    """The server process and a thread that hands its answers to the waiting calls."""

    def __init__(self):
        request_r, self.request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.folder = tempfile.mkdtemp(prefix="rela-tool-server-")
        self.socket_path = os.path.join(self.folder, "socket")
        # unbuffered standard streams, as every call asks (helpers.start_cli, the pipeline's scripts in the tests)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(request_r), str(answer_w),
                                         self.socket_path], pass_fds=(request_r, answer_w), stdin=subprocess.DEVNULL,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        os.close(request_r)
        os.close(answer_w)
        while not os.path.exists(self.socket_path) and self.process.poll() is None:
            time.sleep(0.01)  # the server listens before it imports anything: tool_client.py calls then wait there
        self.answers = os.fdopen(answer_r)
        self.lock, self.calls, self.next_id = threading.Lock(), {}, 0
        threading.Thread(target=self._dispatch, daemon=True).start()

    def _dispatch(self):
        for line in self.answers:
            message = json.loads(line)
            call = self.calls[message["id"]]
            if "pid" in message:
                call.pid = message["pid"]
            else:
                call.returncode = message["code"]
                call.done.set()
        for call in list(self.calls.values()):  # the server died: no running call may wait forever
            if not call.done.is_set():
                call.server_died = True
                call.done.set()

    def client_calls(self):
        """What tool_client.py asked so far: {"argv": the command, "forked": whether it was forked} each."""
        try:
            with open(self.socket_path + ".calls") as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def start(self, call, request):
        with self.lock:
            self.next_id += 1
            request["id"] = self.next_id
            self.calls[self.next_id] = call
            os.write(self.request_w, (json.dumps(request) + "\n").encode())


_server = None
_server_lock = threading.Lock()


def server():
    global _server
    with _server_lock:
        if _server is None or _server.process.poll() is not None:
            _server = _Server()
        return _server


def shutdown():
    """End the server (at the end of the test session): it may still be importing, which would keep the session's
    output pipe open for seconds; its folder (socket, call log) goes with it."""
    global _server
    with _server_lock:
        if _server is not None:
            _server.process.kill()
            _server.process.wait()
            shutil.rmtree(_server.folder, ignore_errors=True)
            _server = None


class ForkedTool:
    """A started tool, with what helpers.finish_cli uses of subprocess.Popen: communicate, returncode."""

    def __init__(self, script, args, input, cwd, env):
        self.folder = tempfile.mkdtemp(prefix="rela-tool-")
        paths = {name: os.path.join(self.folder, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w") as f:
            f.write(input or "")
        for name in ("stdout", "stderr"):
            open(paths[name], "w").close()
        self.paths, self.pid, self.returncode, self.server_died = paths, None, None, False
        self.done = threading.Event()
        server().start(self, {"script": script, "args": [str(a) for a in args], "env": dict(env),
                              "cwd": None if cwd is None else str(cwd), **paths})

    def communicate(self, input=None, timeout=None):  # the input was written when the tool started
        if not self.done.wait(timeout):
            if self.pid is not None:
                os.kill(self.pid, 9)
            self.done.wait(10)
            raise subprocess.TimeoutExpired(self.paths["stdout"], timeout)
        if self.server_died:
            raise RuntimeError("the tool server (tests/support/tool_server.py) died; RELA_TESTS_NEW_INTERPRETERS=1 "
                               "runs every tool as a new interpreter")
        with open(self.paths["stdout"]) as out, open(self.paths["stderr"]) as err:
            result = out.read(), err.read()
        shutil.rmtree(self.folder, ignore_errors=True)
        return result


if __name__ == "__main__":
    sys.path.pop(0)  # this folder (tests/support) must not shadow anything the tools import
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
