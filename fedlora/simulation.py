"""Launch a run as a Flower simulation: the fedlora ServerApp and ClientApp on Ray virtual clients."""

from __future__ import annotations

import json
import os
import signal
import threading
import warnings
from pathlib import Path

from omegaconf import DictConfig

from fedlora.config import to_json
from fedlora.errors import ConfigError, RunInterrupted

# Offline by default: no telemetry, no update check, no installing of app dependencies at run time.
# Exported values win.
FLOWER_OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def _deliver_pending(state, queue, nodes_mapping, f_stop) -> None:
    """Flower 1.41's simulation loop that hands the virtual clients their messages
    (`vce_api.add_messages_to_queue`), made to cost the messages waiting rather than the nodes
    times the messages, and to keep the server's order. Every 0.1 s Flower asked the link state for
    one undelivered message of each node in turn, and each ask walked every stored message with
    its expiry check: with 10,000 virtual clients that kept a driver core busy through every round
    (rounds 20% longer than with 100, and the start two minutes longer: benchmarks/README.md). This
    walks the stored messages once per 0.1 s, with the same expiry check, and queues the same
    messages (at most one per node per pass), in the order the server pushed them rather than by
    node: the strategy sends a round's largest clients first (`MethodStrategy._train_messages`)."""
    from flwr.supercore.date import now

    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        with state.lock:
            ids = list(state.message_ins_store)
            state._check_stored_messages(set(ids))  # expired messages dropped, as each ask did
            taken: dict[int, object] = {}  # node -> its first undelivered message, in the order stored
            for msg_id in ids:
                msg = state.message_ins_store.get(msg_id)
                if (msg is not None and msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes
                        and msg.metadata.dst_node_id not in taken):
                    taken[msg.metadata.dst_node_id] = msg
            delivered_at = now().isoformat()
            for msg in taken.values():
                msg.metadata.delivered_at = delivered_at
        for msg in taken.values():
            queue.put(msg)
        f_stop.wait(0.1)


def _use_scalable_delivery() -> None:
    """Put `_deliver_pending` in place of Flower's loop, where the simulation's link state is the
    in-memory one it was written for (Flower 1.41); otherwise Flower's own loop stays."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState

    if flwr.__version__ != "1.41.0":  # the loop it replaces, and the state's internals it reads, are 1.41's
        return
    original = getattr(vce_api, "_flower_add_messages_to_queue", vce_api.add_messages_to_queue)
    vce_api._flower_add_messages_to_queue = original

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        if type(state) is InMemoryLinkState and hasattr(state, "message_ins_store"):
            return _deliver_pending(state, queue, nodes_mapping, f_stop)
        return original(state, queue, nodes_mapping, f_stop)

    vce_api.add_messages_to_queue = add_messages_to_queue


# What a finished simulation leaves to the next one in this process (a Hydra sweep's next job, or the
# next run of a test session): the Ray connection and, for KEEP_ACTORS_S seconds, the idle client
# actors, each of which imported PyTorch, Flower and fedlora, read its data and built its models
# when it started (a short run took 11 s with new actors, 3.5 s with kept ones, on 2 cores:
# benchmarks/README.md, sweep_runs.py). Idle actors hold their CPUs, so they are not kept longer from
# other jobs on the cluster. An actor holds no run's state: a message's Context carries its node
# state, and what the process caches is keyed by the run's config, as under fedlora-supernode, whose
# one executor serves every run too.
KEEP_ACTORS_S = 10.0
_KEPT: dict = {"init_args": None, "resources": None, "actors": [], "timer": None}
_kept_lock = threading.Lock()


def _take_kept() -> list:
    """The kept actors, now no longer kept (their expiry cancelled)."""
    with _kept_lock:
        if _KEPT["timer"] is not None:
            _KEPT["timer"].cancel()
        actors, _KEPT["actors"], _KEPT["timer"] = _KEPT["actors"], [], None
    return actors


def _kill(actors) -> None:
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # gone already, or with the Ray connection it belonged to
            pass


def end_kept_actors() -> None:
    """End the idle actors kept for the next simulation of this process now (they hold their CPUs),
    for a job of another process on the same Ray cluster."""
    _kill(_take_kept())


def release_ray() -> None:
    """End the actors kept between simulations and this process's Ray connection."""
    import ray

    end_kept_actors()
    _KEPT.update(init_args=None, resources=None)
    if ray.is_initialized():
        ray.shutdown()


def _alive(actors: list) -> list:
    """The actors among `actors` that still answer (one that died since is dropped)."""
    import ray

    asked = [(actor, actor.__ray_ready__.remote()) for actor in actors]  # all at once, answered in parallel
    alive = []
    for actor, answer in asked:
        try:
            ray.get(answer, timeout=30)
            alive.append(actor)
        except Exception:  # a dead or hung actor: the pool makes a new one in its place
            _kill([actor])
    return alive


def _use_kept_actors() -> None:
    """Put a Ray backend that keeps its idle actors and its Ray connection for the next simulation
    in place of Flower 1.41's, which ends both after every run (`RayBackend.terminate`). An actor
    still busy when the run ends (a straggler the server stopped waiting for) is ended, as Flower
    ends them all."""
    import flwr
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    if flwr.__version__ != "1.41.0":  # the pool's internals it reads are 1.41's
        return
    flower = getattr(raybackend, "_flower_RayBackend", raybackend.RayBackend)
    raybackend._flower_RayBackend = flower

    class KeptActorsBackend(flower):
        def init_ray(self, backend_config) -> None:
            args = json.dumps(backend_config.get(self.init_args_key) or {}, sort_keys=True)
            if ray.is_initialized() and _KEPT["init_args"] not in (None, args):
                release_ray()  # another address, CPU count or log level: a new connection
            super().init_ray(backend_config)
            _KEPT["init_args"] = args

        def build(self, app_fn) -> None:
            resources = json.dumps(self.client_resources, sort_keys=True)
            kept = _take_kept()
            if resources != _KEPT["resources"]:  # actors placed for other client resources
                _kill(kept)
                kept = []
            _KEPT["resources"] = resources
            self.pool = BasicActorPool(actor_type=ClientAppActor, client_resources=self.client_resources,
                                       actor_kwargs=self.actor_kwargs)
            kept = _alive(kept)
            _kill(kept[self.pool.actors_capacity:])  # the cluster shrank since
            kept = kept[:self.pool.actors_capacity]
            self.pool.pool.extend(kept)
            self.pool.num_actors += len(kept)
            self.pool.add_actors_to_pool(self.pool.actors_capacity - len(kept))
            self.app_fn = app_fn

        def terminate(self) -> None:
            if self.pool is not None:
                _kill(self.pool._future_to_actor.values())
                with _kept_lock:
                    _KEPT["actors"] = list(self.pool.pool)
                    _KEPT["timer"] = threading.Timer(KEEP_ACTORS_S, end_kept_actors)
                    _KEPT["timer"].daemon = True
                    _KEPT["timer"].start()
                self.pool = None

    raybackend.RayBackend = KeptActorsBackend


def backend_config(cfg: DictConfig) -> dict:
    import torch

    sim = cfg.simulation
    num_gpus = sim.client_resources.num_gpus
    if num_gpus == "auto":
        # Five clients share a GPU when there is one; none is asked for otherwise.
        num_gpus = 0.2 if torch.cuda.is_available() else 0.0
    elif num_gpus > 0 and not sim.ray_address and not torch.cuda.is_available():
        # a local Ray instance would have no GPU to give: Flower's runtime would only say that it crashed
        raise ConfigError(f"simulation.client_resources.num_gpus={num_gpus} asks a share of a GPU for each client, "
                          "but PyTorch sees no GPU on this machine: set num_gpus=0 (or auto), or install PyTorch's "
                          "CUDA build; for GPUs on the workers of a Ray cluster, give simulation.ray_address")
    init_args: dict = {"logging_level": "DEBUG" if cfg.verbose else "ERROR", "log_to_driver": bool(cfg.verbose)}
    # "local" starts a new Ray instance even when a cluster started with `ray start` runs here.
    init_args["address"] = sim.ray_address or "local"
    if not sim.ray_address and sim.ray_num_cpus:
        init_args["num_cpus"] = int(sim.ray_num_cpus)
    return {
        "client_resources": {"num_cpus": float(sim.client_resources.num_cpus), "num_gpus": float(num_gpus)},
        "init_args": init_args,
    }


def run_simulation(cfg: DictConfig, run_dir: str | Path) -> None:
    """Run the config's federation with Ray virtual clients, writing the records into run_dir."""
    for key, value in FLOWER_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    # Ray's notice about a future change of its GPU masking: fedlora relies on today's behaviour
    # (a client given no GPU sees none), which the notice does not change for now.
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
    from flwr.app import Context, RecordDict
    # Flower 1.41's public run_simulation() takes no run config; this private entry point, which it
    # wraps, takes the ServerApp's Context, so the config reaches the ServerApp as under `flwr run`.
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from clients.client_app import app as client_app
    from fedlora.records import setup_logging
    from strategies.server_app import app as server_app
    from strategies.server_app import server_finished, stop_requested

    setup_logging(cfg.verbose)  # again: importing Flower set its own log level
    _use_scalable_delivery()
    _use_kept_actors()

    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"fedlora-config": to_json(cfg), "run-dir": str(Path(run_dir).resolve())})
    stop_requested.clear()
    server_finished.clear()
    # Flower waits for the ServerApp thread before it lets a KeyboardInterrupt through, so a first
    # Ctrl-C (or SIGTERM) asks the ServerApp to stop after closing its records and writing a
    # checkpoint; a second one interrupts at once.
    restore = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, frame):
            print(f"\nstopping after closing the records ({signal.Signals(signum).name} again to kill)", flush=True)
            stop_requested.set()
            signal.signal(signum, restore[signum])

        restore = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            _run_simulation(
                num_supernodes=cfg.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name=cfg.simulation.backend,
                backend_config=backend_config(cfg),
                server_app_context=context,
                verbose_logging=bool(cfg.verbose),
            )
        except SystemExit as e:
            # Ray's driver answers SIGTERM with sys.exit(SIGTERM), in this thread: stop the ServerApp as
            # Ctrl-C does, let it close its records and write its checkpoint, and say it was interrupted.
            if e.code != signal.SIGTERM:
                raise
            stop_requested.set()
            server_finished.wait(timeout=60)
            raise RunInterrupted("stopped by SIGTERM") from None
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
