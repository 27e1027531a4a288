"""What the ServerApp and the ClientApp say to each other, besides the arrays.

- The query that opens a run asks every node who it is and gives it the run's resolved config (JSON,
  under CONFIG); the node keeps it in its Flower node state for the rest of the run, so train messages
  carry only the round, the client's partition and its training seed. A node that lost it (it
  restarted) fails with NO_CONFIG in its error, and its next train message carries the config again.
- Under heterogeneous ranks, a train message also carries the client's adapter rank (RANK); under
  simulation.faults, a client chosen to fail or to straggle is told so (FAULT).
- A method that initialises from the clients' data (Fed-SB) asks a seeded set of clients for their
  share in a `train.init_update` message before round 1.
- What never changes after that (Fed-SB's B and A, the method's `fixed_keys`) is sent to a client
  once, the first time it is sampled; a node that lost it fails with NO_FIXED and is sent it again.
- A method that broadcasts sends every client the round's update in a `train.apply_update` message;
  a resumed run first sends every client the whole global state in one (FULL), to build its replica from.
"""

CONFIG = "fedlora.config"
NO_CONFIG = "holds no config of the run"
ROUND, PARTITION, SEED = "round", "partition-id", "seed"
RANK = "rank"  # a client's adapter rank, under heterogeneous ranks (adapter.ranks, or a node's `rank`)
APPLY_UPDATE = "apply_update"
FAULT, FAIL, STRAGGLE = "fault", "fail", "straggle"  # simulation.faults: a client told to raise, or to reply late
FULL = "full"  # an apply_update message that carries the whole global state, not a round's change
INIT_UPDATE = "init_update"  # a method that initialises from the clients' data: their share, before round 1
NO_FIXED = "holds no fixed state of the run"  # a node that lost what it is sent once (Fed-SB's B and A)
