"""Go's `omitempty`, as fleet's API encoded its objects: the one rule for every API answer.

Keys in alphabetical order (fleet's generated schema code emits them so), without the empty
values None, "", [] and {} (0 and false stay). Pure: the engine's what-if answers and the API
views both shape their JSON with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def omit_empty(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: obj[k] for k in sorted(obj) if obj[k] not in (None, "", [], {})}
