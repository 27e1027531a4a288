"""What a client trains in each adapted layer: a frozen base weight plus a seeded trainable delta.

`base` holds the one layer (DeltaLayer) and its injection; `factorizations` FedMUD's, FedLMT's and
FedPara's deltas; `adapters` LoRA and BoRA; `sizing` the ranks and Kronecker grids for a target ratio.
"""
