//! Kinesis (and STS) against an emulator: SDK clients with fake credentials, the environment
//! for a host process, stream creation, and reading back every record that landed.

use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::Credentials;
use aws_sdk_kinesis::error::DisplayErrorContext;
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};

/// The fake access key id (and secret) every test client and host process uses.
pub const TEST_ACCESS_KEY: &str = "testing";

/// The fake secret access key.
pub const TEST_SECRET_KEY: &str = "testing";

/// The region every test uses.
pub const TEST_REGION: &str = "us-east-1";

/// How long [`create_stream`] waits for a stream to become `ACTIVE`.
const STREAM_ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most `GetRecords` pages read from one shard in one [`read_all_records`] call.
const MAX_PAGES_PER_SHARD: usize = 10_000;

/// The SDK configuration for an emulator at `endpoint`: static credentials
/// `testing`/`testing`, region `us-east-1`, nothing read from the environment or `~/.aws`
/// that could reach real AWS.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            TEST_ACCESS_KEY,
            TEST_SECRET_KEY,
            None,
            None,
            "ksm-tests",
        ))
        .region(Region::new(TEST_REGION))
        .load()
        .await
}

/// A Kinesis client for the emulator (or [`crate::RecordingProxy`]) at `endpoint`.
pub async fn client(endpoint: &str) -> Client {
    Client::new(&sdk_config(endpoint).await)
}

/// An STS client for the emulator (or proxy) at `endpoint`.
pub async fn sts_client(endpoint: &str) -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::new(&sdk_config(endpoint).await)
}

/// The environment for a host process (`ksm run`) that must talk to emulators only: fake
/// static credentials, region `us-east-1`, the Kinesis and STS endpoints set through the
/// SDK's service-specific variables (`AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_STS`), no
/// EC2 metadata, and no shared config or credentials files.
pub fn aws_env(kinesis_endpoint: &str, sts_endpoint: &str) -> Vec<(String, String)> {
    let no_file = std::env::temp_dir()
        .join("ksm-tests-no-aws-config")
        .display()
        .to_string();
    [
        ("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY),
        ("AWS_REGION", TEST_REGION),
        ("AWS_DEFAULT_REGION", TEST_REGION),
        ("AWS_ENDPOINT_URL_KINESIS", kinesis_endpoint),
        ("AWS_ENDPOINT_URL_STS", sts_endpoint),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", &no_file),
        ("AWS_SHARED_CREDENTIALS_FILE", &no_file),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// A stream name no other test uses: `<prefix>-<pid>-<n>-<time>` (at most 128 characters).
pub fn unique_stream_name(prefix: &str) -> String {
    let mut name = crate::unique_name(prefix);
    name.retain(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    name.truncate(128);
    name
}

/// Creates the stream `name` with `shards` shards and waits until it is `ACTIVE`.
pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateStream {name}: {}", DisplayErrorContext(&e)));
    let deadline = Instant::now() + STREAM_ACTIVE_TIMEOUT;
    loop {
        let described = client
            .describe_stream()
            .stream_name(name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeStream {name}: {}", DisplayErrorContext(&e)));
        let status = described
            .stream_description()
            .map(|d| d.stream_status().clone());
        if status == Some(StreamStatus::Active) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} is not ACTIVE after {STREAM_ACTIVE_TIMEOUT:?} (status {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One record read back from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// The shard it landed in, e.g. `shardId-000000000000`.
    pub shard_id: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its data blob.
    pub data: Vec<u8>,
    /// Its sequence number within the shard.
    pub sequence_number: String,
}

impl ReadRecord {
    /// The data as (lossy) UTF-8.
    pub fn data_text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The data parsed as JSON (panics with the data if it is not JSON).
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data).unwrap_or_else(|e| {
            panic!(
                "record {} in {} is not JSON ({e}): {:?}",
                self.sequence_number,
                self.shard_id,
                self.data_text()
            )
        })
    }
}

/// The ids of every shard of `stream`, in the order the service lists them.
pub async fn shard_ids(client: &Client, stream: &str) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let mut request = client.describe_stream().stream_name(stream);
        if let Some(last) = ids.last() {
            request = request.exclusive_start_shard_id(String::clone(last));
        }
        let described = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeStream {stream}: {}", DisplayErrorContext(&e)));
        let Some(description) = described.stream_description() else {
            panic!("DescribeStream {stream} returned no description");
        };
        ids.extend(description.shards().iter().map(|s| s.shard_id().to_owned()));
        if !description.has_more_shards() || description.shards().is_empty() {
            return ids;
        }
    }
}

/// Reads every record in `stream`: each shard from `TRIM_HORIZON` until a page comes back
/// empty (it has caught up) or the shard is closed. Records are grouped by shard, in shard
/// order, and in sequence order within a shard.
pub async fn read_all_records(client: &Client, stream: &str) -> Vec<ReadRecord> {
    let mut all = Vec::new();
    for shard_id in shard_ids(client, stream).await {
        let iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GetShardIterator {stream}/{shard_id}: {}",
                    DisplayErrorContext(&e)
                )
            });
        let mut iterator = iterator.shard_iterator().map(str::to_owned);
        let mut pages = 0;
        while let Some(current) = iterator.take() {
            pages += 1;
            assert!(
                pages <= MAX_PAGES_PER_SHARD,
                "GetRecords {stream}/{shard_id}: still not caught up after {MAX_PAGES_PER_SHARD} pages"
            );
            let page = client
                .get_records()
                .shard_iterator(current)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "GetRecords {stream}/{shard_id}: {}",
                        DisplayErrorContext(&e)
                    )
                });
            all.extend(page.records().iter().map(|r| ReadRecord {
                shard_id: shard_id.clone(),
                partition_key: r.partition_key().unwrap_or_default().to_owned(),
                data: r.data().as_ref().to_vec(),
                sequence_number: r.sequence_number().to_owned(),
            }));
            if page.records().is_empty() {
                break;
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
        }
    }
    all
}

/// Polls `stream` until at least `n` records are in it or `timeout` passes, and returns all
/// records read (fewer than `n` on timeout, so that the test's own assertion reports what did
/// land).
pub async fn wait_for_records(
    client: &Client,
    stream: &str,
    n: usize,
    timeout: Duration,
) -> Vec<ReadRecord> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_all_records(client, stream).await;
        if records.len() >= n || Instant::now() >= deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
