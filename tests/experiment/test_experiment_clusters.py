"""fedhet.experiment.clusters: purity and adjusted Rand index of learned client clusters."""

import pytest

from fedhet.experiment.clusters import adjusted_rand, cluster_purity, clusters_as_assignment, groups_as_mapping


def test_cluster_purity_by_hand():
    truth = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1}
    # learned cluster 7 = {0, 1, 3} (two of group 0), cluster 8 = {2, 4, 5} (two of group 1): 4/6
    assert cluster_purity({0: 7, 1: 7, 3: 7, 2: 8, 4: 8, 5: 8}, truth) == pytest.approx(4 / 6)
    # the labels of learned clusters do not matter
    assert cluster_purity({0: 1, 1: 1, 2: 1, 3: 0, 4: 0, 5: 0}, truth) == 1.0
    # everything in one cluster: the larger true group's share
    assert cluster_purity({c: 0 for c in range(5)}, truth) == pytest.approx(3 / 5)
    # every client alone: 1.0 (purity does not punish splitting a true group)
    assert cluster_purity({c: c for c in range(6)}, truth) == 1.0
    # only the clients the assignment lists count
    assert cluster_purity({3: 0, 4: 0}, truth) == 1.0


def test_adjusted_rand_by_hand():
    truth = {0: 0, 1: 0, 2: 1, 3: 1}
    assert adjusted_rand({0: 5, 1: 5, 2: 6, 3: 6}, truth) == 1.0
    assert adjusted_rand({c: c for c in range(4)}, truth) == 0.0
    # {0,1,2} | {3} against {0,1} | {2,3}: pairs together in both: 1 (0-1); pairs together in the truth:
    # 2, in the learned: 3; expected 2*3/6 = 1, max (2+3)/2 = 2.5 -> ARI = (1 - 1)/(2.5 - 1) = 0
    assert adjusted_rand({0: 0, 1: 0, 2: 0, 3: 1}, truth) == pytest.approx(0.0)
    # 6 clients, {0,1,2} | {3,4,5} against {0,1} | {2,3} | {4,5}: together in both: 0-1, 4-5 -> 2;
    # truth 3+3 = 6, learned 1+1+1 = 3; expected 6*3/15 = 1.2, max 4.5 -> (2 - 1.2)/(4.5 - 1.2)
    six = {c: int(c >= 3) for c in range(6)}
    assert adjusted_rand({0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}, six) == pytest.approx(0.8 / 3.3)


def test_helpers_and_errors():
    assert groups_as_mapping((1, 0, 1)) == {0: 1, 1: 0, 2: 1}
    assert clusters_as_assignment([[0, 3], [1], [2]]) == {0: 0, 3: 0, 1: 1, 2: 2}
    with pytest.raises(ValueError, match="client 3 is in clusters 0 and 1"):
        clusters_as_assignment([[3], [3]])
    with pytest.raises(ValueError, match="empty"):
        cluster_purity({}, {0: 0})
    with pytest.raises(ValueError, match=r"clients \[4\] have no true group"):
        cluster_purity({4: 0}, {0: 0})


def test_the_loop_scores_a_clustered_methods_assignment_against_the_true_groups(tmp_path):
    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import load_config
    from fedhet.simulation.loop import run_rounds

    cfg = load_config(None, [
        "rounds=8", "algorithm.name=ifca", "data.dataset=digits", "data.num_clients=10", "data.rotate_fraction=0.5",
        "model.options={hidden: [32]}", "logging.progress=off",
    ])
    run = build_run(cfg, tmp_path)
    last = run_rounds(run).history[-1]
    truth = groups_as_mapping(run.world.dataset.client_groups)
    got = run.algorithm.client_clusters(run_rounds(run, resume=True).state)
    assert last["clusters/purity"] == cluster_purity(got, truth) == 1.0
    assert last["clusters/ari"] == 1.0 and last["clusters/count"] == 2.0
    # methods without clusters log none
    plain = run_rounds(build_run(load_config(None, ["rounds=1", "data.dataset=digits", "data.num_clients=4", "logging.progress=off"]), tmp_path / "p"))
    assert not any(k.startswith("clusters/") for k in plain.history[-1])
