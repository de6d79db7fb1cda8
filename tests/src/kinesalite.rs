//! [`Kinesalite`]: an independent Kinesis emulator (Node.js), in memory.

use std::process::Command;

use crate::process::{ServiceProcess, port_accepts};
use crate::{TempDir, free_port, workspace_root};

/// How to install kinesalite, shown when it is missing.
const INSTALL_HINT: &str =
    "scripts/setup.sh (or: apt-get install nodejs npm && (cd tests/emulators && npm ci))";

/// A kinesalite server on `127.0.0.1:<port>`, killed when dropped.
///
/// Streams are created, updated and deleted without delay, and the shard limit is raised so
/// that many tests can share one instance. State is in memory only.
#[derive(Debug)]
pub struct Kinesalite {
    port: u16,
    process: ServiceProcess,
    _dir: TempDir,
}

impl Kinesalite {
    /// Runs `tests/emulators/node_modules/kinesalite/cli.js` with Node.js on a free port and
    /// waits until it accepts TCP.
    pub fn start() -> Kinesalite {
        let cli = workspace_root().join("tests/emulators/node_modules/kinesalite/cli.js");
        assert!(
            cli.is_file(),
            "kinesalite is not installed: {} is missing. Install it with: {INSTALL_HINT}",
            cli.display()
        );
        let port = free_port();
        let dir = TempDir::new("ksm-kinesalite");
        let mut command = Command::new("node");
        command
            .arg(&cli)
            .args(["--port", &port.to_string()])
            .args(["--createStreamMs", "0"])
            .args(["--deleteStreamMs", "0"])
            .args(["--updateStreamMs", "0"])
            .args(["--shardLimit", "10000"])
            .current_dir(dir.path());
        let log = dir.path().join("kinesalite.log");
        let mut process = ServiceProcess::spawn("kinesalite", command, &log, INSTALL_HINT);
        process.wait_until(&format!("accepting TCP on 127.0.0.1:{port}"), || {
            port_accepts(port)
        });
        Kinesalite {
            port,
            process,
            _dir: dir,
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL for a Kinesis client, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's process id (Node.js running kinesalite).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Everything the server has printed so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
