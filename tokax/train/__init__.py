"""Training: losses, log-probs, batches, sharding, the train step, checkpoints.

Modules (imported on demand; this package file stays light):

- ``losses``     one pure function per loss, by name (``get_loss``)
- ``logprobs``   per-token log-probs / KL chunked over the vocabulary
- ``data``       tokenizers, packed SFT batches, preference and unpaired batches
- ``sharding``   mesh, logical axis names, rules -> ``NamedSharding``
- ``checkpoint`` orbax ``CheckpointManager``, restore onto another mesh
- ``optim``      learning-rate schedule and optax optimizer from the config
- ``step``       train state, the loss of a micro-batch, jitted train / eval step
- ``metrics``    metrics.jsonl and TensorBoard scalars (tensorboardX)
- ``trainer``    ``run(config)``: setup, the loop, resume
- ``heads``      frozen-target draft heads (``tokax.jobs.train_heads``)
- ``workdir``    the run's lock and recorded config

Corpora and tasks shared with decoding live in ``tokax.data``.
"""
