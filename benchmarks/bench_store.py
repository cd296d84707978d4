"""Publish and download throughput of an artifact on the store, beside a plain ``cp -r`` of the same files.

Backends: a local directory store, and S3 through boto3 against moto's S3 server on 127.0.0.1 (in-process, so
the S3 numbers measure lsaq + boto3 + HTTP + moto, not a network). Each figure is the best of ``--repeat`` runs
into fresh locations; the files are in the page cache after the first read (all numbers are warm-cache).

    .venv/bin/python benchmarks/bench_store.py /tmp/work/emb/art_int8 [--repeat 3]

Publish hashes every file (it refuses a corrupt artifact) and uploads it; download fetches, checks size and
sha256 of every file and renames the directory into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from lsaq.quantization.record import Artifact
from lsaq.store.stage import download, open_store, publish

MiB = 2**20


def best(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", help="artifact directory from `lsaq quantize`")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    src = Path(args.artifact)
    art = Artifact.load(src)
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    print(f"artifact {src}: {len([p for p in src.iterdir() if p.is_file()])} files, {size / MiB:.1f} MiB "
          f"(model.safetensors {art.files['model.safetensors'][0] / MiB:.1f} MiB)")

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = Path(tempfile.mkdtemp(prefix="lsaq-bench-store-"))
    try:
        endpoint = "http://%s:%d" % server.get_host_and_port()
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        rows = []
        rows.append(("cp -r (plain copy)", best(lambda i: subprocess.run(["cp", "-r", str(src), str(tmp / f"cp{i}")],
                                                                           check=True), args.repeat)))

        def cp_fsync(i: int) -> None:  # what publishing to a local store also does: make the copy durable
            dest = tmp / f"cpf{i}"
            subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
            for p in dest.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())

        rows.append(("cp -r + fsync", best(cp_fsync, args.repeat)))
        for kind in ("local", "s3 (moto)"):
            stores = []
            for i in range(args.repeat):
                if kind == "local":
                    stores.append(open_store(tmp / f"store{i}"))
                else:
                    bucket = f"bench-{uuid.uuid4().hex[:12]}"
                    client.create_bucket(Bucket=bucket)
                    stores.append(open_store(f"s3://{bucket}/lsaq", endpoint_url=endpoint))
            rows.append((f"publish to {kind}", best(lambda i: publish(stores[i], src), args.repeat)))
            rows.append((f"download from {kind}", best(
                lambda i: download(stores[i], tmp / f"dl-{kind[:2]}{i}", model=art.model.id), args.repeat)))
        for name, seconds in rows:
            print(f"{name:28s} {seconds:7.3f} s  {size / MiB / seconds:8.1f} MiB/s")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
