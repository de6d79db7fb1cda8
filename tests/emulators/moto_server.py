"""moto's server, as the tests run it: `python3 moto_server.py -H HOST -p PORT`.

It is moto's own server (`moto.server.main`) with one fix. moto numbers a
shard's records without a lock (`Shard.put_record` says it "is not safe for
concurrency"): two PutRecords requests handled at once by its threaded server
can give two records the same sequence number, and one overwrites the other.
ksm sends several PutRecords requests at once, as it may against Kinesis, so
the tests serialise that one step; everything else is moto as released.
"""

import sys
import threading

from moto.kinesis import models
from moto.server import main

_APPEND = threading.Lock()
_put_record = models.Shard.put_record


def _put_record_locked(self, *args, **kwargs):
    with _APPEND:
        return _put_record(self, *args, **kwargs)


models.Shard.put_record = _put_record_locked

if __name__ == "__main__":
    main(sys.argv[1:])
