"""Evaluation: test perplexity and attribution, the forgetting metrics, statistics, the typed metrics file."""
