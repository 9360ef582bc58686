import pytest

from fedhet.core.messages import ModelSize
from fedhet.devices import LETTER_WIDTHS, Tier, assign_tiers, largest, parse_tiers, smallest


def test_parse_heterofl_string():
    tiers = parse_tiers("a2-b8")
    assert tiers == [Tier("a", ModelSize(width=1.0), 0.2), Tier("b", ModelSize(width=0.5), 0.8)]


def test_parse_all_letters_equal():
    tiers = parse_tiers("a1-b1-c1-d1-e1")
    assert [t.name for t in tiers] == ["a", "b", "c", "d", "e"]
    assert [t.size.width for t in tiers] == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert [t.proportion for t in tiers] == [0.2] * 5
    assert LETTER_WIDTHS == {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def test_letter_without_number_has_proportion_one():
    assert [t.proportion for t in parse_tiers("a-e")] == [0.5, 0.5]


def test_parse_dicts():
    tiers = parse_tiers(
        [
            {"name": "phone", "width": 0.25, "depth": None, "density": 1.0, "proportion": 1},
            {"name": "laptop", "width": 1.0, "depth": 2, "density": 0.5, "proportion": 3},
        ]
    )
    assert tiers == [
        Tier("phone", ModelSize(width=0.25), 0.25),
        Tier("laptop", ModelSize(width=1.0, depth=2, density=0.5), 0.75),
    ]


def test_parse_dict_defaults():
    assert parse_tiers([{"name": "x"}]) == [Tier("x", ModelSize(), 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a1-f2", r"devices\.tiers: unknown letter 'f' in 'a1-f2'; allowed letters a-e"),
        ("a0-b1", r"devices\.tiers: tier 'a0' in 'a0-b1' has proportion 0; proportions must be > 0"),
        ("a1-a2", r"devices\.tiers: letter 'a' appears twice"),
        ("a1-2", r"devices\.tiers: bad tier '2' in 'a1-2'"),
        ("", r"devices\.tiers: got an empty string"),
        ([], r"devices\.tiers: got an empty list"),
        (3, r"devices\.tiers: got 3; allowed: a string like 'a2-b8'"),
        ([{"name": "p", "proportion": 0}], r"devices\.tiers\[0\]\.proportion: got 0; proportions must be finite numbers > 0"),
        ([{"name": "p", "proportion": -1}], r"devices\.tiers\[0\]\.proportion: got -1; proportions must be"),
        ([{"name": "p", "width": 2}], r"devices\.tiers\[0\]\.width: got 2; allowed: a number with 0 < width <= 1"),
        ([{"name": "p", "depth": 0}], r"devices\.tiers\[0\]\.depth: got 0; allowed: an integer >= 1 or null"),
        ([{"name": "p", "speed": 3}], r"devices\.tiers\[0\]: unknown key 'speed'; allowed keys: name, width"),
        ([{"width": 0.5}], r"devices\.tiers\[0\]\.name: got None; a non-empty string is required"),
        ([{"name": "p"}, {"name": "p"}], r"devices\.tiers\[1\]\.name: 'p' is used twice"),
    ],
)
def test_parse_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_tiers(spec)


def test_fixed_a2_b8_index_blocks():
    out = assign_tiers(100, parse_tiers("a2-b8"), mode="fixed", seed=0, rnd=0)
    assert out == [0] * 20 + [1] * 80


def test_fixed_largest_remainder_thirds():
    # quotas 10/3 each: floors 3, 3, 3 and the one left over goes to the first of the tied tiers
    out = assign_tiers(10, parse_tiers("a1-b1-c1"), mode="fixed", seed=0, rnd=0)
    assert out == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_fixed_largest_remainder_unequal():
    # quotas 7 * (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4: floors 3, 2, 1; one left goes to the largest remainder (0.5)
    out = assign_tiers(7, parse_tiers("a5-b3-c2"), mode="fixed", seed=0, rnd=0)
    assert out == [0, 0, 0, 0, 1, 1, 2]


def test_fixed_ignores_seed_and_round():
    tiers = parse_tiers("a1-b1-c1-d1-e1")
    base = assign_tiers(13, tiers, mode="fixed", seed=0, rnd=0)
    assert assign_tiers(13, tiers, mode="fixed", seed=5, rnd=9) == base
    assert len(base) == 13


def test_dynamic_is_deterministic_and_varies_by_round():
    tiers = parse_tiers("a1-b1-c1-d1-e1")
    r3 = assign_tiers(50, tiers, mode="dynamic", seed=7, rnd=3)
    assert assign_tiers(50, tiers, mode="dynamic", seed=7, rnd=3) == r3
    assert assign_tiers(50, tiers, mode="dynamic", seed=7, rnd=4) != r3
    assert assign_tiers(50, tiers, mode="dynamic", seed=8, rnd=3) != r3
    assert len(r3) == 50 and set(r3) <= {0, 1, 2, 3, 4}


def test_dynamic_follows_proportions():
    tiers = parse_tiers("a1-b9")
    out = assign_tiers(20_000, tiers, mode="dynamic", seed=1, rnd=0)
    # binomial(20000, 0.1): std ~42, so 2000 +- 300 is a 7-sigma band
    assert 1700 < out.count(0) < 2300


def test_dynamic_zero_clients():
    assert assign_tiers(0, parse_tiers("a1-b1"), mode="dynamic", seed=0, rnd=0) == []


def test_unknown_assignment_mode():
    with pytest.raises(ValueError, match=r"devices\.assignment: got 'random'; allowed: fixed, dynamic"):
        assign_tiers(10, parse_tiers("a1"), mode="random", seed=0, rnd=0)


def test_largest_and_smallest():
    tiers = parse_tiers("c1-a1-e1-b1")
    assert largest(tiers).name == "a"
    assert smallest(tiers).name == "e"
    with pytest.raises(ValueError, match=r"devices\.tiers"):
        largest([])


def test_fleet_infos_are_built_once_under_the_fixed_assignment_and_drawn_each_round_under_dynamic() -> None:
    from fedhet.devices.fleet import Fleet

    def fleet(assignment: str) -> Fleet:
        n = 50
        return Fleet(tiers=tuple(parse_tiers("a1-b1")), assignment=assignment, policy="tiered", seed=3,
                     label_counts=((1, 2),) * n, num_train=(3,) * n, num_test=(1,) * n)

    fixed = fleet("fixed")
    first = fixed.infos(1)
    first.pop()  # the caller's copy: the next round's list is whole
    again = fixed.infos(7)
    assert len(again) == 50 and again[:49] == first and [c.tier for c in again] == ["a"] * 25 + ["b"] * 25
    dynamic = fleet("dynamic")
    assert [c.tier for c in dynamic.infos(1)] != [c.tier for c in dynamic.infos(2)]
