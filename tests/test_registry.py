"""``Registry``: plug-ins by name, in registration order; mistakes are explained."""

from __future__ import annotations

import pytest

from sensplan import UserInputError
from sensplan._registry import Registry


class Thing:
    def __init__(self, name: str = "") -> None:
        self.name = name


@pytest.fixture
def reg() -> Registry[Thing]:
    r: Registry[Thing] = Registry("widget", flag="--widgets")
    for name in ("zeta", "alpha", "weight_quant", "mid"):
        r.add(name, Thing(name))
    return r


def test_registration_order_is_preserved(reg):
    assert reg.names() == ["zeta", "alpha", "weight_quant", "mid"]
    assert [t.name for t in reg] == ["zeta", "alpha", "weight_quant", "mid"]
    assert len(reg) == 4
    assert "alpha" in reg and "beta" not in reg
    reg.remove("alpha")
    reg.add("alpha", Thing("alpha"))
    assert reg.names() == ["zeta", "weight_quant", "mid", "alpha"]


def test_get_returns_the_registered_object(reg):
    t = Thing("beta")
    assert reg.add("beta", t) is t
    assert reg.get("beta") is t


def test_a_duplicate_name_is_a_value_error(reg):
    first = reg.get("mid")
    with pytest.raises(ValueError, match="widget named 'mid' is already registered"):
        reg.add("mid", Thing("mid"))
    assert reg.get("mid") is first  # unchanged
    replacement = Thing("mid")
    reg.add("mid", replacement, replace=True)
    assert reg.get("mid") is replacement
    assert reg.names().count("mid") == 1


def test_an_empty_or_non_string_name_is_a_value_error(reg):
    with pytest.raises(ValueError, match="non-empty string name"):
        reg.add("", Thing())
    with pytest.raises(ValueError, match="non-empty string name"):
        reg.register(Thing())  # no name attribute value


def test_an_unknown_name_suggests_the_closest_and_lists_all(reg):
    with pytest.raises(UserInputError) as e:
        reg.get("weight_qaunt")
    msg = str(e.value)
    assert "Unknown widget 'weight_qaunt' for --widgets." in msg
    assert "Did you mean 'weight_quant'?" in msg
    assert "Known: zeta, alpha, weight_quant, mid." in msg


def test_an_unknown_name_far_from_all_lists_without_a_guess(reg):
    with pytest.raises(UserInputError) as e:
        reg.get("qqqqqqqq")
    assert "Did you mean" not in str(e.value)
    assert "Known: zeta, alpha, weight_quant, mid." in str(e.value)


def test_an_empty_registry_says_so():
    with pytest.raises(UserInputError, match=r"Unknown gadget 'x'\. Known: none\."):
        Registry[Thing]("gadget").get("x")


def test_register_decorates_classes_as_instances_and_returns_them_unchanged():
    r: Registry[object] = Registry("plug-in")

    @r.register
    class Plug:
        name = "plug"

    assert isinstance(Plug, type)
    assert isinstance(r.get("plug"), Plug)
    inst = Thing("obj")
    assert r.register(inst) is inst and r.get("obj") is inst
    with pytest.raises(ValueError, match="already registered"):
        r.register(Plug)


def test_remove_is_idempotent(reg):
    reg.remove("zeta")
    reg.remove("zeta")
    assert "zeta" not in reg
    with pytest.raises(UserInputError):
        reg.get("zeta")


def test_iteration_is_over_a_snapshot(reg):
    for t in reg:  # removing while iterating does not disturb the loop
        reg.remove(t.name)
    assert len(reg) == 0
