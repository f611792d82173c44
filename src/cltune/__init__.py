"""cltune: continual LoRA fine-tuning of causal LMs on a sequence of dialogue styles."""

__version__ = "0.1.0"
