"""Label strings <-> label vectors."""

import numpy as np
import pytest

from perturbax.data import PerturbationRegistry, format_label, parse_label


def test_parse_spellings():
    assert parse_label("A+B") == {"A": 1.0, "B": 1.0}
    assert parse_label("A:0.5+B:2") == {"A": 0.5, "B": 2.0}
    assert parse_label("control") == {}
    assert parse_label("ctrl", control=("ctrl", "NT")) == {} and parse_label("NT", control=("ctrl", "NT")) == {}
    assert parse_label("A+B", doses="0.5+2") == {"A": 0.5, "B": 2.0}
    assert parse_label("A|B", sep="|") == {"A": 1.0, "B": 1.0}
    assert parse_label("A:-1") == {"A": -1.0}
    assert parse_label("control+A") == {"A": 1.0}


@pytest.mark.parametrize(
    "label, kwargs, match",
    [
        ("A++B", {}, "empty component"),
        ("+A", {}, "empty component"),
        ("A+", {}, "empty component"),
        ("", {}, "Empty perturbation label"),
        ("A|B", {}, r"Pass sep='\|'"),
        ("A;B", {}, r"Pass sep=';'"),
        ("A+B", {"doses": "0.5"}, "2 component\\(s\\) but dose"),
        ("A+B", {"doses": "0.5+x"}, "not a number"),
        ("A:x", {}, "not a number"),
        ("A:inf", {}, "finite"),
        ("A+A", {}, "twice"),
        ("A:0.5+B", {"doses": "1+1"}, "inline doses and a dose column"),
    ],
)
def test_parse_errors(label, kwargs, match):
    with pytest.raises(ValueError, match=match):
        parse_label(label, **kwargs)


def test_registry_round_trip_and_canonical_order():
    reg = PerturbationRegistry(("A", "B", "C"))
    for spelling in ["B+A", "A+B", {"B": 1, "A": 1.0}, [1, 1, 0]]:
        assert reg.canonical(spelling) == "A+B"
    np.testing.assert_array_equal(reg.encode("C:2+A:0.5"), [0.5, 0, 2.0])
    assert reg.decode([0.5, 0, 2.0]) == "A:0.5+C:2"
    assert reg.decode([0, 0, 0]) == "control"
    assert reg.decode(reg.encode("A:0.001")) == "A:0.001"
    assert reg.encode(reg.decode([1 / 3, 0, 0]))[0] == pytest.approx(1 / 3, rel=1e-5)
    assert reg.encode_many(["A", "control", "B+C"]).shape == (3, 3)
    assert format_label({"A": 1, "B": 0, "C": 2}) == "A+C:2"


def test_registry_errors():
    reg = PerturbationRegistry(("KLF1", "MAP2K6"))
    with pytest.raises(KeyError, match=r"Unknown perturbation 'KLF2'.*Did you mean \['KLF1'\]"):
        reg.encode("KLF2+MAP2K6")
    assert reg.unknown("KLF2+MAP2K6") == ["KLF2"]
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        reg.encode([1, 0, 0])
    with pytest.raises(ValueError, match="Duplicate"):
        PerturbationRegistry(("A", "A"))
    with pytest.raises(ValueError, match="rename"):
        PerturbationRegistry(("A+B",))
