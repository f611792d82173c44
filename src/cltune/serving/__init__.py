"""Serving what was trained: generation from a checkpoint, chat, export (HF folder, adapter, GGUF)."""
