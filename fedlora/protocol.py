"""What the ServerApp and the ClientApp say to each other, besides the arrays.

- The query that opens a run asks every node who it is and gives it the run's resolved config (JSON,
  under CONFIG); the node keeps it in its Flower node state for the rest of the run, so train messages
  carry only the round, the client's partition and its training seed. A node that lost it (it
  restarted) fails with NO_CONFIG in its error, and its next train message carries the config again.
- A method that broadcasts sends every client the round's update in a `train.apply_update` message.
"""

CONFIG = "fedlora.config"
NO_CONFIG = "holds no config of the run"
ROUND, PARTITION, SEED = "round", "partition-id", "seed"
APPLY_UPDATE = "apply_update"
