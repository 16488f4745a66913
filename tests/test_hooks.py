"""The hook registry (the pool runs it in every worker: see test_manager.py)."""

import pytest

from qless_pool import hooks


@pytest.fixture(autouse=True)
def no_hooks():
    hooks.clear()
    yield
    hooks.clear()


def test_after_prefork_registers_in_order_and_works_as_a_decorator():
    calls = []

    @hooks.after_prefork
    def first(worker):
        calls.append(("first", worker))

    def second(worker):
        calls.append(("second", worker))

    assert hooks.after_prefork(second) is second
    assert first.__name__ == "first"  # the decorator hands the function back
    hooks.run_after_prefork("w")
    assert calls == [("first", "w"), ("second", "w")]
    assert hooks.after_prefork_hooks() == (first, second)


def test_a_failing_hook_stops_the_rest():
    ran = []
    hooks.after_prefork(lambda worker: (_ for _ in ()).throw(RuntimeError("no database")))
    hooks.after_prefork(ran.append)
    with pytest.raises(RuntimeError, match="no database"):
        hooks.run_after_prefork("w")
    assert ran == []


def test_after_prefork_needs_a_callable():
    with pytest.raises(TypeError):
        hooks.after_prefork("not callable")
