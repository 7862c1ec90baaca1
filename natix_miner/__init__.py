"""The subnet-facing shell of the miner: protocol, neuron, guard, decode, validator and CLI.

Knows bittensor; knows nothing of how a model works (it reaches models through `cascade` and
`models.registry`)."""

__version__ = "0.1.0"
