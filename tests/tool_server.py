"""fairseq's command-line tools without paying for their heaviest imports at every call.

Each call of ``fairseq-train``, ``fairseq-generate``, ``rela-analyze``, ... is a new process forked (``os.fork``) from
a server process that has imported the third-party libraries fairseq imports at start (``preload()``: torch, numpy,
hydra, sacrebleu, ...): about 5 of the 6.5 s a call spends starting. Neither fairseq nor this project is imported
there: their imports, and what those imports do to logging (fairseq's command-line modules configure the root logger
before they import fairseq, whose speech tasks configure it too), happen in each call as in a new interpreter, and
``--user-dir`` imports the plugin there. The forked process takes the call's argv, environment, working directory and
standard streams and runs the installed console script itself as ``__main__`` (what the interpreter does with it);
an uncaught exception goes through ``sys.excepthook`` (the plugin's one-line errors) and exits 1, as there.

What changes how an interpreter or those libraries start (``PYTHONPATH``, ``OMP_NUM_THREADS``, ...) needs a new
interpreter: helpers.start_cli runs those calls, and every call when RELA_TESTS_NEW_INTERPRETERS=1, as plain
subprocesses.

Standard library only. The server reads one JSON request per line on one pipe and answers on another ("started" with
the pid, then "exited" with the code as subprocess reports it); its own standard streams are left alone, so nothing a
preloaded library prints can garble the protocol.
"""

import json
import os
import re
import runpy
import select
import shutil
import subprocess
import sys
import tempfile
import threading
from importlib.metadata import entry_points, packages_distributions, requires

# what fairseq 0.12.2 and fairseq-fixed import at start, none of which configures logging when imported
PRELOAD = ["torch", "torch.onnx", "numpy", "hydra", "omegaconf", "sacrebleu"]
IF_REQUIRED = {"scikit-learn": ["scipy.stats", "sklearn.metrics"]}  # fairseq-fixed's criterions import it
STARTUP_ENV = ("PYTHON", "OMP_", "MKL_", "KMP_", "TORCH_", "LD_")  # read when an interpreter or those libraries start


def preload():
    """The modules the server imports: PRELOAD, and what IF_REQUIRED names for the installed fairseq."""
    modules = list(PRELOAD)
    for distribution in packages_distributions().get("fairseq", []):
        for requirement in requires(distribution) or []:
            modules += IF_REQUIRED.get(re.split(r"[\s;<>=!~\[(]", requirement)[0], [])
    return modules


def is_console_script(name):
    return bool(entry_points(group="console_scripts", name=name))


# --------------------------------------------------------------------------- the server process

def _run_tool(request, protocol_fds):
    """In the forked process: become ``script args`` and run the script as the interpreter would."""
    for fd in protocol_fds:
        os.close(fd)
    for fd, path, flags in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.environ.clear()
    os.environ.update(request["env"])
    if request["cwd"] is not None:
        os.chdir(request["cwd"])
    sys.argv = [request["script"], *request["args"]]
    sys.orig_argv = [sys.executable, *sys.argv]
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


def serve(request_fd, answer_fd):
    for module in preload():
        try:
            __import__(module)
        except ImportError:  # then the calls import it themselves
            pass
    running, pending = {}, b""

    def answer(message):
        os.write(answer_fd, (json.dumps(message) + "\n").encode())

    while True:
        readable, _, _ = select.select([request_fd], [], [], 0.05)
        if readable:
            data = os.read(request_fd, 1 << 16)
            if not data:  # the test session ended
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _run_tool(request, (request_fd, answer_fd))
                running[pid] = request["id"]
                answer({"id": request["id"], "pid": pid})
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                answer({"id": running.pop(pid), "code": os.waitstatus_to_exitcode(status)})


# --------------------------------------------------------------------------- the test session's side

class _Server:
    """The server process and a thread that hands its answers to the waiting calls."""

    def __init__(self):
        request_r, self.request_w = os.pipe()
        answer_r, answer_w = os.pipe()
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(request_r), str(answer_w)],
                                        pass_fds=(request_r, answer_w), stdin=subprocess.DEVNULL)
        os.close(request_r)
        os.close(answer_w)
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
            raise RuntimeError("the tool server (tests/tool_server.py) died; RELA_TESTS_NEW_INTERPRETERS=1 runs "
                               "every tool as a new interpreter")
        with open(self.paths["stdout"]) as out, open(self.paths["stderr"]) as err:
            result = out.read(), err.read()
        shutil.rmtree(self.folder, ignore_errors=True)
        return result


if __name__ == "__main__":
    sys.path.pop(0)  # this folder (tests/) must not shadow anything the tools import
    serve(int(sys.argv[1]), int(sys.argv[2]))
