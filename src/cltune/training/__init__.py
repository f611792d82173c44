"""Training: the one loop, the session that builds a run, step checkpoints and resume, the run folder, trackers,
signals, Trainer/TRL integration."""
