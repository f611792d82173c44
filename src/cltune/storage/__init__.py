"""Files on disk: atomic writes, manifests that verify checkpoints, the run folder's lock, stable digests."""
