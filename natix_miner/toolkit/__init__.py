"""The offline toolkit: the local validator, the validators' image pipeline, scoring, evaluation,
training, augmentation, datasets, metrics and plots.

Used by `natix-miner local / validate / train / eval / calibrate` and by scripts. The serving path
(`natix-miner serve`, `neurons/miner.py`, the neuron, guard and decode) never imports this package:
a test checks it, so what the miner runs in production stays small and auditable.
"""
