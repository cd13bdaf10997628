"""Kinds of state values through real checkpoints (``Saver`` and ``Session``): tied
weights stored once, typed JAX keys, growing dicts of counters, and the values a state
refuses with a hint (generators, dataclasses)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state.tree import StateMismatchError, check_state, flatten_state
from trainhooks.session.session import Session


def _save(state: dict[str, Any], directory: Path, **saver_args: Any) -> str:
    saver = Saver(**saver_args)
    prefix = saver.save(Session(state, global_step=3), str(directory / "model.ckpt"), 3)
    saver.close()
    assert prefix is not None
    return prefix


def _restore(state: dict[str, Any], prefix: str, strict: bool = True) -> Session:
    session = Session(state)
    Saver().restore(session, prefix, strict=strict)
    return session


def _stored(prefix: str) -> dict[str, list[int]]:
    """The tensors the data files hold (the manifest's), not the names a reader lists:
    ``list_variables`` also lists a tied array's second name."""
    with open_checkpoint(prefix) as ckpt:
        return {name: list(ckpt.entry(name).shape) for name in ckpt.names}


def _tree(prefix: str) -> Any:
    with open(os.path.join(prefix, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)["tree"]


# --- tied weights ------------------------------------------------------------------------


class TiedLM(torch.nn.Module):
    """A language model whose output layer is its embedding (weight tying)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(300, 64)
        self.body = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, 300, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.embed(tokens))))


def _train_step(model: TiedLM, optimizer: torch.optim.Optimizer) -> None:
    tokens = torch.arange(16) % 300
    loss = torch.nn.functional.cross_entropy(model(tokens), (tokens + 1) % 300)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path, async_save: bool) -> None:
    model = TiedLM(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    _train_step(model, optimizer)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = _save({"model": model, "opt": optimizer}, tmp_path, async_save=async_save)

    stored = _stored(prefix)
    assert "model/embed.weight" in stored and "model/lm_head.weight" not in stored
    with open_checkpoint(prefix) as ckpt:
        entries = [ckpt.entry(name) for name in ckpt.names if name.startswith("model/")]
    embedding_bytes = 300 * 64 * 4
    assert sum(e.end - e.start for e in entries) < 2 * embedding_bytes  # stored once
    assert _tree(prefix)["version"] == 3

    fresh = TiedLM(seed=1)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    _train_step(fresh, fresh_opt)  # Adam state to overwrite
    _restore({"model": fresh, "opt": fresh_opt}, prefix)
    assert fresh.lm_head.weight is fresh.embed.weight
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # both keep training tied and alike
    _train_step(model, optimizer)
    _train_step(fresh, fresh_opt)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert fresh.lm_head.weight is fresh.embed.weight


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_one_tensor_under_two_names_is_restored_into_both_from_one_copy(
    tmp_path: Path, async_save: bool
) -> None:
    weight = torch.randn(8, 4)
    table = np.arange(12.0).reshape(3, 4)
    state = {"w": weight, "shadow": {"w": weight}, "table": table, "again": [table]}
    prefix = _save(state, tmp_path, async_save=async_save)
    assert sorted(_stored(prefix)) == ["global_step", "table", "w"]

    # restored into separate objects: every name gets the one stored copy
    w1, w2, t1, t2 = torch.zeros(8, 4), torch.zeros(8, 4), np.zeros((3, 4)), np.zeros((3, 4))
    _restore({"w": w1, "shadow": {"w": w2}, "table": t1, "again": [t2]}, prefix)
    assert torch.equal(w1, weight) and torch.equal(w2, weight)
    assert np.array_equal(t1, table) and np.array_equal(t2, table)

    # and into tied objects, which stay the same object
    tied = torch.zeros(8, 4)
    fresh = {"w": tied, "shadow": {"w": tied}, "table": t1, "again": [t1]}
    _restore(fresh, prefix)
    assert fresh["shadow"]["w"] is tied and torch.equal(tied, weight)


def test_state_dicts_that_share_storage_are_stored_once(tmp_path: Path) -> None:
    model = TiedLM(seed=2)
    # a plain dict of detached tensors (what model.state_dict() returns), and a
    # parameter that a second entry holds itself
    state = {"weights": model.state_dict(), "head": model.lm_head.weight}
    prefix = _save(state, tmp_path)
    assert sorted(_stored(prefix)) == [
        "global_step",
        "weights/body.bias",
        "weights/body.weight",
        "weights/embed.weight",
    ]
    target = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    head = torch.zeros(300, 64)
    _restore({"weights": target, "head": head}, prefix)
    assert torch.equal(target["lm_head.weight"], model.embed.weight)
    assert torch.equal(head, model.embed.weight)


def test_views_of_one_memory_in_another_shape_are_stored_apart(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {"base": base, "row": base[1], "flat": base.view(12), "empty": base[:0], "e": base[:0]}
    prefix = _save(state, tmp_path)
    assert sorted(_stored(prefix)) == ["base", "e", "empty", "flat", "global_step", "row"]
    assert _tree(prefix)["version"] == 2  # nothing tied: readable by older versions
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    _restore(out, prefix)
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_tied_entry_missing_from_the_data_is_reported(tmp_path: Path) -> None:
    weight = torch.ones(3)
    flat = flatten_state({"a": weight, "b": weight})
    assert list(flat.tensors) == ["a"]
    assert flat.tree["root"]["values"][1][5] == {"tied": "a"}
    check_state({"a": weight, "b": weight})  # ties are not two values of one name
    with pytest.raises(ValueError, match="would both be saved as tensor 'a/b'"):
        check_state({"a/b": weight, "a": {"b": weight}})


# --- typed JAX keys ----------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_typed_jax_keys_round_trip_as_keys_of_their_impl(tmp_path: Path, async_save: bool) -> None:
    jax = pytest.importorskip("jax")
    key = jax.random.key(0)
    state = {
        "key": jax.random.fold_in(key, 7),
        "split": jax.random.split(key, 3),
        "rbg": jax.random.key(1, impl="rbg"),
        "old": jax.random.PRNGKey(2),  # an old-style uint32 key
        "in_list": [jax.random.key(3)],
    }
    prefix = _save(state, tmp_path, async_save=async_save)
    stored = _stored(prefix)
    assert stored["key"] == [2] and stored["split"] == [3, 2] and stored["rbg"] == [4]

    fresh = {
        "key": jax.random.key(9),
        "split": jax.random.split(jax.random.key(9), 3),
        "rbg": jax.random.key(9, impl="rbg"),
        "old": jax.random.PRNGKey(9),
        "in_list": [jax.random.key(9)],
    }
    _restore(fresh, prefix)
    for name in ("key", "split", "rbg"):
        assert jax.dtypes.issubdtype(fresh[name].dtype, jax.dtypes.prng_key), name
        assert str(jax.random.key_impl(fresh[name])) == str(jax.random.key_impl(state[name]))
        assert np.array_equal(jax.random.key_data(fresh[name]), jax.random.key_data(state[name]))
    assert fresh["key"].shape == () and fresh["split"].shape == (3,)
    draws = jax.random.normal(fresh["key"], (4,)), jax.random.normal(state["key"], (4,))
    assert np.array_equal(*draws)
    assert fresh["old"].dtype == np.uint32
    assert np.array_equal(fresh["old"], state["old"])
    assert np.array_equal(
        jax.random.key_data(fresh["in_list"][0]), jax.random.key_data(state["in_list"][0])
    )


class KeyHolder:
    """An object whose state dict holds a typed key: restored by building a new one."""

    def __init__(self, seed: int) -> None:
        import jax

        self.key = jax.random.key(seed, impl="rbg")

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.key = state["key"]


def test_typed_keys_in_a_state_dict_are_built_as_keys(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    prefix = _save({"holder": KeyHolder(4)}, tmp_path)
    holder = KeyHolder(5)
    _restore({"holder": holder}, prefix)
    assert str(jax.random.key_impl(holder.key)) == "rbg"
    assert np.array_equal(jax.random.key_data(holder.key), jax.random.key_data(KeyHolder(4).key))


def test_typed_and_old_style_keys_do_not_restore_into_each_other(tmp_path: Path) -> None:
    jax = pytest.importorskip("jax")
    prefix = _save({"a": jax.random.key(0), "b": jax.random.PRNGKey(0)}, tmp_path)
    with pytest.raises(StateMismatchError) as info:
        _restore({"a": jax.random.PRNGKey(1), "b": jax.random.key(1)}, prefix)
    text = str(info.value)
    assert "state['a'] is a U32 array, the checkpoint has a typed JAX key (threefry2x32)" in text
    assert "state['b'] is a JAX key array (threefry2x32), the checkpoint has a U32 array" in text
    with pytest.raises(StateMismatchError, match="is a JAX key array of rbg, the checkpoint"):
        _restore({"a": jax.random.key(1, impl="rbg"), "b": jax.random.PRNGKey(1)}, prefix)


# --- growing dicts of Python values -----------------------------------------------------


def test_a_dict_of_counters_a_run_fills_restores_into_a_fresh_empty_one(tmp_path: Path) -> None:
    seen: dict[str, int] = {}
    counts = collections.Counter[str]()
    by_epoch: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
    state = {"seen": seen, "stats": {"counts": counts, "by_epoch": by_epoch}, "w": np.ones(2)}
    for i, word in enumerate(["a", "b", "a", "c"]):
        seen[word] = seen.get(word, 0) + 1
        counts[word] += 2
        by_epoch[i % 2].append(word)
    prefix = _save(state, tmp_path)

    fresh_seen: dict[str, int] = {"stale": 1}
    fresh_counts = collections.Counter[str]()
    fresh_by_epoch: collections.defaultdict[int, list[str]] = collections.defaultdict(list)
    fresh = {
        "seen": fresh_seen,
        "stats": {"counts": fresh_counts, "by_epoch": fresh_by_epoch},
        "w": np.zeros(2),
    }
    _restore(fresh, prefix)
    assert fresh["seen"] is fresh_seen and fresh_seen == {"a": 2, "b": 1, "c": 1}
    assert fresh["stats"]["counts"] is fresh_counts and fresh_counts == counts
    assert fresh_by_epoch == {0: ["a", "a"], 1: ["b", "c"]}
    fresh_by_epoch[5].append("z")  # still a defaultdict
    assert fresh["w"].tolist() == [1.0, 1.0]


def test_a_dict_holding_arrays_is_still_matched_key_by_key(tmp_path: Path) -> None:
    prefix = _save({"d": {"a": np.ones(2), "n": 1}}, tmp_path)
    with pytest.raises(StateMismatchError, match=r"state\['d'\]\['b'\] is missing"):
        _restore({"d": {"b": np.zeros(2), "n": 1}}, prefix)
    with pytest.raises(
        StateMismatchError,
        match=r"state\['d'\]\['a'\] is a Python int, the checkpoint has an array",
    ):
        _restore({"d": {"a": 0}}, prefix)  # Python data into a dict saved with arrays


def test_the_top_level_of_the_state_is_never_replaced(tmp_path: Path) -> None:
    prefix = _save({"epoch": 3}, tmp_path)
    with pytest.raises(StateMismatchError, match=r"state\['step'\] is missing"):
        _restore({"step": 0}, prefix)


# --- values the state refuses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda: np.random.default_rng(0), "numpy.random.Generator"),
        (lambda: np.random.RandomState(0), "numpy.random.RandomState"),
        (lambda: np.random.PCG64(0), "numpy.random.BitGenerator"),
        (lambda: torch.Generator().manual_seed(0), "torch.Generator"),
    ],
    ids=["Generator", "RandomState", "BitGenerator", "torch"],
)
def test_a_bare_generator_is_refused_at_the_first_save_pointing_at_rng_state(
    tmp_path: Path, make: Any, kind: str
) -> None:
    state = {"w": np.zeros(2), "data": {"rng": make()}}
    with pytest.raises(TypeError) as info:
        Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    text = str(info.value)
    cls = type(state["data"]["rng"]).__qualname__  # type: ignore[index]
    assert text.startswith(f"state['data']['rng'] has unsupported type {cls}: a {kind}")
    assert "is not saved as it is; wrap it in trainhooks.RNGState" in text
    assert "th.RNGState({'data': generator})" in text
    assert not [n for n in os.listdir(tmp_path) if n.startswith("model.ckpt")]
    with pytest.raises(TypeError, match=r"wrap it in trainhooks\.RNGState"):
        check_state(state)


@dataclasses.dataclass
class Config:
    lr: float = 0.1
    layers: int = 2


def test_a_dataclass_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as info:
        Saver().save(Session({"config": Config()}), str(tmp_path / "m"), global_step=1)
    assert str(info.value).startswith("state['config'] has unsupported type Config")
    assert "convert it with dataclasses.asdict(...)" in str(info.value)
    assert "give it state_dict()/load_state_dict()" in str(info.value)
    # the advice works: a dict of its fields round-trips
    prefix = _save({"config": dataclasses.asdict(Config(lr=0.5))}, tmp_path)
    fresh = {"config": dataclasses.asdict(Config())}
    _restore(fresh, prefix)
    assert Config(**fresh["config"]) == Config(lr=0.5)


def test_restoring_into_a_dataclass_reports_the_hint(tmp_path: Path) -> None:
    prefix = _save({"config": {"lr": 0.5, "layers": 2}}, tmp_path)
    with pytest.raises(
        StateMismatchError, match=r"state\['config'\] has unsupported type Config: a dataclass"
    ):
        _restore({"config": Config()}, prefix)
