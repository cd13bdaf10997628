"""Coverage-guided fuzz target (atheris) for reading hostile checkpoints.

Each input is split into a manifest and a data file, written as a checkpoint directory,
opened, verified and read tensor by tensor. Only the library's errors may come out;
anything else (an IndexError, a RecursionError, a hang, a crash) is a finding. Half of
the inputs get their manifest resealed (its checksum recomputed), so the fuzzer reaches
the schema checks behind the checksum, as a forger would.

Run (atheris is the optional ``fuzz`` extra: ``pip install -e '.[fuzz]'``)::

    .venv/bin/python fuzz/fuzz_checkpoint.py -runs=200000            # a fixed budget
    .venv/bin/python fuzz/fuzz_checkpoint.py -max_total_time=600 corpus/

The seed corpus is a real checkpoint, built on start.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import atheris
import numpy as np

with atheris.instrument_imports(include=["trainhooks"]):
    from trainhooks import errors
    from trainhooks.checkpoint.format.opening import open_checkpoint
    from trainhooks.checkpoint.format.manifest import MANIFEST_NAME, seal_manifest
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.session import Session

DATA = "data-00000-of-00001.safetensors"
WORK = tempfile.mkdtemp(prefix="trainhooks-fuzz-")
PREFIX = os.path.join(WORK, "m-1")


def _write(name: str, data: bytes) -> None:
    with open(os.path.join(PREFIX, name), "wb") as f:
        f.write(data)


def seed_input() -> bytes:
    """A valid checkpoint as one input: 4-byte manifest length, manifest, data file."""
    d = tempfile.mkdtemp(dir=WORK)
    state = {"w": np.arange(6, dtype=np.float32), "s": "x", "n": [1, 2]}
    Saver().save(Session(state, global_step=1), os.path.join(d, "m"), global_step=1)
    with open(os.path.join(d, "m-1", MANIFEST_NAME), "rb") as f:
        manifest = f.read()
    with open(os.path.join(d, "m-1", DATA), "rb") as f:
        data = f.read()
    shutil.rmtree(d)
    return len(manifest).to_bytes(4, "little") + manifest + data


def test_one_input(raw: bytes) -> None:
    # Byte 0: reseal or not; bytes 1-4: the manifest's length; then manifest, data file.
    reseal = bool(raw[:1] and raw[0] & 1)
    length = int.from_bytes(raw[1:5], "little")
    manifest, data = raw[5 : 5 + length], raw[5 + length :]
    if reseal:
        text = manifest.rsplit(b',"manifest_checksum"', 1)[0]
        if text.startswith(b"{"):
            manifest = seal_manifest(text if text.endswith(b"}") else text + b"}")
    shutil.rmtree(PREFIX, ignore_errors=True)
    os.mkdir(PREFIX)
    _write(MANIFEST_NAME, manifest)
    _write(DATA, data)
    try:
        with open_checkpoint(PREFIX) as ckpt:
            ckpt.verify()
            for name in ckpt.names:
                ckpt.tensor_data(name)
            json.dumps(ckpt.tree)
    except errors.Error:
        pass


def main() -> None:
    corpus = os.path.join(WORK, "seed")
    os.mkdir(corpus)
    with open(os.path.join(corpus, "valid"), "wb") as f:
        f.write(b"\x01" + seed_input())
    args = [*sys.argv, corpus] if not any(not a.startswith("-") for a in sys.argv[1:]) else sys.argv
    atheris.Setup(args, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
