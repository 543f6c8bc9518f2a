"""circles.common.ids: the random UUIDs given to tasks and jobs."""

from __future__ import annotations

import uuid

from circles.common.ids import random_uuid


def test_random_uuids_are_canonical_version_4_and_every_random_bit_varies():
    ids = [random_uuid() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122 for u, i in zip(parsed, ids))
    fixed = (0xF << 76) | (0x3 << 62)  # the version's four bits and the variant's two
    ones = zeros = 0
    for u in parsed:
        ones |= u.int
        zeros |= ~u.int
    assert ones & ~fixed == zeros & ~fixed & ((1 << 128) - 1) == ((1 << 128) - 1) & ~fixed
