import math

import pytest

from adaptation.lab.probe_agreement import correlation


def test_correlation() -> None:
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8]) == {
        "pearson": pytest.approx(1.0),
        "spearman": 1.0,
        "n": 4,
    }
    c = correlation([1, 2, 3, 4], [1, 8, 27, 1000])
    assert c["spearman"] == pytest.approx(1.0) and c["pearson"] < 0.9
    assert correlation([3, 2, 1], [1, 2, 3])["spearman"] == pytest.approx(-1.0)
    # ties share their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert correlation([0, 0, 1], [1, 2, 3])["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(correlation([1, 1, 1], [1, 2, 3])["pearson"])
    assert math.isnan(correlation([1], [1])["spearman"])
    with pytest.raises(ValueError, match="as many"):
        correlation([1, 2], [1])
