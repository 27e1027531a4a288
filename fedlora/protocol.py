"""What the ServerApp and the ClientApp say to each other, besides the arrays.

- The query that opens a run asks every node who it is and gives it the run's resolved config (JSON,
  under CONFIG); the node keeps it in its Flower node state for the rest of the run, so train messages
  carry only the round, the client's partition and its training seed.
- A method that broadcasts sends every client the round's update in a `train.apply_update` message.
"""

CONFIG = "fedlora.config"
ROUND, PARTITION, SEED = "round", "partition-id", "seed"
APPLY_UPDATE = "apply_update"
