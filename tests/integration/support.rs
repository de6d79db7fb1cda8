//! Running the `ksm` binary as a process under test, and talking to its admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ksm_host::admin_client::AdminClient;
use ksm_tests::{
    Mosquitto, Moto, ReadRecord, TempDir, aws_env, create_stream, free_port, guest_wasm,
    kinesis_client, ksm_binary, publish_all, unique_stream_name, wait_for_records,
};

/// How long a host may take to start answering its admin API.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a test waits for records to land.
const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// The usual test bench: a broker, moto, a Kinesis client on moto and one fresh stream.
pub struct Bench {
    /// The broker.
    pub broker: Mosquitto,
    /// The emulator.
    pub moto: Moto,
    /// A client reading and creating streams in moto.
    pub kinesis: aws_sdk_kinesis::Client,
    /// The stream created for this test.
    pub stream: String,
}

impl Bench {
    /// Starts a broker and moto and creates a stream `{prefix}-...` with `shards` shards.
    pub async fn new(prefix: &str, shards: i32) -> Bench {
        let bench = Bench::without_stream(prefix).await;
        create_stream(&bench.kinesis, &bench.stream, shards).await;
        bench
    }

    /// Like [`Bench::new`], on a broker that keeps sessions and queued
    /// messages across a graceful restart.
    pub async fn persistent_broker(prefix: &str, shards: i32) -> Bench {
        let mut bench = Bench::without_stream(prefix).await;
        bench.broker = Mosquitto::start_persistent();
        create_stream(&bench.kinesis, &bench.stream, shards).await;
        bench
    }

    /// Like [`Bench::new`], but the stream is only named, not created.
    pub async fn without_stream(prefix: &str) -> Bench {
        let broker = Mosquitto::start();
        let moto = Moto::start();
        let kinesis = kinesis_client(&moto.endpoint()).await;
        Bench {
            broker,
            moto,
            kinesis,
            stream: unique_stream_name(prefix),
        }
    }

    /// Starts `ksm` with `modules`, talking to moto directly.
    pub fn ksm(&self, client_id: &str, modules: &[ModuleSpec]) -> Ksm {
        self.ksm_via(&self.moto.endpoint(), client_id, modules)
    }

    /// Starts `ksm` with `modules`, reaching Kinesis and STS through `endpoint`.
    pub fn ksm_via(&self, endpoint: &str, client_id: &str, modules: &[ModuleSpec]) -> Ksm {
        self.ksm_with(endpoint, client_id, modules, &HostOptions::default())
    }

    /// Like [`Bench::ksm_via`], with extra host settings.
    pub fn ksm_with(
        &self,
        endpoint: &str,
        client_id: &str,
        modules: &[ModuleSpec],
        options: &HostOptions,
    ) -> Ksm {
        Ksm::start(
            &config_with_options(
                &self.broker.url(),
                client_id,
                &guest_wasm(),
                modules,
                options,
            ),
            aws_env(endpoint, endpoint),
        )
    }

    /// Publishes with QoS 1 and waits for the broker's acknowledgements.
    pub async fn publish<T: AsRef<str>, P: AsRef<[u8]>>(&self, messages: &[(T, P)]) {
        publish_all(&self.broker.url(), messages).await;
    }

    /// Waits (bounded) until `n` records are in the test stream and returns all of them.
    pub async fn records(&self, n: usize) -> Vec<ReadRecord> {
        wait_for_records(&self.kinesis, &self.stream, n, RECORD_TIMEOUT).await
    }
}

/// One module section of a test configuration.
pub struct ModuleSpec {
    /// TOML lines of the module (without the `[[modules]]` header).
    pub body: String,
}

/// A module forwarding to `stream` with extra TOML lines.
pub fn module(id: &str, stream: &str, extra: &str) -> ModuleSpec {
    ModuleSpec {
        body: format!(
            "id = \"{id}\"\nregion = \"us-east-1\"\nstream_name = \"{stream}\"\n{extra}\n"
        ),
    }
}

/// The configuration text of a test host running the reference guest.
pub fn config(broker_url: &str, client_id: &str, modules: &[ModuleSpec]) -> String {
    config_with_component(broker_url, client_id, &guest_wasm(), modules)
}

/// Extra settings of a test host: TOML lines added to its sections.
#[derive(Debug, Default, Clone)]
pub struct HostOptions {
    /// Lines for `[mqtt]`.
    pub mqtt: String,
    /// Lines for `[kinesis]`.
    pub kinesis: String,
    /// Lines for `[storage]` (its `dir` is set by [`Ksm::start`]).
    pub storage: String,
    /// Lines for `[component]` (its `path` is set by the caller).
    pub component: String,
    /// Lines for `[admin]` (its `listen` is set on a free loopback port).
    pub admin: String,
}

/// The configuration text of a test host running `component`.
pub fn config_with_component(
    broker_url: &str,
    client_id: &str,
    component: &std::path::Path,
    modules: &[ModuleSpec],
) -> String {
    config_with_options(
        broker_url,
        client_id,
        component,
        modules,
        &HostOptions::default(),
    )
}

/// The configuration text of a test host running `component`, with extra settings.
pub fn config_with_options(
    broker_url: &str,
    client_id: &str,
    component: &std::path::Path,
    modules: &[ModuleSpec],
    options: &HostOptions,
) -> String {
    let mut text = format!(
        "[mqtt]\nurl = \"{broker_url}\"\nclient_id = \"{client_id}\"\n{mqtt}\n\n\
         [admin]\nlisten = \"127.0.0.1:{port}\"\n{admin}\n\n\
         [component]\npath = \"{wasm}\"\n{component}\n\n\
         [kinesis]\nlinger_ms = 5\nretry_base_ms = 50\nretry_max_ms = 500\n{kinesis}\n\n\
         [storage]\ndir = \"@STORAGE_DIR@\"\n{storage}\n\n\
         [[devices]]\nid = 1001\nhome_id = 77\nclass = \"thermostat\"\n\n",
        port = free_port(),
        wasm = component.display(),
        mqtt = options.mqtt,
        kinesis = options.kinesis,
        storage = options.storage,
        component = options.component,
        admin = options.admin,
    );
    for module in modules {
        text.push_str("[[modules]]\n");
        text.push_str(&module.body);
        text.push('\n');
    }
    text
}

/// A `ksm run` process; killed on drop.
pub struct Ksm {
    child: Option<Child>,
    dir: TempDir,
    config_path: PathBuf,
    env: Vec<(String, String)>,
    admin: SocketAddr,
    /// The client [`Ksm::admin`] returns, when not the plain-HTTP one with
    /// the environment's token.
    admin_client: Option<AdminClient>,
    data_limit_mib: Option<u64>,
}

impl Ksm {
    /// Writes `config` (its storage directory, `@STORAGE_DIR@`, pointed
    /// at a fresh directory) and starts `ksm run` with `env`, waiting until
    /// it is connected to the broker and subscribed (`GET /api/health`
    /// answers 200).
    pub fn start(config: &str, env: Vec<(String, String)>) -> Ksm {
        let mut ksm = Ksm::prepare(config, env, None);
        ksm.spawn();
        ksm
    }

    /// Like [`Ksm::start`], reaching the admin API (to wait for it, and
    /// through [`Ksm::admin`]) with the client `admin` makes for its
    /// address: for an API over HTTPS, or whose token is in a file.
    pub fn start_with_admin(
        config: &str,
        env: Vec<(String, String)>,
        admin: impl FnOnce(SocketAddr) -> AdminClient,
    ) -> Ksm {
        let mut ksm = Ksm::prepare(config, env, None);
        ksm.admin_client = Some(admin(ksm.admin));
        ksm.spawn();
        ksm
    }

    /// Like [`Ksm::start`], with the process's data size limited
    /// (`ulimit -d`: heap and private writable mappings, which is where ksm
    /// and its guests keep what they hold), so a host that would eat the
    /// machine fails instead.
    pub fn start_limited(config: &str, env: Vec<(String, String)>, data_limit_mib: u64) -> Ksm {
        let mut ksm = Ksm::prepare(config, env, Some(data_limit_mib));
        ksm.spawn();
        ksm
    }

    /// Writes the configuration of a host that [`Ksm::spawn_unchecked`] starts.
    pub fn prepare(config: &str, env: Vec<(String, String)>, data_limit_mib: Option<u64>) -> Ksm {
        let dir = TempDir::new("ksm-host");
        let config_path = dir.path().join("ksm.toml");
        let data = dir.path().join("data");
        let config = if config.contains("@STORAGE_DIR@") {
            config.replace("@STORAGE_DIR@", &data.display().to_string())
        } else {
            format!("{config}\n[storage]\ndir = \"{}\"\n", data.display())
        };
        std::fs::write(&config_path, &config).expect("write the test config");
        let admin = admin_addr(&config);
        Ksm {
            child: None,
            dir,
            config_path,
            env,
            admin,
            admin_client: None,
            data_limit_mib,
        }
    }

    /// Starts the process without waiting for it to be ready.
    pub fn spawn_unchecked(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ksm.log"))
            .expect("open the host log");
        let mut command = match self.data_limit_mib {
            None => Command::new(ksm_binary()),
            Some(mib) => {
                let mut shell = Command::new("sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -d {} && exec \"$0\" \"$@\"", mib * 1024))
                    .arg(ksm_binary());
                shell
            }
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_clear()
            .env("KSM_LOG", "info,fjall=warn,lsm_tree=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("clone the log file"))
            .stderr(log)
            .spawn()
            .expect("start ksm");
        self.child = Some(child);
    }

    fn spawn(&mut self) {
        self.spawn_unchecked();
        let deadline = Instant::now() + START_TIMEOUT;
        while !matches!(self.admin().request("GET", "/api/health"), Ok((200, _))) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("ksm exited with {status} while starting:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ksm did not start within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (at most `timeout`) for the process to exit by itself, and
    /// returns how it exited; `None` if it still runs.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("wait for ksm") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process runs, ready or not.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// True while the process runs and answers `GET /api/health` with 200.
    pub fn is_up(&mut self) -> bool {
        let running = self
            .child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
        running && matches!(self.admin().request("GET", "/api/health"), Ok((200, _)))
    }

    /// The most memory the process has held so far (its `VmHWM`), MiB.
    pub fn peak_rss_mib(&self) -> u64 {
        let pid = self.child.as_ref().expect("ksm is running").id();
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib / 1024
    }

    /// A client for the host's admin API: the one given to
    /// [`Ksm::start_with_admin`], else plain HTTP with the token the host
    /// was started with (`KSM_ADMIN_TOKEN` in its environment).
    pub fn admin(&self) -> AdminClient {
        if let Some(client) = &self.admin_client {
            return client.clone();
        }
        let token = self
            .env
            .iter()
            .find(|(name, _)| name == ksm_host::config::TOKEN_ENV)
            .map(|(_, token)| token.clone());
        AdminClient::new(self.admin).with_token(token)
    }

    /// The address the admin API listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The host's own log output.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ksm.log")).unwrap_or_default()
    }

    /// GETs an admin API path and parses the JSON answer.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let (status, body) = self
            .admin()
            .request("GET", path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()));
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// GETs an admin API path and returns the status and body.
    pub fn get_raw(&self, path: &str) -> (u16, String) {
        self.admin()
            .request("GET", path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The configuration file the host runs with.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Changes the configuration file (takes effect at the next restart).
    pub fn edit_config(&mut self, edit: impl FnOnce(&str) -> String) {
        let text = std::fs::read_to_string(&self.config_path).expect("read the test config");
        std::fs::write(&self.config_path, edit(&text)).expect("write the test config");
    }

    /// Sends a signal (`HUP`, `TERM`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("ksm is running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// The storage directory of the host.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// POSTs to an admin API path and returns the status and body.
    pub fn post(&self, path: &str) -> (u16, String) {
        self.admin()
            .request("POST", path)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL ksm");
            child.wait().expect("reap ksm");
        }
    }

    /// Every activity log entry of a module, as text.
    pub fn module_log(&self, module: &str) -> String {
        module_log_text(&self.get(&format!("/api/modules/{module}/logs")))
    }

    /// Like [`Ksm::module_log`], empty while the admin API does not answer
    /// yet (a host just spawned).
    pub fn module_log_when_up(&self, module: &str) -> String {
        self.admin()
            .call("GET", &format!("/api/modules/{module}/logs"))
            .ok()
            .and_then(|body| serde_json::from_str(&body).ok())
            .map(|entries| module_log_text(&entries))
            .unwrap_or_default()
    }

    /// The counters of a module from `GET /api/modules`.
    pub fn counters(&self, module: &str) -> serde_json::Value {
        let modules = self.get("/api/modules");
        modules
            .as_array()
            .and_then(|all| all.iter().find(|m| m["id"] == module))
            .map(|m| m["counters"].clone())
            .unwrap_or_else(|| panic!("no module {module} in {modules}"))
    }

    /// Polls a module's counters until `done` holds (bounded), returning the last ones.
    pub fn wait_for_counters(
        &self,
        module: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_counters_within(module, Duration::from_secs(30), done)
    }

    /// Like [`Ksm::wait_for_counters`], waiting at most `timeout`.
    pub fn wait_for_counters_within(
        &self,
        module: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let counters = self.counters(module);
            if done(&counters) || Instant::now() >= deadline {
                return counters;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited with success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for ksm") {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("ksm did not stop within 30 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the same host again (same config, storage and client ID).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the host before restarting it");
        self.spawn();
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn admin_addr(config: &str) -> SocketAddr {
    let line = config
        .lines()
        .find(|l| l.starts_with("listen = "))
        .expect("the config has an admin listen address");
    line.trim_start_matches("listen = ")
        .trim_matches('"')
        .parse()
        .expect("a socket address")
}

/// Log entries as the admin API lists them, one `"LEVEL" "message"` line each.
fn module_log_text(entries: &serde_json::Value) -> String {
    entries
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| format!("{} {}\n", e["level"], e["message"]))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `ksm` with arguments in the workspace root (where the example
/// configs' relative paths point), without the test's own
/// `KSM_ADMIN_TOKEN`, and returns (success, stdout, stderr).
pub fn ksm_command(args: &[&str]) -> (bool, String, String) {
    ksm_command_with_env(args, &[])
}

/// Like [`ksm_command`], with `env` set and no `KSM_ADMIN_TOKEN` but one `env` gives.
pub fn ksm_command_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(ksm_binary())
        .args(args)
        .env_remove(ksm_host::config::TOKEN_ENV)
        .envs(env.iter().copied())
        .current_dir(ksm_tests::workspace_root())
        .stdin(Stdio::null())
        .output()
        .expect("run ksm");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An HTTP answer read by [`raw_http`].
#[derive(Debug)]
pub struct RawAnswer {
    /// The status code.
    pub status: u16,
    /// The headers, names in lowercase, in order.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes, else up to the end of the connection).
    pub body: String,
}

impl RawAnswer {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `request` (`METHOD PATH`) with `headers` and no body over plain
/// TCP to `addr`, and reads the answer: for what [`AdminClient`] does not
/// show (headers) or send (a body announced but not sent).
pub fn raw_http(addr: SocketAddr, request: &str, headers: &[&str]) -> std::io::Result<RawAnswer> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{request} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        head.push_str(&format!("{header}\r\n"));
    }
    (&stream).write_all(format!("{head}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| invalid(&format!("not an HTTP answer: {status_line:?}")))?;
    let mut answer = RawAnswer {
        status,
        headers: Vec::new(),
        body: String::new(),
    };
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(invalid("the answer ends in its headers"));
        }
        let Some((name, value)) = line.trim_end().split_once(':') else {
            break;
        };
        let header = (name.to_ascii_lowercase(), value.trim().to_owned());
        answer.headers.push(header);
    }
    let mut body = Vec::new();
    match answer.header("content-length") {
        Some(length) => {
            let length = length.parse().map_err(|_| invalid("Content-Length"))?;
            reader.take(length).read_to_end(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    answer.body = String::from_utf8_lossy(&body).into_owned();
    Ok(answer)
}

/// The data of a dead letter as the admin API lists it.
pub fn dead_letter_data(letter: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(letter["data_base64"].as_str().expect("data_base64"))
        .expect("valid base64")
}

impl Ksm {
    /// DELETEs an admin API path and parses the JSON answer (which must be 200).
    pub fn delete(&self, path: &str) -> serde_json::Value {
        let (status, body) = self
            .admin()
            .request("DELETE", path)
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
        assert_eq!(status, 200, "DELETE {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("DELETE {path}: {e}: {body}"))
    }

    /// Every dead letter of a module, paging through the admin API; a
    /// letter whose data a page left out is fetched alone, so each one has
    /// its `data_base64`.
    pub fn all_dead_letters(&self, module: &str) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = self.get(&format!(
                "/api/modules/{module}/dead-letters?after={after}&limit=1000"
            ));
            let page = page.as_array().cloned().expect("a list");
            let Some(last) = page.last() else {
                return all;
            };
            after = last["id"].as_u64().expect("a dead-letter ID");
            for letter in page {
                if letter["data_omitted"] == true {
                    all.push(self.get(&format!(
                        "/api/modules/{module}/dead-letters/{}",
                        letter["id"]
                    )));
                } else {
                    all.push(letter);
                }
            }
        }
    }
}

/// Tests that load the machine on purpose (floods of large messages, busy
/// CPUs) and tests whose broker must keep up with its subscribers (the
/// fault tests under load: Mosquitto 2.0.11 drops QoS 1 messages for a
/// subscriber that falls about a thousand behind) do not run side by side.
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Held by a test that loads the machine on purpose: it runs beside no
/// test that holds [`machine_shared`].
pub async fn machine_to_myself() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().await
}

/// Held by a test under load that must not run beside one that holds
/// [`machine_to_myself`].
pub async fn machine_shared() -> tokio::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().await
}
