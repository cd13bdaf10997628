"""Digests of a state's replicated entries, for ranks to compare (``session/job.py``).

In a job of replicas every rank should hold the same values of every entry that is
not per rank by design. A digest per entry (its tree and its bytes, XXH3-128) is cheap
to compute where the state lives on the host and small enough to all-gather.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import xxhash

from trainhooks.checkpoint.per_rank import PerRank
from trainhooks.checkpoint.rng import RNGState
from trainhooks.checkpoint.saving.sharded_write import split_sharded
from trainhooks.checkpoint.state.tree import flatten_state

__all__ = ["replica_digests"]


def replica_digests(state: Mapping[str, Any] | None) -> dict[str, str]:
    """A digest per replicated, host-resident entry of ``state``: its tree and bytes.

    Left out: ``PerRank`` and ``RNGState`` entries (per rank by design), entries holding
    DTensors (their shards differ by design), entries that cannot be flattened, and
    everything once CUDA is in use (hashing would need a copy to the host).

    Example:
        >>> import numpy as np
        >>> a = replica_digests({"w": np.zeros(3), "rng": RNGState()})
        >>> sorted(a) == ["w"] and a == replica_digests({"w": np.zeros(3)})
        True
    """
    torch = sys.modules.get("torch")
    if state is None or (torch is not None and torch.cuda.is_initialized()):
        return {}
    digests: dict[str, str] = {}
    for name in sorted(state, key=str):
        value = state[name]
        if isinstance(value, (PerRank, RNGState)):
            continue
        try:
            flat = flatten_state({name: value})
            if split_sharded(flat.tensors)[1]:
                continue
            digest = xxhash.xxh3_128(json.dumps(flat.tree, sort_keys=True).encode())
            for tensor in flat.tensors.values():
                digest.update(tensor.buffer)
        except Exception:  # an entry the check cannot read is not checked
            continue
        digests[str(name)] = digest.hexdigest()
    return digests
