"""A volunteer's upload through its job's slot: the presigned POST form against a presigned PUT.

Usage::

    python bench/slot_upload.py [--mib 64,256] [--repeats 3]

Upload slots are presigned POST forms (``ObjectStore.upload_slot``, ``send_to_slot``) so
the store itself caps each upload at the run's bound; a presigned PUT URL, what slots were
before, cannot cap the size. This measures what the form costs: for each size,
``--repeats`` pairs in alternating order, one blob of random bytes is sent through a fresh
slot (``multipart/form-data``, streamed) and through a presigned PUT of the same bytes,
both by ``urllib`` from this process, to one SeaweedFS ``weed server -s3`` on loopback
(``tests/fixtures/objects.py``). Seconds cover the request only; each object is read back
and its sha256 compared. Medians, min-max in brackets; the ratio is POST over PUT.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "crowdtrain-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", default="64,256", help="blob sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="POST/PUT pairs per size, alternating")
    args = parser.parse_args()

    from broker.objects import Location, ObjectStore
    from broker.transfer import send_to_slot
    from tests.fixtures.objects import SeaweedServer

    with tempfile.TemporaryDirectory() as folder:
        weed = SeaweedServer(Path(folder) / "seaweed").start()
        try:
            weed.make_bucket(BUCKET)
            os.environ.update(weed.env())
            store = ObjectStore(Location.parse(f"s3://{BUCKET}/bench"))
            check = weed.client()

            def post(data: bytes, n: int) -> tuple[float, str]:
                slot = store.upload_slot("r", 1, n, len(data))
                began = time.perf_counter()
                send_to_slot(slot, data)
                return time.perf_counter() - began, slot["object"]

            def put(data: bytes, n: int) -> tuple[float, str]:
                name = f"bench/put/{n}"
                url = store.client.generate_presigned_url(
                    "put_object", Params={"Bucket": BUCKET, "Key": name}, ExpiresIn=600
                )
                request = urllib.request.Request(url, data=data, method="PUT")
                began = time.perf_counter()
                with urllib.request.urlopen(request) as response:
                    response.read()
                return time.perf_counter() - began, name

            print(
                f"Slot upload bench: {args.repeats} POST/PUT pairs per size (alternating), SeaweedFS "
                f"on loopback, {os.cpu_count()} cores. Seconds: median (min-max).\n"
            )
            print("| MiB | POST form s | PUT URL s | POST / PUT |")
            print("|---:|---:|---:|---:|")
            for mib in (int(x) for x in args.mib.split(",")):
                data = os.urandom(mib << 20)
                digest = hashlib.sha256(data).digest()
                times: dict[str, list[float]] = {"post": [], "put": []}
                for n in range(args.repeats):
                    order = [("post", post), ("put", put)]
                    for kind, send in order if n % 2 == 0 else order[::-1]:
                        seconds, name = send(data, n)
                        body = check.get_object(Bucket=BUCKET, Key=name)["Body"].read()
                        assert hashlib.sha256(body).digest() == digest, f"{kind} stored other bytes"
                        check.delete_object(Bucket=BUCKET, Key=name)
                        times[kind].append(seconds)
                med = {kind: sorted(values)[len(values) // 2] for kind, values in times.items()}
                spans = {kind: f"{min(v):.2f}-{max(v):.2f}" for kind, v in times.items()}
                print(
                    f"| {mib} | {med['post']:.2f} ({spans['post']}) | {med['put']:.2f} ({spans['put']}) "
                    f"| **{med['post'] / med['put']:.2f}x** |"
                )
        finally:
            weed.stop()


if __name__ == "__main__":
    main()
