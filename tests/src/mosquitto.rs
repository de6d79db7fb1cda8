//! [`Mosquitto`]: a real MQTT broker on its own loopback port, with its own config file.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::process::{ServiceProcess, port_accepts};
use crate::{TempDir, free_port};

/// How long [`Mosquitto::restart_graceful`] waits for the broker to exit after SIGTERM.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to install the broker, shown when it is missing.
const INSTALL_HINT: &str = "scripts/setup.sh (or: apt-get install mosquitto mosquitto-clients)";

/// The broker's `max_packet_size`, set so that every message it takes from a client fits
/// ksm's default `mqtt.max_packet_bytes` (16 MiB, 16777216) on its way to ksm. Without it,
/// Mosquitto acknowledges a larger message to the device and then drops it for ksm, which never
/// hears of it (an MQTT 5 server must not send a packet over the client's Maximum Packet Size).
///
/// The limit counts whole packets, but Mosquitto 2.0 measures the two sides differently: a
/// packet it receives as its remaining length plus 1, one it sends as its remaining length plus
/// the 4 bytes that encode it (at this size); and a message from an MQTT 3.1.1 client grows by
/// the 1-byte properties length on its way to ksm (MQTT 5). At exactly 16777216 it would still
/// acknowledge packets of up to 16777220 bytes and drop the largest of them for ksm ("Dropping
/// too large outgoing PUBLISH"; measured with Debian 12's Mosquitto 2.0.11), hence 4 bytes less.
///
/// Over the limit, an MQTT 5 client has the limit from the CONNACK's Maximum Packet Size and
/// refuses the publish itself; a client that sends it anyway is disconnected, never
/// acknowledged.
pub const BROKER_MAX_PACKET_SIZE: u32 = 16 * 1024 * 1024 - 4;

/// A Mosquitto broker listening on `127.0.0.1:<port>`, killed when dropped.
///
/// The config keeps the broker's defaults except: one listener on loopback, anonymous clients
/// allowed, no persistence file, `max_queued_messages 100000` so that messages queued for a
/// disconnected persistent session are not dropped, and `max_packet_size`
/// [`BROKER_MAX_PACKET_SIZE`] so that a message too large for ksm is refused to its publisher
/// instead of vanishing. [`Mosquitto::start_persistent`] turns persistence on.
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
        Mosquitto::start_configured(port, false)
    }

    /// Like [`Mosquitto::start`], with persistence on (`persistence true`, a persistence
    /// directory in the broker's temp dir, `autosave_interval 1`): after
    /// [`Mosquitto::restart_graceful`], persistent sessions, their subscriptions and their
    /// queued QoS 1 messages are still there. (A [`Mosquitto::restart`] kills the broker, so
    /// only what was saved in the last second survives it.)
    pub fn start_persistent() -> Mosquitto {
        Mosquitto::start_configured(free_port(), true)
    }

    /// Writes the config and starts the broker on `port`.
    fn start_configured(port: u16, persistent: bool) -> Mosquitto {
        let dir = TempDir::new("ksm-mosquitto");
        let persistence = if persistent {
            let location = persistence_dir(&dir);
            format!(
                "persistence true\n\
                 persistence_location {}/\n\
                 autosave_interval 1\n",
                location.display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        let config = format!(
            "# written by ksm-tests\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             {persistence}\
             max_queued_messages 100000\n\
             max_packet_size {BROKER_MAX_PACKET_SIZE}\n\
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

    /// Stops the broker if it runs (killing it), then starts it again on the same port and
    /// waits for it. Sessions and queued messages are lost (without persistence; with it,
    /// what was saved in the last second comes back).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the broker gracefully (SIGTERM: it disconnects its clients and, with
    /// persistence, saves its state), waiting up to 10 s before killing it, then starts it
    /// again on the same port and waits for it.
    pub fn restart_graceful(&mut self) {
        self.stop_graceful();
        self.spawn();
    }

    /// Stops the broker gracefully (SIGTERM), waiting up to 10 s before killing it. Returns
    /// true if it exited by itself (or was not running).
    pub fn stop_graceful(&mut self) -> bool {
        match self.process.take() {
            Some(mut process) => process.terminate(TERMINATE_TIMEOUT),
            None => true,
        }
    }

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(ServiceProcess::pid)
    }

    /// Everything the broker has logged so far, across restarts.
    pub fn log(&self) -> String {
        crate::process::read_log(&self.dir.path().join("mosquitto.log"))
    }
}

/// Creates the persistence directory in `dir`, writable by everyone: run as root, Mosquitto
/// drops its privileges to the `mosquitto` user before it writes its database.
fn persistence_dir(dir: &TempDir) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let location = dir.path().join("persistence");
    std::fs::create_dir_all(&location)
        .unwrap_or_else(|e| panic!("create {}: {e}", location.display()));
    std::fs::set_permissions(&location, std::fs::Permissions::from_mode(0o777))
        .unwrap_or_else(|e| panic!("make {} writable: {e}", location.display()));
    location
}
