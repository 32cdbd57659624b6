"""Training: losses, log-probs, data, sharding, the train step, checkpoints.

Modules (imported on demand; this package file stays light):

- ``losses``     one pure function per loss, by name (``get_loss``)
- ``logprobs``   per-token log-probs / KL chunked over the vocabulary
- ``data``       stdlib corpus, packed SFT batches, preference batches
- ``sharding``   mesh, logical axis names, rules -> ``NamedSharding``
- ``checkpoint`` orbax ``CheckpointManager``, restore onto another mesh
- ``trainer``    train state, jitted train / eval step, ``run(config)``
"""
