//! [`Mosquitto`]: a real MQTT broker on its own loopback port, with its own config file.

use std::process::Command;

use crate::process::{ServiceProcess, port_accepts};
use crate::{TempDir, free_port};

/// How to install the broker, shown when it is missing.
const INSTALL_HINT: &str = "scripts/setup.sh (or: apt-get install mosquitto mosquitto-clients)";

/// A Mosquitto broker listening on `127.0.0.1:<port>`, killed when dropped.
///
/// The config keeps the broker's defaults except: one listener on loopback, anonymous clients
/// allowed, no persistence file, and `max_queued_messages 100000` so that messages queued for
/// a disconnected persistent session are not dropped.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    dir: TempDir,
    process: Option<ServiceProcess>,
}

impl Mosquitto {
    /// Writes the config, starts the broker on a free port and waits until it accepts TCP.
    pub fn start() -> Mosquitto {
        Mosquitto::start_on(free_port())
    }

    /// Like [`Mosquitto::start`] on a given port (which must be free).
    pub fn start_on(port: u16) -> Mosquitto {
        let dir = TempDir::new("ksm-mosquitto");
        let config = format!(
            "# written by ksm-tests\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence false\n\
             max_queued_messages 100000\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             connection_messages true\n\
             log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config)
            .expect("write mosquitto.conf in the temp dir");
        let mut broker = Mosquitto {
            port,
            dir,
            process: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let mut command = Command::new("mosquitto");
        command
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"));
        let log = self.dir.path().join("mosquitto.log");
        let mut process = ServiceProcess::spawn("mosquitto", command, &log, INSTALL_HINT);
        let port = self.port;
        process.wait_until(&format!("accepting TCP on 127.0.0.1:{port}"), || {
            port_accepts(port)
        });
        self.process = Some(process);
    }

    /// The broker's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's URL, `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// True while the broker process runs (between [`Mosquitto::stop`] and
    /// [`Mosquitto::restart`] it does not).
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Kills the broker (as a crash would: no clean disconnects). The port stays reserved for
    /// [`Mosquitto::restart`] only by convention.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Stops the broker if it runs, then starts it again on the same port and waits for it.
    /// Sessions and queued messages are lost (`persistence false`).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Everything the broker has logged so far, across restarts.
    pub fn log(&self) -> String {
        crate::process::read_log(&self.dir.path().join("mosquitto.log"))
    }
}
