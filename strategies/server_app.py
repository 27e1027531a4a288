"""The fedlora ServerApp: the same code under the simulation launcher and under `flwr run`.

Its run config carries either `fedlora-config` (a resolved config as JSON, what `fedlora-sim` passes)
or `config-name` and `overrides` (Hydra overrides as on fedlora-sim's command line, composed here on
`conf/<config-name>.yaml`: what `flwr run` passes, see [tool.flwr.app.config] in pyproject.toml), and
`run-dir`, where the records go (empty: outputs/flwr/<date>/<time>-run<id> in the working directory).
"""

from __future__ import annotations

import copy
import logging
import math
import shlex
import signal
import threading
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from omegaconf import DictConfig

from fedlora.checkpoint import CHECKPOINT_DIR, Checkpoint, Checkpointer, read_checkpoint, resumed_config
from fedlora.config import compose, from_json, resolve, to_json
from fedlora.data import dataset_info
from fedlora.dp import CentralLedger, PrivacyLedger
from fedlora.dp import client_side as dp_client_side
from fedlora.dp import enabled as dp_enabled
from fedlora.errors import FedloraError, RunInterrupted
from fedlora.federated_data import federated_data, test_tensors, train_count
from fedlora.hf import export_adapted
from fedlora.ledger import Ledger
from fedlora.methods import Method, make_method
from fedlora.partition import class_histogram
from fedlora.paths import absolute
from fedlora.preflight import preflight
from fedlora.protocol import CONFIG, RANK
from fedlora.records import RunRecorder, human_bytes, setup_logging
from fedlora.seeds import derive_seed
from fedlora.training import evaluate, pick_device
from strategies.central_dp import ServerSideFixedClipping
from strategies.grid import MeteredGrid
from strategies.strategy import MethodStrategy
from strategies.validation import node_of_reply

log = logging.getLogger("fedlora")

app = ServerApp()

# Set by a launcher that runs this ServerApp in a thread (the simulation), where Ctrl-C cannot reach it;
# and set by the ServerApp once its records are closed, for a launcher that must wait for that.
stop_requested, server_finished = threading.Event(), threading.Event()


def config_from_run_config(run_config) -> DictConfig:
    """The run's config: from fedlora-sim, resolved (and resumed) already; under `flwr run`, composed
    from the overrides, where `resume=RUN_DIR` among them gives that run's own config
    (`fedlora.checkpoint.resumed_config`)."""
    if "fedlora-config" in run_config:
        return from_json(str(run_config["fedlora-config"]))
    try:
        overrides = shlex.split(str(run_config.get("overrides", "")))
    except ValueError as e:
        raise FedloraError(f"run config 'overrides' cannot be split into Hydra overrides: {e}") from e
    cfg = resolve(compose(overrides, str(run_config.get("config-name") or "config")))
    return resumed_config(cfg.resume, overrides)[0] if cfg.resume is not None else cfg


def _interrupt(signum, frame):
    raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name}")


def run_dir_of(context: Context) -> Path:
    given = str(context.run_config.get("run-dir") or "")
    if given:
        return Path(absolute(given, "run-dir"))
    now = time.localtime()
    return Path("outputs", "flwr", time.strftime("%Y-%m-%d", now),
                f"{time.strftime('%H-%M-%S', now)}-run{context.run_id}").resolve()


def discover_partitions(grid: Grid, cfg: DictConfig,
                        timeout: float) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Ask every connected node for its partition id (sampling is done over partition ids, so that it
    does not depend on the node ids that a run happens to assign), giving it the run's config, which
    it keeps for the run. Returns {partition id: node id}, for the nodes that train on their own
    data {partition id: their number of examples}, and for the nodes that set their own adapter rank
    {partition id: rank}."""
    nodes = list(grid.get_node_ids())
    config = ConfigRecord({CONFIG: to_json(cfg)})
    queries = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    node_of_partition: dict[int, int] = {}
    own_examples: dict[int, int] = {}
    node_ranks: dict[int, int] = {}
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
        if RANK in info:
            if not (cfg.adapter is not None and cfg.adapter.get("ranks")):
                raise FedloraError(f"node {node} (partition {pid}) was started with rank={info[RANK]}, but the run gives "
                                   "clients no ranks of their own: set adapter.ranks (with a method that takes them)")
            if not 1 <= int(info[RANK]) <= cfg.adapter.r:
                raise FedloraError(f"node {node} (partition {pid}) has rank={info[RANK]}: it must be between 1 and "
                                   f"adapter.r={cfg.adapter.r}")
            node_ranks[pid] = int(info[RANK])
    if len(node_of_partition) < cfg.clients_per_round:
        raise FedloraError(f"only {len(node_of_partition)} nodes answered; clients_per_round is "
                           f"{cfg.clients_per_round}")
    if len(node_of_partition) < cfg.num_clients:
        missing = sorted(set(range(cfg.num_clients)) - set(node_of_partition))
        log.warning("%d of %d partitions have a node; rounds sample among those only (missing: %s). A node that "
                    "joins later is not used in this run.", len(node_of_partition), cfg.num_clients, missing)
    if own_examples:
        log.info("%d nodes answered; partitions %s train on their own data", len(node_of_partition), sorted(own_examples))
    return node_of_partition, own_examples, node_ranks


def log_compression(facts: dict) -> None:
    log.info("%s at ratio %g: each client sends %s, %.4f of the dense model's %s; layers %s", facts["factorization"],
             facts["target"], human_bytes(facts["uplink_bytes_per_client"]), facts["achieved"],
             human_bytes(facts["dense_bytes_per_client"]), facts["layers"])
    if not facts["within_5_percent"]:
        log.warning("compression ratio %.4f is not within 5%% of the target %g: %s", facts["achieved"],
                    facts["target"], facts["note"])


class GlobalEvaluation:
    """The server-side evaluation of the global model on the whole test set, in a model of its own
    that is rebuilt from the global arrays as a client would (what the method draws from the seeds,
    then the arrays)."""

    def __init__(self, cfg: DictConfig, method: Method):
        self.method, self.cfg = method, cfg
        self.model = method.initial_model()
        self.test = test_tensors(cfg)  # None: the server has no test data (data.on_nodes, eval.clients)
        self.device = pick_device()
        if cfg.eval.get("generate"):  # the token that ends an answer
            from fedlora.causal import end_token

            self.end = end_token(cfg)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.method.load(self.model, arrays, server_round, required=self.method.global_keys(self.model))
        if self.test is None:  # the clients' evaluation is the run's only one
            return MetricRecord({"accuracy": math.nan, "loss": math.nan})
        x, y = self.test
        acc, loss = evaluate(self.model, x, y, self.cfg.eval.batch_size, self.device)
        scores = MetricRecord({"accuracy": acc, "loss": loss})
        if self.cfg.eval.get("generate"):  # a causal LM's answers, generated
            from fedlora.causal import exact_match

            share, _ = exact_match(self.model, x, self.end, self.cfg.eval.max_new_tokens,
                                   self.cfg.eval.generate_examples)
            scores["exact_match"] = share
        return scores


def with_class_names(cfg: DictConfig) -> DictConfig:
    """The run's config with its class names in dataset.labels (dataset=hf classification), as the
    server read them: a node with its own data maps its labels to the run's class ids by them."""
    if cfg.dataset.name != "hf" or cfg.model.get("task") == "causal_lm" or cfg.dataset.get("labels") is not None:
        return cfg
    from fedlora.own_data import read_own

    sent = copy.deepcopy(cfg)
    sent.dataset.labels = list(read_own(cfg).label_names)
    return sent


def start_afresh(cfg: DictConfig, method: Method, model, strategy: MethodStrategy, grid: MeteredGrid,
                 after: int, recorder: RunRecorder) -> None:
    """What a resume after round `after` does about the state that lived on the nodes, which a new
    run's nodes do not hold: replicas of the global model are rebuilt from the checkpoint (every
    client is sent the global state once); what a method sends once is sent again to each client
    when it is next sampled; what clients kept for themselves is lost, and the records say so.
    Called as the first resumed round starts: what it sends counts in that round's bytes."""
    notes = []
    if method.broadcasts:
        acked = strategy.aggregate_broadcast(after, grid.send_and_receive(strategy.configure_broadcast(after, full=True),
                                                                          timeout=cfg.simulation.round_timeout))
        notes.append(f"the replicas of the global model were rebuilt from the checkpoint on {acked} clients")
    if method.fixed_keys(model):
        notes.append("what the method sends once is sent again to each client when it is next sampled")
    if method.personal_keys(model):
        kept = ", ".join(sorted({k.rpartition(".")[2] for k in method.personal_keys(model)}))
        notes.append(f"the {len(strategy.node_of_partition)} clients' own {kept} lived on the nodes and were lost: every "
                     "client starts again from its initial value")
        log.warning("resumed: %s", notes[-1])
    recorder.extra.setdefault("resumed", []).append({"after_round": after, "notes": notes})


def round_times(started: float, trained: float, aggregated: float, evaluating: float, evaluated: float,
                train: MetricRecord) -> dict[str, float]:
    """Where a round's time went: the wait for the clients' training replies, the aggregation, the
    server's evaluation, and the clients' own time on their messages (the slowest one's, and the sum):
    the wait beyond the slowest client is what the messages and the scheduling of clients cost."""
    times = {"train_seconds": trained - started, "aggregate_seconds": aggregated - trained,
             "eval_seconds": evaluated - evaluating}
    if "client-seconds-max" in train:
        times |= {"slowest_client_seconds": train["client-seconds-max"], "all_clients_seconds": train["client-seconds-sum"]}
    return {k: round(float(v), 3) for k, v in times.items()}


def run(grid: MeteredGrid, cfg: DictConfig, recorder: RunRecorder, checkpointer: Checkpointer | None = None,
        resumed: Checkpoint | None = None) -> Result:
    """The rounds of a run, as Flower's Strategy.start runs them, with the broadcast of a method whose
    clients keep replicas; each round's figures go into the records as the round ends, and its
    checkpoint to `checkpointer` when there is one. A `resumed` run goes on after its checkpoint's round."""
    method = make_method(cfg)
    model = method.initial_model()  # the server's copy of the global model
    sent = with_class_names(cfg)  # the config the clients get: a node's own data is read with its classes
    # the nodes answer once they are up: under a short round_timeout too, give them time to start
    node_of_partition, own_examples, node_ranks = discover_partitions(grid, sent, max(cfg.simulation.round_timeout, 120))
    if cfg.data.get("on_nodes"):  # no training data here: each node's own size, and no class counts
        without = sorted(set(node_of_partition) - set(own_examples))
        if without:
            log.warning("data.on_nodes=true: the nodes of partitions %s have no local-data in their node config, and "
                        "the server holds no training data to give them a share of: they take no part", without)
            node_of_partition = {p: n for p, n in node_of_partition.items() if p in own_examples}
        if len(node_of_partition) < cfg.clients_per_round:
            raise FedloraError(f"data.on_nodes=true: {len(node_of_partition)} nodes have their own local-data; "
                               f"clients_per_round is {cfg.clients_per_round}")
        histogram, sizes = [[] for _ in range(cfg.num_clients)], own_examples
    else:
        train_split, _, parts = federated_data(cfg)
        histogram = class_histogram(train_split.labels, parts, dataset_info(cfg).num_classes)
        sizes = {i: train_count(cfg, i, len(p)) for i, p in enumerate(parts)} | own_examples
    recorder.write_partitions(histogram, own_examples)
    if sent.dataset.get("labels") is not None:  # what each class id stands for
        recorder.extra["labels"] = list(sent.dataset.labels)
    facts = method.describe(model) if resumed is None else None  # a resumed run's summary has them
    if facts is not None:
        recorder.extra["compression"] = facts
        log_compression(facts)
    strategy = MethodStrategy(method, model, node_of_partition, cfg.clients_per_round, cfg.seed,
                              examples_of_partition=sizes, config_json=to_json(sent), node_ranks=node_ranks,
                              evaluate_clients=cfg.eval.clients, min_replies=cfg.min_replies,
                              faults=dict(cfg.simulation.faults))
    strategy.clients = {int(pid): counts for pid, counts in recorder.extra.get("client_replies", {}).items()}
    privacy = central = None
    if dp_client_side(cfg):
        privacy = PrivacyLedger(cfg, recorder.extra.setdefault("dp", {}))
    elif dp_enabled(cfg):  # central DP: a wrapper around the strategy, as Flower's
        central = CentralLedger(cfg, recorder.extra.setdefault("dp", {}))
        strategy = ServerSideFixedClipping(strategy, central.record["noise_multiplier"], cfg.dp.max_grad_norm, cfg.seed)
    evaluate_global = GlobalEvaluation(cfg, method)
    timeout, ledger, result = cfg.simulation.round_timeout, grid.ledger, Result()
    log.info("%s: %d clients, %d per round, %d rounds", method.name, cfg.num_clients, cfg.clients_per_round,
             cfg.num_rounds)

    if resumed is not None:
        first = resumed.round + 1
        method.load(model, resumed.arrays, resumed.round, required=method.global_keys(model))
        arrays = result.arrays = strategy.global_arrays()
        log.info("resumed after round %d of %d from %s", resumed.round, cfg.num_rounds, recorder.dir / CHECKPOINT_DIR)
    else:
        first = 1
        if method.initialises:  # before the initial model is evaluated: it is the initialised one
            ledger.start_round()  # its bytes count in the totals (cum_bytes_*) from round 1 on
            got = strategy.aggregate_init(grid.send_and_receive(strategy.configure_init(), timeout=timeout))
            recorder.extra["initialisation"] = {"clients": got, "bytes_up": ledger.up, "bytes_down": ledger.down}
            log.info("%s initialised from %d clients' data: %s up", method.name, got, human_bytes(ledger.up))
        arrays = result.arrays = strategy.global_arrays()
        initial = result.evaluate_metrics_serverapp[0] = evaluate_global(0, arrays)
        recorder.record_initial(initial["accuracy"], initial["loss"])
        log.info("round 0/%d | acc %.4f | loss %.4f (initial model)", cfg.num_rounds, initial["accuracy"],
                 initial["loss"])
    for rnd in range(first, cfg.num_rounds + 1):
        ledger.start_round()
        started = time.time()
        if resumed is not None and rnd == first:  # what it sends counts in this round's bytes
            start_afresh(cfg, method, model, strategy, grid, resumed.round, recorder)
        valid = strategy.accept(rnd, grid.send_and_receive(strategy.configure_train(rnd, arrays, ConfigRecord(), grid),
                                                           timeout=timeout))
        if valid < cfg.min_replies and cfg.too_few == "retry":
            retry = strategy.configure_retry(rnd)
            log.warning("round %d: %d valid replies, fewer than min_replies=%d: asking %d more clients", rnd, valid,
                        cfg.min_replies, len(retry))
            strategy.accept(rnd, grid.send_and_receive(retry, timeout=timeout))
        trained = time.time()
        arrays, train = strategy.finish_train(rnd)
        aggregated = time.time()
        dp_figures = {}
        if privacy is not None:
            dp_figures["dp_epsilon"] = privacy.trained({p: strategy.examples_of_partition[p] for p in strategy.trained})
        if central is not None:
            dp_figures["dp_epsilon"] = central.released(int(train["dp-released"]))
            if "dp-clipped" in train:
                dp_figures["dp_clipped"] = train["dp-clipped"]
        recorder.extra["client_replies"] = {str(pid): c for pid, c in sorted(strategy.clients.items()) if pid >= 0}
        if strategy.never_accepted():
            recorder.extra["clients_never_accepted"] = sorted(strategy.never_accepted())
        if method.broadcasts and rnd < cfg.num_rounds:  # after the last round there is no next one to prepare
            strategy.aggregate_broadcast(rnd, grid.send_and_receive(strategy.configure_broadcast(rnd), timeout=timeout))
        evaluating = time.time()
        scores = evaluate_global(rnd, arrays)
        figures = method.round_figures()  # what the method measures of its own aggregation
        row = figures | round_times(started, trained, aggregated, evaluating, time.time(), train)
        if cfg.model.get("task") == "causal_lm":  # accuracy is per target token there; perplexity beside it
            row["test_perplexity"] = math.exp(min(scores["loss"], 700.0))
            if "exact_match" in scores:
                row["test_exact_match"] = scores["exact_match"]
        logged = figures | {k: row[k] for k in ("test_perplexity", "test_exact_match") if k in row}
        if logged:
            log.info("round %d: %s", rnd, ", ".join(f"{k} {v:.4g}" for k, v in logged.items()))
        if cfg.eval.clients:  # its messages counted apart: evaluation is not what the method costs
            evaluation = Ledger()
            replies = grid.send_and_receive(strategy.configure_evaluate(rnd, arrays, ConfigRecord(), grid),
                                            timeout=timeout, ledger=evaluation)
            clients = strategy.aggregate_evaluate(rnd, replies)
            if clients is not None:
                result.evaluate_metrics_clientapp[rnd] = clients
                row |= dict(clients) | {"eval_bytes_down": evaluation.down, "eval_bytes_up": evaluation.up}
        result.arrays = arrays
        result.train_metrics_clientapp[rnd], result.evaluate_metrics_serverapp[rnd] = train, scores
        recorder.record_round({
            "round": rnd,
            "test_accuracy": scores["accuracy"],
            "test_loss": scores["loss"],
            "train_loss": train["train_loss"],
            "num_clients": train["num-clients"],
            "rejected": train["rejected"],
            "failed": train["failed"],
            "timed_out": train["timed-out"],
            "bytes_up": ledger.up,
            "bytes_down": ledger.down,
            "cum_bytes_up": ledger.total_up,
            "cum_bytes_down": ledger.total_down,
            "round_seconds": round(time.time() - started, 3),
        } | dp_figures | row)
        if checkpointer is not None:  # built only when written
            checkpointer.after_round(rnd, recorder.checkpoint(rnd, arrays),
                                     time.time() - started, last=rnd == cfg.num_rounds)
    if cfg.adapter is not None:  # the fine-tuned global model (as last evaluated), loadable without fedlora
        out = export_adapted(evaluate_global.model, recorder.dir / "adapter", cfg,
                             dataset_info(cfg).num_classes, derive_seed(cfg.seed, "model-init"))
        log.info("global model saved in %s", out)
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    server_finished.clear()
    try:
        _main(grid, context)
    finally:
        server_finished.set()


def _main(grid: Grid, context: Context) -> None:
    setup_logging()
    if threading.current_thread() is threading.main_thread():  # under flwr run: SIGTERM stops as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        cfg = config_from_run_config(context.run_config)
        resumed = read_checkpoint(cfg.resume) if cfg.resume is not None else None
        preflight(cfg)
    except FedloraError as e:  # a user's mistake in the run config: say it plainly in the run's log
        log.error("fedlora: error: %s", e)
        raise
    setup_logging(cfg.verbose)
    run_dir = Path(cfg.resume) if cfg.resume is not None else run_dir_of(context)
    recorder = RunRecorder(run_dir, cfg, Ledger())
    if resumed is not None:
        recorder.resume_from(resumed)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.every, written=resumed.round if resumed is not None else 0)
    log.info("records in %s", run_dir)
    try:
        run(MeteredGrid(grid, recorder.ledger, stop_requested), cfg, recorder, checkpointer, resumed)
    except BaseException as e:
        status = "interrupted" if isinstance(e, (KeyboardInterrupt, RunInterrupted)) else "failed"
        try:
            checkpointer.flush()  # the last completed round, if its checkpoint was not due yet
        except OSError as write_error:  # the disk: say so, and keep the run's own error
            log.error("could not write the checkpoint of round %d: %s", checkpointer.pending_round, write_error)
        recorder.close(status, f"{type(e).__name__}: {e}")
        if isinstance(e, FedloraError) and status == "failed":
            log.error("fedlora: error: %s", e)
        if checkpointer.written:
            log.info("resumable: fedlora-sim resume=%s (after round %d)", run_dir, checkpointer.written)
        raise
    summary = recorder.close("completed")
    if summary["best_accuracy"] is None:  # no server-side evaluation (data.on_nodes without test data)
        log.info("done; the clients evaluated; records in %s", run_dir)
    else:
        log.info("done: final accuracy %.4f, best %.4f; records in %s", summary["final_accuracy"],
                 summary["best_accuracy"], run_dir)
