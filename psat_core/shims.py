"""What older psat releases wrote that today's code still reads: every shim, dated, in one
place, so that each can be retired on purpose (timm keeps its deprecations so).

A shim here upgrades old data as it is read; it never changes what new code writes.
"""

from __future__ import annotations

# member.json fields MemberSpec no longer has -> since when (a registered version or a
# checkpoint on storage written before still loads: the field is dropped as it is read)
RETIRED_SPEC_FIELDS = {"extra": "2026-12 (psat 0.1.0 wrote it always empty; nothing read it)"}
# member.json fields absent from older checkpoints -> the value they were trained with
OLD_SPEC_DEFAULTS = {"init": "shared"}  # before 2026-12, every generated layer at one scale


def upgrade_spec(data: dict) -> dict:
    """A member.json mapping as today's MemberSpec reads it."""
    upgraded = {key: value for key, value in data.items() if key not in RETIRED_SPEC_FIELDS}
    return OLD_SPEC_DEFAULTS | upgraded
