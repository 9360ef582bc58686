"""How well learned client clusters (IFCA, CFL) recover the true groups (e.g. rotated vs. not).

``assignment`` maps client id -> learned cluster, ``truth`` maps client id -> true group
(``FederatedDataset.client_groups``); both are scored over the clients ``assignment`` lists.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence


def _common(assignment: Mapping[int, int], truth: Mapping[int, int]) -> list[int]:
    if not assignment:
        raise ValueError("cluster scores: the assignment is empty")
    missing = sorted(c for c in assignment if c not in truth)
    if missing:
        raise ValueError(f"cluster scores: clients {missing[:5]} have no true group")
    return sorted(assignment)


def cluster_purity(assignment: Mapping[int, int], truth: Mapping[int, int]) -> float:
    """Σ over learned clusters of the count of the most common true group in it, divided by the
    number of clients: 1.0 when no learned cluster mixes true groups (a true group split over
    several learned clusters still scores 1.0: pair it with :func:`adjusted_rand`)."""
    clients = _common(assignment, truth)
    by_cluster: dict[int, Counter[int]] = defaultdict(Counter)
    for c in clients:
        by_cluster[assignment[c]][truth[c]] += 1
    return sum(max(counts.values()) for counts in by_cluster.values()) / len(clients)


def adjusted_rand(assignment: Mapping[int, int], truth: Mapping[int, int]) -> float:
    """The adjusted Rand index of the two partitions (scikit-learn): 1.0 for identical partitions up
    to relabelling, about 0 for a random one."""
    from sklearn.metrics import adjusted_rand_score

    clients = _common(assignment, truth)
    return float(adjusted_rand_score([truth[c] for c in clients], [assignment[c] for c in clients]))


def groups_as_mapping(groups: Sequence[int]) -> dict[int, int]:
    """``FederatedDataset.client_groups`` as ``{client id: group}``."""
    return {cid: int(g) for cid, g in enumerate(groups)}


def clusters_as_assignment(clusters: Sequence[Sequence[int]]) -> dict[int, int]:
    """CFL's list of clusters (client ids) as ``{client id: cluster index}``."""
    out: dict[int, int] = {}
    for k, members in enumerate(clusters):
        for c in members:
            if c in out:
                raise ValueError(f"clusters_as_assignment: client {c} is in clusters {out[c]} and {k}")
            out[int(c)] = k
    return out
