"""Run a command through the suite's tool server (tool_server.py): ``python tool_client.py COMMAND...``.

The tests set the pipeline's ``RELA_TOOL_PREFIX`` to this script, so that the fairseq tools the scripts start
(``python .../fairseq_tool.py fairseq-train ...``) are forked from the server, which imported torch and fairseq once,
instead of starting a new interpreter each. The call's arguments, environment, working directory and standard streams
(passed as file descriptors) go to the server; this process waits for the tool, forwards the signals it gets to it,
and ends as the tool ended (its exit code, or killed by the same signal). When this process is killed the server kills
the tool. Anything the server cannot fork (another interpreter, other start-up environment variables, torchrun, no
server) runs here as it would have without the prefix: this process becomes the command. Standard library only; run
with ``python -S -E``.
"""

import json
import os
import signal
import socket
import sys

SOCKET_VAR = "RELA_TESTS_TOOL_SOCKET"


def main(command):
    path = os.environ.get(SOCKET_VAR)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(path or "")
        call = {"argv": command, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(connection, [json.dumps(call).encode()], [0, 1, 2])
    except OSError:  # no server: run it here
        os.execvp(command[0], command)
    tool = None
    early = []  # signals that came before the server said which process the tool is: sent on when it does

    def forward(signum, frame):
        if tool is None:
            early.append(signum)
        else:
            os.kill(tool, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        message = connection.recv(1 << 16)
        if not message:
            sys.exit(f"tool_client.py: the tool server ended during {' '.join(command)}")
        answer = json.loads(message)
        if answer.get("fresh"):
            connection.close()
            os.execvp(command[0], command)
        tool = answer.get("pid", tool)
        while tool is not None and early:  # under load the tool can start (and be signalled) before its pid arrives
            os.kill(tool, early.pop(0))
        if "code" in answer:
            code = answer["code"]
            if code < 0:  # killed by a signal: end the same way
                if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset (OSError)
                    signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
