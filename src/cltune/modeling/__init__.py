"""The model: loading a base LM, speaker tokens and LoRA, batching, scoring, per-example gradients, sampling,
checkpoints."""
