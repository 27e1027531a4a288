"""The fedlora ServerApp: the same code under the simulation launcher and under `flwr run`.

Its run config carries either `fedlora-config` (a resolved config as JSON, what `fedlora-sim` passes)
or `config-name` and `overrides` (Hydra overrides as on fedlora-sim's command line, composed here on
`conf/<config-name>.yaml`: what `flwr run` passes, see [tool.flwr.app.config] in pyproject.toml), and
`run-dir`, where the records go (empty: outputs/flwr/<date>/<time>-run<id> in the working directory).
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedlora.config import compose, from_json, resolve, to_json
from fedlora.data import DATASETS
from fedlora.errors import FedloraError, RunInterrupted
from fedlora.ledger import Ledger
from fedlora.partition import class_histogram
from fedlora.paths import absolute
from fedlora.hf import export_adapted
from fedlora.records import RunRecorder, human_bytes, setup_logging
from fedlora.seeds import derive_seed
from fedlora.task import compression, federated_data, initial_model, model_to_arrays, test_tensors
from fedlora.training import evaluate, pick_device
from strategies import STRATEGIES
from strategies.validation import node_of_reply

log = logging.getLogger("fedlora")

app = ServerApp()

# Set by a launcher that runs this ServerApp in a thread (the simulation), where Ctrl-C cannot reach it.
stop_requested = threading.Event()


class StoppableGrid:
    """A Grid whose send_and_receive gives up as soon as `stop_requested` is set, instead of waiting
    out the round timeout for replies that will never come."""

    def __init__(self, grid: Grid):
        self._grid = grid
        # Poll as often as the wrapped grid does (Flower's in-memory grid: 0.1 s; its HTTP grid: 3 s).
        self._poll = getattr(grid, "pull_interval", 3.0)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        waiting = set(self._grid.push_messages(messages))
        deadline = time.time() + timeout if timeout is not None else float("inf")
        replies: list[Message] = []
        while waiting and time.time() < deadline:
            if stop_requested.is_set():
                raise RunInterrupted("stopped by the user")
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                time.sleep(self._poll)
        return replies


def config_from_run_config(run_config) -> DictConfig:
    if "fedlora-config" in run_config:
        return from_json(str(run_config["fedlora-config"]))
    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
    except ValueError as e:
        raise FedloraError(f"run config 'overrides' cannot be split into Hydra overrides: {e}") from e
    return resolve(compose(overrides, str(run_config.get("config-name") or "config")))


def run_dir_of(context: Context) -> Path:
    given = str(context.run_config.get("run-dir") or "")
    if given:
        return Path(absolute(given, "run-dir"))
    now = time.localtime()
    return Path("outputs", "flwr", time.strftime("%Y-%m-%d", now),
                f"{time.strftime('%H-%M-%S', now)}-run{context.run_id}").resolve()


def discover_partitions(grid: Grid, cfg: DictConfig, timeout: float) -> tuple[dict[int, int], dict[int, int]]:
    """Ask every connected node for its partition id: sampling is done over partition ids, so that it
    does not depend on the node ids that a run happens to assign. Returns {partition id: node id} and,
    for the nodes that train on their own data, {partition id: their number of examples}."""
    nodes = list(grid.get_node_ids())
    config = ConfigRecord({"fedlora.config": to_json(cfg)})
    queries = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    node_of_partition: dict[int, int] = {}
    own_examples: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = node_of_reply(reply, queries)
        if reply.has_error():
            log.warning("node %d did not say its partition: %s", node, reply.error.reason)
            continue
        info = reply.content["info"]
        pid = int(info["partition-id"])
        if "num-partitions" in info and int(info["num-partitions"]) != cfg.num_clients:
            raise FedloraError(f"node {node} was started with num-partitions={info['num-partitions']}, the run has "
                               f"num_clients={cfg.num_clients}: they must agree")
        if not 0 <= pid < cfg.num_clients:
            raise FedloraError(f"node {node} holds partition {pid}, outside 0..{cfg.num_clients - 1}: "
                               "num_clients must match the nodes' num-partitions")
        if pid in node_of_partition:
            raise FedloraError(f"two nodes ({node_of_partition[pid]}, {node}) hold partition {pid}")
        node_of_partition[pid] = node
        if "num-examples" in info:
            if int(info["num-examples"]) < 1:
                raise FedloraError(f"node {node} (partition {pid}) has no examples in its local-data")
            own_examples[pid] = int(info["num-examples"])
    if len(node_of_partition) < cfg.clients_per_round:
        raise FedloraError(f"only {len(node_of_partition)} nodes answered; clients_per_round is "
                           f"{cfg.clients_per_round}")
    if len(node_of_partition) < cfg.num_clients:
        missing = sorted(set(range(cfg.num_clients)) - set(node_of_partition))
        log.warning("%d of %d partitions have a node; rounds sample among those only (missing: %s). A node that "
                    "joins later is not used in this run.", len(node_of_partition), cfg.num_clients, missing)
    if own_examples:
        log.info("%d nodes answered; partitions %s train on their own data", len(node_of_partition), sorted(own_examples))
    return node_of_partition, own_examples


def run(grid: Grid, cfg: DictConfig, recorder: RunRecorder) -> None:
    train, _, parts = federated_data(cfg)
    node_of_partition, own_examples = discover_partitions(grid, cfg, cfg.simulation.round_timeout)
    recorder.write_partitions(class_histogram(train.labels, parts, DATASETS[cfg.dataset.name].num_classes),
                              own_examples)
    model, device = initial_model(cfg), pick_device()
    x_test, y_test = test_tensors(cfg)
    timeout = cfg.simulation.round_timeout
    ledger = recorder.ledger
    ratio = compression(cfg)
    if ratio is not None:
        recorder.extra["compression"] = ratio
        log.info("%s at ratio %g: each client sends %s, %.4f of the dense model's %s; layers %s",
                 ratio["factorization"], ratio["target"], human_bytes(ratio["uplink_bytes_per_client"]),
                 ratio["achieved"], human_bytes(ratio["dense_bytes_per_client"]), ratio["layers"])
        if not ratio["within_5_percent"]:
            log.warning("compression ratio %.4f is not within 5%% of the target %g: %s", ratio["achieved"],
                        ratio["target"], ratio["note"])
    strategy = STRATEGIES[cfg.method.strategy](cfg, node_of_partition, ledger,
                                           examples_of_partition={i: len(p) for i, p in enumerate(parts)} | own_examples)

    def evaluate_fn(server_round: int, arrays) -> MetricRecord:
        acc, loss = evaluate(strategy.load_global(model, arrays), x_test, y_test, cfg.eval.batch_size, device)
        if server_round == 0:
            recorder.record_initial(acc, loss)
            log.info("round 0/%d | acc %.4f | loss %.4f (initial model)", cfg.num_rounds, acc, loss)
        else:
            stats = strategy.round_stats[server_round]
            recorder.record_round({
                "round": server_round,
                "test_accuracy": acc,
                "test_loss": loss,
                "train_loss": stats["train_loss"],
                "num_clients": stats["num_clients"],
                "rejected": stats["rejected"],
                "bytes_up": ledger.up,
                "bytes_down": ledger.down,
                "cum_bytes_up": ledger.total_up,
                "cum_bytes_down": ledger.total_down,
                "round_seconds": round(time.time() - stats["started"], 3),
            })
        return MetricRecord({"accuracy": acc, "loss": loss})

    result = strategy.start(grid, model_to_arrays(model), num_rounds=cfg.num_rounds, timeout=timeout,
                            evaluate_fn=evaluate_fn)
    if cfg.adapter is not None:  # the fine-tuned global model, loadable without fedlora
        out = export_adapted(strategy.load_global(initial_model(cfg), result.arrays), recorder.dir / "adapter", cfg,
                             DATASETS[cfg.dataset.name].num_classes, derive_seed(cfg.seed, "model-init"))
        log.info("global model saved in %s", out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    setup_logging()
    try:
        cfg = config_from_run_config(context.run_config)
    except FedloraError as e:  # a user's mistake in the run config: say it plainly in the run's log
        log.error("fedlora: error: %s", e)
        raise
    setup_logging(cfg.verbose)
    run_dir = run_dir_of(context)
    recorder = RunRecorder(run_dir, cfg, Ledger())
    log.info("records in %s", run_dir)
    try:
        run(StoppableGrid(grid), cfg, recorder)
    except BaseException as e:
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, RunInterrupted)) else "failed"
        recorder.close(status, f"{type(e).__name__}: {e}")
        raise
    summary = recorder.close("completed")
    log.info("done: final accuracy %.4f, best %.4f; records in %s", summary["final_accuracy"],
             summary["best_accuracy"], run_dir)
