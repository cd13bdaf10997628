"""The raw Session: fetch structures, feeds to callables, names, the global step, errors."""

from __future__ import annotations

import collections
import functools
import re
from typing import Any

import numpy as np
import pytest
import torch

from trainhooks.session.session import Session


def test_fetch_structures_are_kept() -> None:
    sess = Session({"w": 1.5}, global_step=7)
    Pair = collections.namedtuple("Pair", ["a", "b"])
    result = sess.run(
        {
            "list": ["global_step", lambda: 1],
            "tuple": ("w", None),
            "pair": Pair(lambda: "x", "global_step"),
            "nested": {"deep": [["w"]]},
        }
    )
    assert result == {
        "list": [7, 1],
        "tuple": (1.5, None),
        "pair": Pair("x", 7),
        "nested": {"deep": [[1.5]]},
    }
    assert isinstance(result["pair"], Pair)
    assert sess.run(None) is None


def test_raw_run_does_not_advance_the_global_step() -> None:
    sess = Session({}, global_step=3)
    assert sess.run(lambda: 0) == 0
    assert sess.run("global_step") == 3
    assert sess.global_step == 3


def test_run_step_advances_after_the_fetches_and_before_names_resolve() -> None:
    sess = Session({})
    seen_during_step = []
    result = sess._run_step(
        [lambda: seen_during_step.append(sess.global_step), "global_step"], None
    )
    assert seen_during_step == [0]
    assert result == [None, 1]
    assert sess.global_step == 1


def test_run_step_can_leave_the_step_to_the_step_function() -> None:
    sess = Session({}, advance_global_step=False)

    def step() -> None:
        sess.global_step += 5

    sess._run_step(step, None)
    assert sess.global_step == 5


def test_feeds_are_passed_as_keyword_arguments_the_callable_accepts() -> None:
    sess = Session({})

    def only_x(x: int) -> int:
        return x * 10

    def takes_all(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    def nothing() -> str:
        return "ok"

    result = sess.run([only_x, takes_all, nothing], feed_dict={"x": 2, "y": 3})
    assert result == [20, {"x": 2, "y": 3}, "ok"]


def test_feeds_reach_partials_lambdas_and_callable_objects() -> None:
    sess = Session({})

    class Scale:
        def __call__(self, x: float, factor: float = 1.0) -> float:
            return x * factor

    add = functools.partial(lambda a, x: a + x, 100)
    result = sess.run([Scale(), add, lambda x: -x], feed_dict={"x": 4.0, "factor": 0.5})
    assert result == [2.0, 104.0, -4.0]


def test_a_callable_missing_a_required_feed_raises() -> None:
    sess = Session({})
    with pytest.raises(TypeError, match="x"):
        sess.run(lambda x: x)


def test_names_resolve_against_step_outputs_then_state() -> None:
    weights = np.arange(3.0)
    sess = Session({"weights": weights, "loss": "state-loss"}, global_step=2)

    def train_step() -> dict[str, float]:
        return {"loss": 0.25, "accuracy": 0.9}

    result = sess.run({"out": train_step, "loss": "loss", "acc": "accuracy", "w": "weights"})
    assert result["out"] == {"loss": 0.25, "accuracy": 0.9}
    assert result["loss"] == 0.25  # the step's output shadows the state entry
    assert result["acc"] == 0.9
    assert result["w"] is weights
    assert sess.run("loss") == "state-loss"  # no callable this run: the state


def test_an_unknown_name_lists_the_available_names() -> None:
    sess = Session({"model": torch.nn.Linear(2, 2)})
    with pytest.raises(
        ValueError, match=r"'lossy' is not known.*\['global_step', 'loss', 'model'\]"
    ):
        sess.run([lambda: {"loss": 1.0}, "lossy"])


def test_an_invalid_fetch_type_says_what_to_pass() -> None:
    sess = Session({})
    with pytest.raises(TypeError, match="invalid type int: pass a callable, a name"):
        sess.run([1])


def test_state_is_kept_by_reference_and_must_be_a_mapping() -> None:
    state: dict[str, Any] = {"w": 1}
    sess = Session(state)
    assert sess.state is state
    assert Session().state == {}
    with pytest.raises(TypeError, match="state must be a mapping"):
        Session([("w", 1)])  # type: ignore[arg-type]


def test_global_step_must_be_an_integer() -> None:
    sess = Session({})
    sess.global_step = np.int64(12)  # type: ignore[assignment]
    assert sess.global_step == 12 and type(sess.global_step) is int
    with pytest.raises(TypeError, match=re.escape("global_step must be an integer, got 1.5")):
        sess.global_step = 1.5  # type: ignore[assignment]
    with pytest.raises(TypeError, match="global_step must be an integer"):
        Session({}, global_step="ten")  # type: ignore[arg-type]


def test_a_closed_session_refuses_to_run() -> None:
    sess = Session({})
    sess.close()
    assert sess.closed
    with pytest.raises(RuntimeError, match="closed Session"):
        sess.run("global_step")
    with pytest.raises(RuntimeError, match="closed Session"):
        sess._run_step(lambda: None, None)


def test_torch_tensors_flow_through_unchanged() -> None:
    t = torch.ones(2)
    sess = Session({"t": t})
    out = sess.run([lambda t_in: t_in * 2, "t"], feed_dict={"t_in": t})
    assert torch.equal(out[0], torch.full((2,), 2.0))
    assert out[1] is t
