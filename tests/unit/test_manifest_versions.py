"""Shard-set and calibration versions: "newest" is the largest name, also within one second."""
from cfvit_common.manifests import new_version


def test_versions_made_one_after_another_sort_in_the_order_they_were_made():
    made = [new_version() for _ in range(200)]  # far more than one per second's random part could order
    assert made == sorted(made) and len(set(made)) == len(made)
