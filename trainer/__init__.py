"""seqtrain's trainer: config, data, parallelism, engine, loop, checkpoints, tracking, CLI."""
