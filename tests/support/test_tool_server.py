"""The suite's tool server as the pipeline's scripts use it (tool_client.py through RELA_TOOL_PREFIX): a forked call
behaves as the command would (streams, exit code, working directory, environment, signals), what it cannot fork runs
as a new process, and a killed client leaves no tool behind. The calls of fairseq's own tools are compared with new
interpreters in test_cli.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tool_server
from tool_client import SOCKET_VAR

from rela_tools.pipeline import fairseq_tool

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tool_client.py")
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: (print("terminated", file=sys.stderr, flush=True), os._exit(7)))
    print("ppid", os.getppid(), "cwd", os.getcwd(), "env", os.environ.get("RELA_TEST_VALUE"), flush=True)
    print("read", sys.stdin.read().strip(), file=sys.stderr, flush=True)
    if len(sys.argv) > 1 and sys.argv[1] == "sleep":
        with open(sys.argv[2], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""")


@pytest.fixture
def served(tmp_path):
    """(server, a script, the client's command prefix, the environment that reaches the server)."""
    if os.environ.get("RELA_TESTS_NEW_INTERPRETERS") == "1":
        pytest.skip("RELA_TESTS_NEW_INTERPRETERS=1: the suite runs without its tool server")
    server = tool_server.server()
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONUNBUFFERED="1", RELA_TEST_VALUE="forty-two", **{SOCKET_VAR: server.socket_path})
    return server, script, [sys.executable, "-S", "-E", CLIENT, sys.executable], env


def test_a_forked_call_has_the_callers_streams_exit_code_folder_and_environment(served, tmp_path):
    server, script, client, env = served
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([*client, script, "3"], input="hello", capture_output=True, text=True, env=env, cwd=work)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == f"ppid {server.process.pid} cwd {work} env forty-two\n"  # a child of the server
    assert proc.stderr == "read hello\n"
    assert server.client_calls()[-1] == {"argv": [sys.executable, str(script), "3"], "forked": True}


def test_what_the_server_cannot_fork_runs_as_a_new_process(served):
    server, script, client, env = served
    other_threads = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 1)  # not what the server started with
    for other_env, command in (({"OMP_NUM_THREADS": other_threads}, [*client, script]),  # changes how torch starts
                               ({}, [*client, "-X", "importtime", script]),  # options to the interpreter
                               ({}, [*client[:-1], "env", sys.executable, script])):  # another program
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=dict(env, **other_env))
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert stdout.startswith("ppid ") and int(stdout.split()[1]) != server.process.pid, command
        assert server.client_calls()[-1]["forked"] is False, command


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def running(pid):
    try:  # a zombie only waits for the server to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped, perhaps while this read
        return False


@pytest.mark.parametrize("signum,ends", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGHUP, -signal.SIGHUP),
                                         (signal.SIGTERM, 7)])
def test_a_signalled_client_takes_its_tool_along(served, tmp_path, signum, ends):
    """SIGHUP and SIGTERM are forwarded to the tool and the client ends as the tool did (killed by SIGHUP; the tool
    handles SIGTERM and exits with 7); a client killed outright (as the resume test kills train.sh's process group)
    has the server kill the tool."""
    server, script, client, env = served
    pid_file = tmp_path / "pid"
    proc = subprocess.Popen([*client, script, "sleep", pid_file], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert wait_for(lambda: pid_file.exists() and pid_file.read_text()), proc.stderr.read() if proc.poll() else ""
    tool = int(pid_file.read_text())
    assert running(tool) and tool != proc.pid
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == ends
    assert wait_for(lambda: not running(tool), 10), "the tool outlived its client"
    assert ("terminated" in proc.stderr.read()) == (signum == signal.SIGTERM)


def test_the_pipeline_puts_the_prefix_before_each_tool(monkeypatch):
    monkeypatch.setenv(fairseq_tool.PREFIX_VAR, "nice -n 10")
    assert fairseq_tool.command("fairseq-train")[:4] == ["nice", "-n", "10", sys.executable]
    assert fairseq_tool.command("fairseq-train-torchrun")[0].endswith("fairseq_tool.py")  # torchrun's own prefix
    monkeypatch.delenv(fairseq_tool.PREFIX_VAR)
    assert fairseq_tool.command("fairseq-generate")[0] == sys.executable
