"""moto's server, as the tests run it: `python3 moto_server.py -H HOST -p PORT`.

It is moto's own server (`moto.server.main`) with two changes; everything else
is moto as released.

Serialised appends. moto numbers a shard's records without a lock
(`Shard.put_record` says it "is not safe for concurrency"): two PutRecords
requests handled at once by its threaded server can give two records the same
sequence number, and one overwrites the other. ksm sends several PutRecords
requests at once, as it may against Kinesis, so the tests serialise that step.

Large records. A Kinesis stream has a maximum record size, MaxRecordSizeInKiB:
1024 by default, changed with the UpdateMaxRecordSize action to any value in
1024..=10240, and shown by DescribeStreamSummary. Above 1024 KiB a record (data
plus partition key) may be as large as that limit and one PutRecords request
may carry 10 MiB; otherwise the limits are 1 MiB per record and 5 MiB per
request. moto 5.2.1 lacks the action and the field, and applies the 1 MiB and
5 MiB limits to PutRecords only. So this wrapper adds UpdateMaxRecordSize (the
stream named by StreamARN, or by StreamName for convenience; the change takes
effect at once, the stream never shows UPDATING), the field in
DescribeStreamSummary and CreateStream, and each stream's own limits in
PutRecords and PutRecord, refused with moto's error types and messages carrying
that limit.
"""

import sys
import threading
from base64 import b64decode

from moto.core.exceptions import JsonRESTError
from moto.kinesis import exceptions, models, responses
from moto.server import main

# --- serialised appends -----------------------------------------------------------

_APPEND = threading.Lock()
_put_record = models.Shard.put_record


def _put_record_locked(self, *args, **kwargs):
    with _APPEND:
        return _put_record(self, *args, **kwargs)


models.Shard.put_record = _put_record_locked

# --- large records ----------------------------------------------------------------

DEFAULT_MAX_RECORD_KIB = 1024
LARGEST_MAX_RECORD_KIB = 10240
MIB = 1024 * 1024


def record_limit_bytes(stream):
    """Largest record (data plus partition key) the stream accepts."""
    return stream.max_record_size_kib * 1024


def request_limit_mib(stream):
    """Largest PutRecords request, in MiB: 10 once records may exceed 1 MiB, else 5."""
    return 10 if stream.max_record_size_kib > DEFAULT_MAX_RECORD_KIB else 5


def record_size(data_base64, partition_key):
    """Bytes Kinesis counts for one record: decoded data plus partition key."""
    return len(b64decode(data_base64 or "")) + len((partition_key or "").encode("utf-8"))


class RecordTooLarge(exceptions.RecordSizeExceedsLimit):
    """moto's RecordSizeExceedsLimit, naming the stream's limit and the field."""

    def __init__(self, field, limit_bytes):
        JsonRESTError.__init__(
            self,
            error_type="ValidationException",
            message=f"1 validation error detected: Value at '{field}' failed to satisfy "
            f"constraint: Member must have length less than or equal to {limit_bytes}",
        )


class RequestTooLarge(exceptions.TotalRecordsSizeExceedsLimit):
    """moto's TotalRecordsSizeExceedsLimit, naming the stream's limit."""

    def __init__(self, limit_mib):
        JsonRESTError.__init__(
            self,
            error_type="InvalidArgumentException",
            message=f"Records size exceeds {limit_mib} MB limit",
        )


class InvalidMaxRecordSize(JsonRESTError):
    """ValidationException for a MaxRecordSizeInKiB that is missing or out of range."""

    def __init__(self, value):
        if value is None:
            value_text, constraint = "null", "Member must not be null"
        elif not isinstance(value, int) or isinstance(value, bool):
            value_text, constraint = f"'{value}'", "Member must be an integer"
        elif value < DEFAULT_MAX_RECORD_KIB:
            value_text = f"'{value}'"
            constraint = f"Member must have value greater than or equal to {DEFAULT_MAX_RECORD_KIB}"
        else:
            value_text = f"'{value}'"
            constraint = f"Member must have value less than or equal to {LARGEST_MAX_RECORD_KIB}"
        super().__init__(
            error_type="ValidationException",
            message=f"1 validation error detected: Value {value_text} at 'maxRecordSizeInKiB' "
            f"failed to satisfy constraint: {constraint}",
        )


_stream_init = models.Stream.__init__
_stream_summary = models.Stream.to_json_summary
_backend_put_record = models.KinesisBackend.put_record
_create_stream_action = responses.KinesisResponse.create_stream


def _stream_init_with_record_limit(self, *args, **kwargs):
    """Stream.__init__, and the stream starts at the default limit."""
    _stream_init(self, *args, **kwargs)
    self.max_record_size_kib = DEFAULT_MAX_RECORD_KIB


def _stream_summary_with_record_limit(self):
    """Stream.to_json_summary with MaxRecordSizeInKiB."""
    summary = _stream_summary(self)
    summary["StreamDescriptionSummary"]["MaxRecordSizeInKiB"] = self.max_record_size_kib
    return summary


def check_max_record_size(value):
    """Raise InvalidMaxRecordSize unless value is an integer in 1024..=10240."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not DEFAULT_MAX_RECORD_KIB <= value <= LARGEST_MAX_RECORD_KIB
    ):
        raise InvalidMaxRecordSize(value)


def update_max_record_size(self, stream_arn, stream_name, max_record_size_kib):
    """KinesisBackend: set a stream's MaxRecordSizeInKiB."""
    check_max_record_size(max_record_size_kib)
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    stream.max_record_size_kib = max_record_size_kib


def _put_record_within_limit(
    self, stream_arn, stream_name, partition_key, explicit_hash_key, data
):
    """KinesisBackend.put_record, refusing a record over the stream's limit."""
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    if record_size(data, partition_key) > record_limit_bytes(stream):
        raise RecordTooLarge("data", record_limit_bytes(stream))
    return _backend_put_record(
        self, stream_arn, stream_name, partition_key, explicit_hash_key, data
    )


def _put_records_within_limits(self, stream_arn, stream_name, records):
    """KinesisBackend.put_records with the stream's limits instead of fixed ones."""
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    if len(records) > 500:
        raise exceptions.TooManyRecords
    sizes = [record_size(r.get("Data"), r.get("PartitionKey")) for r in records]
    if sum(sizes) > request_limit_mib(stream) * MIB:
        raise RequestTooLarge(request_limit_mib(stream))
    for position, size in enumerate(sizes, start=1):
        if size > record_limit_bytes(stream):
            raise RecordTooLarge(f"records.{position}.member.data", record_limit_bytes(stream))
    results = []
    for record in records:
        sequence_number, shard_id = stream.put_record(
            record.get("PartitionKey"), record.get("ExplicitHashKey"), record.get("Data")
        )
        results.append({"SequenceNumber": sequence_number, "ShardId": shard_id})
    return {"FailedRecordCount": 0, "Records": results}


def _create_stream_with_record_limit(self):
    """KinesisResponse: CreateStream, also taking MaxRecordSizeInKiB as Kinesis does."""
    max_record_size_kib = self._get_param("MaxRecordSizeInKiB")
    if max_record_size_kib is not None:
        check_max_record_size(max_record_size_kib)
    result = _create_stream_action(self)
    if max_record_size_kib is not None:
        self.kinesis_backend.update_max_record_size(
            None, self._get_param("StreamName"), max_record_size_kib
        )
    return result


def _update_max_record_size_action(self):
    """KinesisResponse: the UpdateMaxRecordSize action; answers 200 with an empty body."""
    self.kinesis_backend.update_max_record_size(
        self._get_param("StreamARN"),
        self._get_param("StreamName"),
        self._get_param("MaxRecordSizeInKiB"),
    )
    # An empty body, as Kinesis sends; moto's EmptyResult would send "{}".
    return "", {"Content-Type": "application/x-amz-json-1.1"}


models.Stream.__init__ = _stream_init_with_record_limit
models.Stream.to_json_summary = _stream_summary_with_record_limit
models.KinesisBackend.update_max_record_size = update_max_record_size
models.KinesisBackend.put_record = _put_record_within_limit
models.KinesisBackend.put_records = _put_records_within_limits
responses.KinesisResponse.create_stream = _create_stream_with_record_limit
# moto calls the method named after the action in snake case.
responses.KinesisResponse.update_max_record_size = _update_max_record_size_action


def require_botocore_with_record_limits():
    """Exit unless botocore knows MaxRecordSizeInKiB (1.40.60 on).

    moto answers through botocore's description of Kinesis and drops any field
    it does not list, so an older botocore would hide MaxRecordSizeInKiB.
    """
    import botocore
    from moto.core.utils import get_service_model

    if "UpdateMaxRecordSize" not in get_service_model("kinesis").operation_names:
        sys.exit(
            f"moto_server.py: botocore {botocore.__version__} does not know "
            "MaxRecordSizeInKiB; install botocore>=1.40.60 (scripts/setup.sh does)"
        )


if __name__ == "__main__":
    require_botocore_with_record_limits()
    main(sys.argv[1:])
