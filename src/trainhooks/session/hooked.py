"""The session layer that calls hooks around each run (TF's ``_HookedSession``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from trainhooks.session.session import Session

__all__ = ["HookedSession"]


def merge_run_options(into: dict[str, Any], more: Mapping[str, Any]) -> None:
    """Merge a hook's run options the way TF merges ``RunOptions``.

    Numbers take the maximum, booleans are OR'ed, lists are concatenated, and any
    other value is taken from the later hook.
    """
    for key, value in more.items():
        old = into.get(key)
        if old is None:
            into[key] = list(value) if isinstance(value, list) else value
        elif isinstance(old, bool) and isinstance(value, bool):
            into[key] = old or value
        elif isinstance(old, (int, float)) and isinstance(value, (int, float)):
            into[key] = max(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            old.extend(value)
        else:
            into[key] = value


class HookedSession:
    """Runs every hook's ``before_run`` and ``after_run`` around one step of ``sess``.

    ``should_stop()`` becomes True (and stays True) once a hook calls
    ``run_context.request_stop()``; a ``run`` after that raises ``RuntimeError``.
    """

    def __init__(self, sess: Session, hooks: Sequence[SessionRunHook]) -> None:
        self._sess = sess
        self._hooks = list(hooks)
        self._should_stop = False

    @property
    def raw_session(self) -> Session:
        return self._sess

    def should_stop(self) -> bool:
        return self._should_stop

    def close(self) -> None:
        self._sess.close()

    def run(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        if self._should_stop:
            raise RuntimeError("Run called even after should_stop requested.")
        sess = self._sess
        run_context = SessionRunContext(SessionRunArgs(fetches, feed_dict), sess)
        merged_options: dict[str, Any] = dict(options) if options else {}
        hook_fetches: dict[Any, Any] = {}
        feed = self._call_hook_before_run(run_context, hook_fetches, feed_dict, merged_options)
        if run_metadata is None:
            run_metadata = {}
        if hook_fetches:
            actual_fetches: dict[Any, Any] = {"caller": fetches}
            actual_fetches.update(hook_fetches)
            outputs = sess._run_step(actual_fetches, feed, merged_options, run_metadata)
            result = outputs["caller"]
        else:
            # No hook fetches anything (the common case): run the caller's fetches alone.
            outputs = hook_fetches
            result = sess._run_step(fetches, feed, merged_options, run_metadata)
        # Values are immutable, so hooks that fetched nothing can share one.
        no_results = SessionRunValues(None, merged_options, run_metadata)
        for hook in self._hooks:
            hook.after_run(
                run_context,
                SessionRunValues(outputs[hook], merged_options, run_metadata)
                if hook in outputs
                else no_results,
            )
        self._should_stop = self._should_stop or run_context.stop_requested
        return result

    def _call_hook_before_run(
        self,
        run_context: SessionRunContext,
        hook_fetches: dict[Any, Any],
        user_feed_dict: Mapping[str, Any] | None,
        options: dict[str, Any],
    ) -> Mapping[str, Any] | None:
        hook_feeds: dict[str, Any] = {}
        for hook in self._hooks:
            request = hook.before_run(run_context)
            if request is None:
                continue
            if request.fetches is not None:
                hook_fetches[hook] = request.fetches
            if request.feed_dict:
                _raise_if_feeds_intersect(
                    hook_feeds, request.feed_dict, "Same tensor is fed by two hooks."
                )
                hook_feeds.update(request.feed_dict)
            if request.options:
                merge_run_options(options, request.options)
        if not hook_feeds:
            return user_feed_dict
        if not user_feed_dict:
            return hook_feeds
        _raise_if_feeds_intersect(
            user_feed_dict, hook_feeds, "Same tensor is fed by a SessionRunHook and user."
        )
        merged = dict(user_feed_dict)
        merged.update(hook_feeds)
        return merged


def _raise_if_feeds_intersect(
    feeds1: Mapping[str, Any], feeds2: Mapping[str, Any], message: str
) -> None:
    intersection = set(feeds1) & set(feeds2)
    if intersection:
        raise RuntimeError(f"{message} Conflict(s): {sorted(intersection)}")
