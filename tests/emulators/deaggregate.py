#!/usr/bin/env python3
"""Read a whole Kinesis stream and de-aggregate its KPL records with the reference library.

    deaggregate.py --endpoint http://127.0.0.1:5000 --stream NAME [--region us-east-1]

Reads every shard from TRIM_HORIZON to its end and prints one JSON document:

    {"shards": [{"id", "starting_hash_key", "ending_hash_key"}],
     "kinesis_records": [{"shard", "sequence_number", "partition_key", "explicit_hash_key",
                          "aggregated", "md5_valid", "user_records", "bytes"}],
     "user_records": [{"shard", "sequence_number", "sub_sequence_number", "partition_key",
                       "explicit_hash_key", "data_base64"}]}

The splitting is done by aws_kinesis_agg (the KPL's reference de-aggregator for Python);
this script only reads the stream and reports what it gives. A Kinesis record is
`aggregated` when its data starts with the KPL magic F3 89 9A C2; `md5_valid` then says
whether its last 16 bytes are the MD5 of the protobuf between them (null for other
records). The reference passes an aggregate whose MD5 does not match through whole, as one
plain user record, and so does the output.

GetRecords does not return explicit hash keys, so a Kinesis record's is always null. A
user record's comes from its aggregate's table as the reference reads it: it ignores
whether a user record has an index, so in an aggregate with any explicit hash key, user
records without one get the table's first.

Credentials are the fake `testing`/`testing` unless the usual AWS_* variables say
otherwise. Exits 1 with a message if the stream cannot be read. Works against moto and
kinesalite.
"""

import argparse
import base64
import hashlib
import json
import os
import sys
import time

import boto3
from botocore.exceptions import BotoCoreError, ClientError
from aws_kinesis_agg import DIGEST_SIZE, MAGIC
from aws_kinesis_agg.deaggregator import iter_deaggregate_records

# Empty GetRecords pages in a row after which a shard counts as read even though
# MillisBehindLatest is not yet 0.
EMPTY_READS_TO_GIVE_UP = 5
EMPTY_READ_PAUSE_S = 0.1


def client(endpoint, region):
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    )


def list_shards(kinesis, stream):
    """Every shard of the stream, all ListShards pages."""
    shards, kwargs = [], {"StreamName": stream}
    while True:
        page = kinesis.list_shards(**kwargs)
        shards.extend(page["Shards"])
        if not page.get("NextToken"):
            return shards
        kwargs = {"NextToken": page["NextToken"]}


def read_shard(kinesis, stream, shard_id):
    """Every record of one shard, from TRIM_HORIZON until the shard is read to its end."""
    iterator = kinesis.get_shard_iterator(
        StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records, empty_reads = [], 0
    while iterator:
        page = kinesis.get_records(ShardIterator=iterator)
        records.extend(page["Records"])
        iterator = page.get("NextShardIterator")
        if page["Records"]:
            empty_reads = 0
            continue
        empty_reads += 1
        if page.get("MillisBehindLatest", 0) == 0 or empty_reads >= EMPTY_READS_TO_GIVE_UP:
            break
        time.sleep(EMPTY_READ_PAUSE_S)
    return records


def md5_valid(data):
    """For data with the KPL magic: do its last 16 bytes match the MD5 of the protobuf?"""
    if not data.startswith(MAGIC):
        return None
    body = data[len(MAGIC):]
    if len(body) < DIGEST_SIZE:
        return False
    protobuf, digest = body[:-DIGEST_SIZE], body[-DIGEST_SIZE:]
    return hashlib.md5(protobuf).digest() == digest


def user_records_of(record):
    """The reference de-aggregator's user records for one GetRecords record."""
    result = []
    for user in iter_deaggregate_records([record], data_format="Boto3"):
        fields = user["kinesis"]
        # User records split from an aggregate carry base64 data and `aggregated`;
        # a record passed through whole keeps its raw bytes.
        split = fields.get("aggregated", False)
        data = base64.b64decode(fields["data"]) if split else fields["data"]
        result.append(
            {
                "sub_sequence_number": fields.get("subSequenceNumber", 0),
                "partition_key": fields["partitionKey"],
                "explicit_hash_key": fields.get("explicitHashKey"),
                "data": data,
            }
        )
    return result


def read_stream(kinesis, stream):
    """The JSON document described at the top of this file."""
    report = {"shards": [], "kinesis_records": [], "user_records": []}
    for shard in list_shards(kinesis, stream):
        shard_id = shard["ShardId"]
        report["shards"].append(
            {
                "id": shard_id,
                "starting_hash_key": shard["HashKeyRange"]["StartingHashKey"],
                "ending_hash_key": shard["HashKeyRange"]["EndingHashKey"],
            }
        )
        for record in read_shard(kinesis, stream, shard_id):
            users = user_records_of(record)
            report["kinesis_records"].append(
                {
                    "shard": shard_id,
                    "sequence_number": record["SequenceNumber"],
                    "partition_key": record["PartitionKey"],
                    "explicit_hash_key": record.get("ExplicitHashKey"),
                    "aggregated": record["Data"].startswith(MAGIC),
                    "md5_valid": md5_valid(record["Data"]),
                    "user_records": len(users),
                    "bytes": len(record["Data"]),
                }
            )
            for user in users:
                report["user_records"].append(
                    {
                        "shard": shard_id,
                        "sequence_number": record["SequenceNumber"],
                        "sub_sequence_number": user["sub_sequence_number"],
                        "partition_key": user["partition_key"],
                        "explicit_hash_key": user["explicit_hash_key"],
                        "data_base64": base64.b64encode(user["data"]).decode("ascii"),
                    }
                )
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="e.g. http://127.0.0.1:5000")
    parser.add_argument("--stream", required=True, help="stream name")
    parser.add_argument("--region", default="us-east-1", help="default: us-east-1")
    args = parser.parse_args()
    try:
        report = read_stream(client(args.endpoint, args.region), args.stream)
    except (BotoCoreError, ClientError) as error:
        print(f"deaggregate.py: {error}", file=sys.stderr)
        return 1
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
