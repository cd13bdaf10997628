"""What a save derives from the state's structure alone, kept for the next save of the same.

Most of a save of many small tensors is spent on its structure, not its bytes: naming
the tensors, sizing them, planning the data files, encoding their headers and the
manifest's columns (~1 us per tensor each). A training loop saves the same structure
over and over, so a :class:`SaveCache` (one per ``Saver``) keeps all of that and a save
whose tensors have the same names, dtype codes and shapes as the last one (compared
whole: ~10 ms for 100k tensors, in C) reuses it. Only the bytes and their checksums are
taken afresh, and the tree is walked again (its lists that the flatten memo shares keep
their JSON); a state whose tensors changed in any other way is planned anew.

Nothing here holds an array: the sources of each save are its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from trainhooks.checkpoint.format.bulk_json import Texts
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.datafile import FileLayout, plan_data_file, plan_files
from trainhooks.checkpoint.format.manifest import FileEntry
from trainhooks.checkpoint.state.tree_flatten import PlainDict

__all__ = ["Layout", "SaveCache", "plan_layout"]


class Layout(NamedTuple):
    """The plan of one save's data files, for tensors of given names, codes and shapes.

    ``names``, ``codes`` and ``shapes`` are the flattened state's columns it was made for
    (the global step not included), ``max_file_bytes`` and ``world_size`` the save's
    arguments; ``sizes`` and ``groups`` are ``plan_files``'s for the
    columns as written (the global step first); ``files`` each data file's
    ``FileLayout`` by its index in ``groups``, filled as the files are written.
    """

    names: list[str]
    codes: list[str]
    shapes: list[tuple[int, ...]]
    max_file_bytes: int
    world_size: int
    sizes: list[int]
    groups: list[Sequence[int]]
    files: dict[int, FileLayout]

    def file(self, index: int, columns: TensorColumns) -> FileLayout:
        """Data file ``index``'s layout, planned on first use."""
        layout = self.files.get(index)
        if layout is None:
            layout = self.files[index] = plan_data_file(columns, self.groups[index], self.sizes)
        return layout


def plan_layout(
    flat: TensorColumns, written: TensorColumns, max_file_bytes: int, world_size: int
) -> Layout:
    """A new :class:`Layout` for the flattened columns ``flat``, written as ``written``."""
    sizes = written.nbytes()
    target = max_file_bytes
    if world_size > 1:
        # At least one data file per rank, so that every rank writes about 1/N.
        share = -(-sum(sizes) // world_size)
        target = max(1, min(max_file_bytes, share))
    groups = plan_files(written, sizes, target)
    return Layout(
        flat.names, flat.codes, flat.shapes, max_file_bytes, world_size, sizes, groups, {}
    )


class SaveCache:
    """A saver's memory of its last save's structure (see the module docstring).

    ``flatten`` is ``tree.flatten_state``'s memo (dicts of plain arrays), whose lists
    the state tree shares, and :meth:`tree_texts` their JSON; :meth:`layout` returns
    the data files' plan; ``manifest_heads`` is ``manifest.encode_manifest``'s memo of
    each file's entry. One save at a time uses it (a saver's saves are serial).

    Example:
        >>> import numpy as np
        >>> cols = TensorColumns(["w"], ["F32"], [(2,)], [np.zeros(2, np.float32)])
        >>> cache = SaveCache()
        >>> cache.layout(cols, 1024, 1) is None
        True
    """

    def __init__(self) -> None:
        self.flatten: dict[str, PlainDict] = {}
        self.manifest_heads: dict[int, tuple[FileEntry, bytes]] = {}
        self._last: Layout | None = None
        self._texts: Texts = {}

    def tree_texts(self) -> Texts:
        """``bulk_json.dumps``'s ``texts`` for the lists of the flatten memo, which are never
        modified: the text of a list the last save's tree had too is kept."""
        old, new = self._texts, {}
        for plan in self.flatten.values():
            for items in (plan.keys, plan.nodes):
                known = old.get(id(items))
                new[id(items)] = known if known is not None and known[0] is items else (items, None)
        self._texts = new
        return new

    def layout(self, flat: TensorColumns, max_file_bytes: int, world_size: int) -> Layout | None:
        """The last save's layout if ``flat`` has its names, dtype codes and shapes (and the
        save the same file size and world), else None."""
        last = self._last
        if (
            last is not None
            and last.world_size == world_size
            and last.max_file_bytes == max_file_bytes
            and last.names == flat.names
            and last.codes == flat.codes
            and last.shapes == flat.shapes
        ):
            return last
        return None

    def keep(self, layout: Layout) -> None:
        """Remember ``layout`` for the next save (what was kept for another is dropped)."""
        if layout is not self._last:
            self._last = layout
            self.manifest_heads.clear()

    def clear(self) -> None:
        """Forget everything (``Saver.close``)."""
        self.flatten.clear()
        self.manifest_heads.clear()
        self._last = None
        self._texts = {}
