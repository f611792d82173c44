"""Stable digests: seeds derived from their parts, and fingerprints of settings (sha256, the same on every machine)."""

from __future__ import annotations

import hashlib
import json


def derived_seed(*parts) -> int:
    """A 32-bit seed from any parts; hashing keeps (seed, phase, step) combinations from colliding."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def fingerprint(obj) -> str:
    """A digest of a JSON-able value: equal settings give equal fingerprints."""
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()
