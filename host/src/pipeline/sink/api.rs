//! The seam between a sink and Kinesis: the two calls a sink makes, with
//! the SDK client as the production implementation, so that the sink loop
//! can also be tested in process (with paused time) beside the tests
//! against real emulators.

use std::future::Future;
use std::pin::Pin;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use super::shards::{self, ListShardsError, ShardMap};

/// A boxed future that owns what it needs.
pub type Pending<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a PutRecords call answered.
pub type PutRecordsAnswer = Result<PutRecordsOutput, SdkError<PutRecordsError>>;

/// The Kinesis calls a sink makes.
pub trait KinesisApi: Send + Sync + 'static {
    /// One PutRecords request of `entries` to `stream`.
    fn put(&self, stream: &str, entries: Vec<PutRecordsRequestEntry>) -> Pending<PutRecordsAnswer>;

    /// The open shards of `stream`.
    fn open_shards(&self, stream: &str) -> Pending<Result<ShardMap, ListShardsError>>;
}

impl KinesisApi for Client {
    fn put(&self, stream: &str, entries: Vec<PutRecordsRequestEntry>) -> Pending<PutRecordsAnswer> {
        let request = self
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries));
        Box::pin(request.send())
    }

    fn open_shards(&self, stream: &str) -> Pending<Result<ShardMap, ListShardsError>> {
        let client = self.clone();
        let stream = stream.to_owned();
        Box::pin(async move { shards::list_open_shards(&client, &stream).await })
    }
}
