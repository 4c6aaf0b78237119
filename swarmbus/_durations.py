"""Durations as people write them (``5m``, ``1h30m``, ``500ms``) and as seconds.

One parser for the seed's YAML (swarm specs, the consensus block) and the wire
(``proposal.timeout``). ``DURATION_PATTERN`` is the wire's form, in JSON Schema's
regex dialect; the YAML side also takes spaces and plain numbers of seconds.
"""

from __future__ import annotations

import math
import re
from typing import Final

DURATION_PATTERN: Final = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$"
_PART: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)")
_WIRE: Final = re.compile(DURATION_PATTERN.removesuffix("$") + r"\Z")
_UNIT_SECONDS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HINT: Final = "use e.g. 30s, 10m, 1h30m"


def parse_duration(value: object) -> float:
    """Seconds from ``10m``, ``30s``, ``1h30m``, ``500ms`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().replace(" ", "")
        parts = _PART.findall(text)
        if "".join(n + u for n, u in parts) != text:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"invalid duration {value!r} ({_HINT})") from None
        else:
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(f"invalid duration {value!r} ({_HINT})")
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r} ({_HINT})")
    if seconds <= 0:
        raise ValueError(f"duration {value!r} must be positive")
    return seconds


def wire_seconds(value: float | str) -> float:
    """Seconds from a wire duration: a positive number, or text matching DURATION_PATTERN."""
    if isinstance(value, str) and not _WIRE.match(value):
        raise ValueError(f"invalid duration {value!r} ({_HINT}, or a number of seconds)")
    return parse_duration(value)
