"""The coordinator: runs, rounds, aggregation, checkpoints and the ``coordinator`` CLI."""
