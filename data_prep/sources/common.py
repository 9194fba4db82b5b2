"""Helpers the source kinds share: sidecar JSON, runs of refs by file."""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator


def json_dict(data: Any) -> dict:
    if not isinstance(data, (bytes, bytearray)):
        return {}
    try:
        parsed = json.loads(data)
    except ValueError:  # unparseable sidecar metadata: the item may still have a .txt caption
        return {}
    return parsed if isinstance(parsed, dict) else {}



def group_by(items: Iterable, key) -> Iterator[tuple[Any, list]]:
    """Consecutive runs with the same key (refs arrive in listing order, so runs are whole files)."""
    run, current = [], object()
    for item in items:
        k = key(item)
        if run and k != current:
            yield current, run
            run = []
        current = k
        run.append(item)
    if run:
        yield current, run
