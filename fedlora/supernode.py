"""`fedlora-supernode`: a Flower SuperNode whose ClientApp tasks all run in one long-lived process.

Flower 1.41's `flower-supernode`, by default (`--isolation subprocess`), runs Flower's SuperExec,
which starts a new `flwr-clientapp` process for every message: each round a node's process installs
the run's FAB, imports PyTorch, reads its data from disk and builds its model again. And the node
asks the SuperLink for messages every 3 s while it has none, so a round's messages wait 1.5 s on
average before a node sees them.

`fedlora-supernode` takes `flower-supernode`'s arguments and runs it with `--isolation process`,
beside an executor of its own (`fedlora-superexec`, a child process; it can also run alone beside
a `flower-supernode --isolation process`). The executor asks the node's Runtime API for its next
ClientApp task, runs it in its own process and pushes the reply and the task's status back, as
`flwr-clientapp` does, and keeps between tasks what fedlora's ClientApp keeps per process: the run's
model and the node's data tensors. The node asks the SuperLink every `--pull-interval` seconds
(default 1) while it has no message.

Tasks run one at a time, in the order the node hands them out. The ClientApp is loaded from the
first task's FAB; a task of another FAB (the project's code changed) makes the executor start
afresh (`exec`) with that task, so that no module of the old code is kept. The Flower functions
both use are those of Flower 1.41.0, the version the project pins; under another version they
refuse to start.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial

log = logging.getLogger("fedlora")

FLOWER = "1.41.0"  # the version whose flwr-clientapp internals this module drives


def _runtime_client(address: str, insecure: bool, certificates: bytes | None, component: str,
                    token: str | None = None, secret: bytes | None = None):
    """A client of the node's Runtime API: a task's (with its token), or the executor's own (which
    signs its asks for tasks with the node's SuperExec secret, where the node was given one)."""
    from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor,
                                             SuperExecAuthHttpInterceptor)
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS

    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    retry = make_simple_http_retry_invoker()
    if token is not None:  # a task's client
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    else:  # the executor's own
        if secret is not None:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                             protected_methods=_SUPEREXEC_AUTH_METHODS))
        # Flower's retries answer a refusal (401: a SuperExec secret missing or wrong) by interrupting
        # the process, which would end the executor without a word: raise it here instead
        flower_giveup = retry.should_giveup
        retry.should_giveup = lambda e: _refused(e) or flower_giveup(e)
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=retry)


def _refused(error: Exception) -> bool:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None) == 401


def _load_app(run, fab):
    """The ClientApp of a run's FAB, installed under FLWR_HOME as flwr-clientapp installs it."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    install_from_fab(fab.content, skip_prompt=True)
    return get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        run.fab_id, run.fab_version, fab.hash_str)


class Executor:
    """Runs the tasks that a SuperNode's Runtime API hands out, in this process, with the ClientApp
    of one FAB loaded once."""

    def __init__(self, address: str, insecure: bool, certificates: bytes | None, secret: bytes | None = None):
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supernode.runtime import run_clientapp

        self.address, self.insecure, self.certificates, self.secret = address, insecure, certificates, secret
        # The node hands out a task before it has pulled the message's arrays from the SuperLink; an
        # object not there yet is asked for again after 1 s, doubling, in Flower: a flwr-clientapp
        # process takes longer than that to start, this one asks at once. Here after 0.05 s, doubling.
        run_clientapp.pull_and_inflate_object_from_tree = partial(pull_and_inflate_object_from_tree,
                                                                  initial_backoff=0.05, backoff_cap=1.0)
        self.fab_hash: str | None = None
        self.app = None
        self.served = 0

    def acquire(self, client) -> tuple[str, str] | None:
        """(token, FAB hash) of the node's next ClientApp task, or None when it has none."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        return (res.token, res.task.fab_hash) if res.HasField("task") and res.token else None

    def run_task(self, token: str) -> None:
        """Pull the task's message, context, run and FAB; run the ClientApp; push its reply (an error
        reply when it raised) and the task's status. A failure of one task never ends the process."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = _runtime_client(self.address, self.insecure, self.certificates, "flwr-clientapp", token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        times = [time.perf_counter()]  # started, pulled, ran, pushed
        message = context = reply = None
        status, details, what = SubStatus.FAILED, "ClientApp task failed due to unknown reason", "?"
        try:
            message, context, run, fab = pull_task_input(client)
            what = message.metadata.message_type
            times.append(time.perf_counter())
            if self.app is None:
                self.app, self.fab_hash = _load_app(run, fab), fab.hash_str
            reply = self.app(message=message, context=context)
            times.append(time.perf_counter())
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - reported to the server as Flower's own executor does
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            if isinstance(ex, LoadClientAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "An exception was raised when attempting to load `ClientApp`"
            log.error("task %s (%s) failed: %s", self.served + 1, what, ex, exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
                push_task_output(client, context, status, details)
            except Exception as ex:  # noqa: BLE001 - the node expires the task; the next one may go through
                log.error("task %s (%s): its reply could not be pushed to the SuperNode: %s", self.served + 1, what, ex)
            heartbeat.stop()
            client.close()
        self.served += 1
        times.append(time.perf_counter())
        phases = ", ".join(f"{name} {b - a:.2f} s" for name, a, b in zip(("pulled in", "ran", "replied in"), times,
                                                                          times[1:])) if len(times) == 4 else "failed"
        log.info("task %d (%s): %s, in process %d", self.served, what, phases, os.getpid())

    def serve(self, poll: float, first_token: str | None = None) -> None:
        """Ask for tasks every `poll` seconds while there are none; run each as it comes."""
        client = _runtime_client(self.address, self.insecure, self.certificates, "SuperExec", secret=self.secret)
        if first_token is not None:
            self.run_task(first_token)
        down = False
        while True:
            try:
                task = self.acquire(client)
            except Exception as e:  # noqa: BLE001 - the SuperNode restarting, or not up yet: ask again
                if _refused(e):
                    sys.exit(f"fedlora-superexec: error: the SuperNode at {self.address} refused to hand out its "
                             f"tasks (SuperExec authentication failed): give the executor the secret file the node "
                             f"was given (--superexec-auth-secret-file), or none if it was given none")
                if not down:
                    log.warning("the SuperNode's Runtime API at %s does not answer (%s); asking again every %s s",
                                self.address, e, max(poll, 1.0))
                down = True
                time.sleep(max(poll, 1.0))
                continue
            if down:
                log.info("the SuperNode's Runtime API at %s answers again", self.address)
                down = False
            if task is None:
                time.sleep(poll)
                continue
            token, fab_hash = task
            if self.fab_hash is not None and fab_hash != self.fab_hash:
                log.info("a task of another FAB (%s, not %s): starting afresh", fab_hash[:12], self.fab_hash[:12])
                client.close()
                _restart(token)
            self.run_task(token)


def _restart(token: str) -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--first-token")]
    os.execv(sys.executable, [sys.executable, "-m", "fedlora.supernode", *argv, f"--first-token={token}"])


def _check_flower(prog: str) -> None:
    import flwr

    if flwr.__version__ != FLOWER:
        sys.exit(f"{prog}: error: it drives Flower {FLOWER}'s SuperNode and ClientApp runtime, this is Flower "
                 f"{flwr.__version__}: run `flower-supernode` as it is instead")


def executor_main(argv: list[str] | None = None) -> None:
    """`fedlora-superexec`: the executor alone, beside a `flower-supernode --isolation process`."""
    parser = argparse.ArgumentParser(
        prog="fedlora-superexec",
        description="Run a SuperNode's ClientApp tasks in one long-lived process (the SuperNode started with "
                    "`flower-supernode --isolation process`), so that a node keeps its model and data between "
                    "rounds. `fedlora-supernode` starts both.")
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API: its --host and --port (default: 127.0.0.1:9094)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true",
                     help="talk to the Runtime API without TLS (a SuperNode serves it so by default)")
    tls.add_argument("--root-certificates", help="the CA certificate of the Runtime API's TLS (a PEM file)")
    parser.add_argument("--superexec-auth-secret-file",
                        help="the secret the SuperNode was given (its --superexec-auth-secret-file), to sign the "
                             "asks for tasks with")
    parser.add_argument("--poll", type=float, default=0.1,
                        help="seconds between asks while the node has no task (default: 0.1)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process ends")
    parser.add_argument("--first-token", help=argparse.SUPPRESS)  # a task taken over across a restart
    args = parser.parse_args(argv)
    from fedlora.records import setup_logging

    setup_logging()
    _check_flower("fedlora-superexec")
    if not args.insecure and not args.root_certificates:
        parser.error("give --insecure (a Runtime API without TLS, as a SuperNode serves it by default) or "
                     "--root-certificates PEM")
    if not 0.01 <= args.poll <= 60:
        parser.error(f"--poll {args.poll}: give 0.01 to 60 seconds")
    certificates = None
    if args.root_certificates:
        try:
            with open(args.root_certificates, "rb") as f:
                certificates = f.read()
        except OSError as e:
            parser.error(f"--root-certificates: {e}")
    secret = None
    if args.superexec_auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret

        try:
            secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        except ValueError as e:
            parser.error(f"--superexec-auth-secret-file: {e}")
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    log.info("serving the ClientApp tasks of the SuperNode at %s in process %d", args.runtime_api_address,
             os.getpid())
    try:
        Executor(args.runtime_api_address, args.insecure, certificates, secret).serve(args.poll, args.first_token)
    except KeyboardInterrupt:
        pass


def _ends_with(executor: subprocess.Popen, stopping: threading.Event, failed: threading.Event) -> None:
    """Stop this node when its executor ends and the node is not stopping itself (its executor then
    goes with it: Ctrl-C, a SIGTERM to its process group): a node without one would take tasks and
    never answer them."""
    executor.wait()
    if stopping.wait(2.0):
        return
    failed.set()
    print(f"fedlora-supernode: error: its executor ended ({executor.returncode}); stopping the node",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


class _Sleeps:
    """`time` as Flower 1.41's SuperNode loop sees it, with its two fixed waits shortened: 3 s between
    asks of the SuperLink that found no message, 0.5 s between looks for the ClientApp's reply."""

    def __init__(self, pull_interval: float):
        self.pull_interval = pull_interval

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep({3: self.pull_interval, 0.5: 0.05}.get(seconds, seconds))


def main() -> None:
    """`fedlora-supernode [flower-supernode's arguments] [--pull-interval S]`. This process is the SuperNode:
    it imports no more of fedlora than this module (not PyTorch)."""
    prog = "fedlora-supernode"
    ours = argparse.ArgumentParser(prog=prog, add_help=False, allow_abbrev=False)
    ours.add_argument("--pull-interval", type=float, default=1.0)
    ours.add_argument("--isolation")
    args, flower_args = ours.parse_known_args()  # flower-supernode's: all the others
    if args.isolation is not None:
        sys.exit(f"{prog}: error: it runs the SuperNode with --isolation process beside its own executor; "
                 "for Flower's, run `flower-supernode`")
    if not 0.1 <= args.pull_interval <= 60:
        sys.exit(f"{prog}: error: --pull-interval {args.pull_interval}: give 0.1 to 60 seconds")
    _check_flower(prog)
    import flwr.supernode.start_client_internal as supernode
    from flwr.supercore.address import resolve_bind_address
    from flwr.supercore.exit import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    stopping, failed = threading.Event(), threading.Event()  # the node's own stop; its executor's end
    add_exit_handler(stopping.set, run_before_force_exit=True)

    # where the node serves its Runtime API (flower-supernode's defaults) and how, which the executor needs
    api = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", default="9094")
    api.add_argument("--ssl-certfile")
    api.add_argument("--ssl-ca-certfile")
    api.add_argument("--superexec-auth-secret-file")
    node, rest = api.parse_known_args(flower_args)
    if node.ssl_certfile and not node.ssl_ca_certfile:
        sys.exit(f"{prog}: error: --ssl-certfile (the Runtime API's TLS) needs --ssl-ca-certfile, the CA that "
                 "its executor verifies it with")
    if not {"-h", "--help", "-V", "--version"} & set(rest):
        host = f"[{node.host}]" if ":" in node.host else node.host
        how = ["--root-certificates", node.ssl_ca_certfile] if node.ssl_certfile else ["--insecure"]
        if node.superexec_auth_secret_file:
            how += ["--superexec-auth-secret-file", node.superexec_auth_secret_file]
        executor = subprocess.Popen([sys.executable, "-m", "fedlora.supernode", "--runtime-api-address",
                                     resolve_bind_address(f"{host}:{node.port}"), *how, "--parent-pid", str(os.getpid())])
        threading.Thread(target=_ends_with, args=(executor, stopping, failed), daemon=True).start()
    else:
        print(f"{prog}: flower-supernode's arguments (but --isolation), and --pull-interval S: seconds between "
              "asks of the SuperLink while the node has no message (default: 1; Flower's: 3)\n")
    supernode.time = _Sleeps(args.pull_interval)
    sys.argv = ["flower-supernode", *flower_args, "--isolation", "process"]
    try:
        flower_supernode()
    finally:
        if failed.is_set():  # stopped for it: Flower's exit on SIGTERM says success
            sys.exit(1)


if __name__ == "__main__":
    executor_main()
