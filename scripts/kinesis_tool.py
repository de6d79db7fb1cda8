#!/usr/bin/env python3
"""Create a Kinesis stream in an emulator and read back what landed in it.

Used by scripts/quickstart.sh against moto; works against any endpoint that speaks Kinesis.
Credentials are the fake `testing`/`testing` and the region is us-east-1 unless the usual
AWS_* variables say otherwise.

    kinesis_tool.py --endpoint http://127.0.0.1:5000 create-stream ksm-quickstart --shards 2
    kinesis_tool.py --endpoint http://127.0.0.1:5000 read ksm-quickstart --wait-for 5

`read` prints one line per record, grouped by shard in sequence order:

    <shard-id> <partition-key> <data>

where data is the UTF-8 text with non-printable bytes escaped (\\xNN).
"""

import argparse
import os
import sys
import time

import boto3


def client(endpoint):
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )


def create_stream(kinesis, name, shards, timeout):
    kinesis.create_stream(StreamName=name, ShardCount=shards)
    deadline = time.monotonic() + timeout
    while True:
        status = kinesis.describe_stream(StreamName=name)["StreamDescription"]["StreamStatus"]
        if status == "ACTIVE":
            print(f"stream {name}: ACTIVE with {shards} shard(s)")
            return
        if time.monotonic() > deadline:
            sys.exit(f"stream {name} is still {status} after {timeout}s")
        time.sleep(0.1)


def shard_ids(kinesis, name):
    ids = []
    while True:
        kwargs = {"StreamName": name}
        if ids:
            kwargs["ExclusiveStartShardId"] = ids[-1]
        description = kinesis.describe_stream(**kwargs)["StreamDescription"]
        ids.extend(shard["ShardId"] for shard in description["Shards"])
        if not description.get("HasMoreShards") or not description["Shards"]:
            return ids


def read_all(kinesis, name):
    """Every record of every shard, from TRIM_HORIZON until a page comes back empty."""
    records = []
    for shard in shard_ids(kinesis, name):
        iterator = kinesis.get_shard_iterator(
            StreamName=name, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        ).get("ShardIterator")
        while iterator:
            page = kinesis.get_records(ShardIterator=iterator)
            if not page["Records"]:
                break
            records.extend((shard, r["PartitionKey"], r["Data"]) for r in page["Records"])
            iterator = page.get("NextShardIterator")
    return records


def printable(data):
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:5000")
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create-stream", help="create a stream and wait until ACTIVE")
    create.add_argument("name")
    create.add_argument("--shards", type=int, default=1)
    create.add_argument("--timeout", type=float, default=30)

    read = commands.add_parser("read", help="print every record: shard partition-key data")
    read.add_argument("name")
    read.add_argument(
        "--wait-for", type=int, default=0, metavar="N",
        help="poll until at least N records are there (exit 1 if not within --timeout)",
    )
    read.add_argument("--timeout", type=float, default=30)

    args = parser.parse_args()
    kinesis = client(args.endpoint)
    if args.command == "create-stream":
        create_stream(kinesis, args.name, args.shards, args.timeout)
        return 0

    deadline = time.monotonic() + args.timeout
    records = read_all(kinesis, args.name)
    while len(records) < args.wait_for and time.monotonic() < deadline:
        time.sleep(0.5)
        records = read_all(kinesis, args.name)
    for shard, key, data in records:
        print(f"{shard} {key} {printable(data)}")
    if len(records) < args.wait_for:
        print(
            f"only {len(records)} of {args.wait_for} records after {args.timeout}s",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
