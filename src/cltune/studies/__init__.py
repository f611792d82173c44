"""Studies: the continual-learning stream (pipeline), compare and sweep with their reports, run configs with the
registered strategies, the config reference."""
