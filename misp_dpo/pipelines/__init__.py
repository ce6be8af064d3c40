"""The staged pipeline: runner, executors, schemas, shard I/O, and one thin wrapper per stage."""
