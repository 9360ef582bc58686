import pytest

from fedhet.devices import Availability


def test_no_dropout_never_drops():
    a = Availability()
    assert not any(a.dropped(cid, 0, 0) for cid in range(100))


def test_dropout_is_deterministic():
    a = Availability(dropout=0.3)
    first = [a.dropped(cid, 2, 11) for cid in range(200)]
    assert [a.dropped(cid, 2, 11) for cid in range(200)] == first
    assert [a.dropped(cid, 3, 11) for cid in range(200)] != first
    assert [a.dropped(cid, 2, 12) for cid in range(200)] != first


def test_dropout_frequency_is_near_rate():
    a = Availability(dropout=0.2)
    n = 10_000
    dropped = sum(a.dropped(cid, 0, 3) for cid in range(n))
    # binomial(10000, 0.2): std 40, so 2000 +- 200 is a 5-sigma band
    assert 1800 < dropped < 2200


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True])
def test_dropout_validation(bad):
    with pytest.raises(ValueError, match=r"devices\.dropout: got .*; allowed: a number with 0 <= dropout < 1"):
        Availability(dropout=bad)
