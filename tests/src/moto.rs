//! [`Moto`]: moto's server, which emulates Kinesis and STS (among others) over HTTP.

use std::process::Command;

use crate::process::{ServiceProcess, http_get_status};
use crate::{TempDir, free_port};

/// The launcher: moto's server with one concurrency fix.
const LAUNCHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/emulators/moto_server.py");

/// How to install moto's server, shown when it is missing.
const INSTALL_HINT: &str = "scripts/setup.sh (or: python3 -m pip install 'moto[server]==5.2.1')";

/// A `moto_server` on `127.0.0.1:<port>`, killed when dropped.
///
/// Each instance has its own in-memory state. Moto accepts any credentials and does not check
/// signatures; its STS returns fresh `ASIA…` credentials for `AssumeRole`.
#[derive(Debug)]
pub struct Moto {
    port: u16,
    process: ServiceProcess,
    _dir: TempDir,
}

impl Moto {
    /// Starts moto's server on `127.0.0.1:<free port>` and waits until it answers HTTP
    /// (`GET /moto-api/`). It runs through `tests/emulators/moto_server.py`, which is
    /// `moto.server` with its Kinesis record numbering made safe for concurrent
    /// `PutRecords` (see that file).
    pub fn start() -> Moto {
        let port = free_port();
        let dir = TempDir::new("ksm-moto");
        let mut command = Command::new("python3");
        command
            .arg(LAUNCHER)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .env("PYTHONUNBUFFERED", "1");
        let log = dir.path().join("moto.log");
        let mut process = ServiceProcess::spawn("moto_server", command, &log, INSTALL_HINT);
        process.wait_until(&format!("HTTP on 127.0.0.1:{port}"), || {
            http_get_status(port, "/moto-api/").is_some()
        });
        Moto {
            port,
            process,
            _dir: dir,
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL for any AWS SDK client, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Everything the server has logged so far (one line per request).
    pub fn log(&self) -> String {
        self.process.log()
    }
}
