//! [`Moto`]: moto's server, which emulates Kinesis and STS (among others) over HTTP.

use std::process::Command;

use crate::process::{ServiceProcess, http_get_status};
use crate::{TempDir, free_port};

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
    /// Starts `moto_server -H 127.0.0.1 -p <free port>` and waits until it answers HTTP
    /// (`GET /moto-api/`). Without `moto_server` on `PATH` (a pip install whose scripts
    /// directory is not on it), runs `python3 -m moto.server` instead.
    pub fn start() -> Moto {
        let port = free_port();
        let dir = TempDir::new("ksm-moto");
        let mut command = moto_command();
        command
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

/// `moto_server` if it is on `PATH`, else `python3 -m moto.server` (the same program).
fn moto_command() -> Command {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("moto_server").is_file())
    });
    if on_path {
        Command::new("moto_server")
    } else {
        let mut command = Command::new("python3");
        command.args(["-m", "moto.server"]);
        command
    }
}
