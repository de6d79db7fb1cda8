//! [`Mosquitto`]: a real MQTT broker on its own loopback port, with its own config file;
//! optionally with a TLS listener ([`TlsBroker`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{ServiceProcess, port_accepts};
use crate::tls::{CertFiles, TestPki};
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

/// The ACL of the device-identity set-up ([`TlsBroker::device_identity`]), as shipped in
/// `examples/mosquitto/device-identity.acl`: a device whose certificate's CN is its device ID
/// may publish only under `/devices/<its id>/`, and ksm (CN `ksm`) may read every device's
/// topics. Nobody else may do anything.
pub const DEVICE_IDENTITY_ACL: &str = include_str!("../../examples/mosquitto/device-identity.acl");

/// The TLS listener of a broker started with [`Mosquitto::start_tls`].
///
/// The broker runs with `per_listener_settings true`, so that `allow_anonymous`, the ACL and
/// the password file apply to the TLS listener only; the plain listener, if any, lets
/// anonymous clients do anything (e.g. publish what a test needs, whatever the ACL).
/// The TLS listener allows anonymous clients only without a password file and without
/// `use_identity_as_username` (with it, every client has its certificate's CN as username).
///
/// The broker reads the files when it starts (and restarts): the [`TestPki`] must outlive it.
#[derive(Debug, Clone)]
pub struct TlsBroker {
    /// The CA certificates that client certificates are verified against (`cafile`).
    pub ca_file: PathBuf,
    /// The broker's certificate and key (`certfile`, `keyfile`).
    pub server: CertFiles,
    /// Clients must present a certificate signed by the CA (`require_certificate`).
    pub require_certificate: bool,
    /// The client certificate's CN is the client's username, for the ACL
    /// (`use_identity_as_username`; needs [`TlsBroker::require_certificate`]).
    pub use_identity_as_username: bool,
    /// The content of the TLS listener's ACL file (`acl_file`); `None`: no ACL, every client
    /// may publish and subscribe to anything.
    pub acl: Option<String>,
    /// Users and passwords for the TLS listener's password file (written with
    /// `mosquitto_passwd`); empty: no password file.
    pub passwords: Vec<(String, String)>,
    /// Also open a plain MQTT listener on another port ([`Mosquitto::url`]).
    pub plain_listener: bool,
}

impl TlsBroker {
    /// TLS with `pki`'s CA and server certificate; client certificates optional, anonymous
    /// clients allowed, no ACL, no password file, no plain listener.
    pub fn new(pki: &TestPki) -> TlsBroker {
        TlsBroker {
            ca_file: pki.ca_file().to_owned(),
            server: pki.server().clone(),
            require_certificate: false,
            use_identity_as_username: false,
            acl: None,
            passwords: Vec::new(),
            plain_listener: false,
        }
    }

    /// Device identity: every client must present a certificate from `pki`'s CA, its CN is
    /// its username, and [`DEVICE_IDENTITY_ACL`] applies.
    pub fn device_identity(pki: &TestPki) -> TlsBroker {
        TlsBroker {
            require_certificate: true,
            use_identity_as_username: true,
            acl: Some(DEVICE_IDENTITY_ACL.to_owned()),
            ..TlsBroker::new(pki)
        }
    }
}

/// A Mosquitto broker listening on `127.0.0.1:<port>`, killed when dropped.
///
/// The config keeps the broker's defaults except: one listener on loopback, anonymous clients
/// allowed, no persistence file, `max_queued_messages 100000` so that messages queued for a
/// disconnected persistent session are not dropped, and `max_packet_size`
/// [`BROKER_MAX_PACKET_SIZE`] so that a message too large for ksm is refused to its publisher
/// instead of vanishing. [`Mosquitto::start_persistent`] turns persistence on;
/// [`Mosquitto::start_tls`] starts a TLS listener instead (and the plain one only if asked).
#[derive(Debug)]
pub struct Mosquitto {
    /// The plain listener's port, if there is one.
    port: Option<u16>,
    /// The TLS listener's port, if there is one.
    tls_port: Option<u16>,
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
            "{}\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n",
            common_settings(&persistence)
        );
        Mosquitto::write_and_spawn(dir, &config, Some(port), None)
    }

    /// Starts a broker with a TLS listener set up as `tls` says (and a plain one if it asks
    /// for it), each on a free port, and waits until every listener accepts TCP. No
    /// persistence.
    pub fn start_tls(tls: TlsBroker) -> Mosquitto {
        let dir = TempDir::new("ksm-mosquitto");
        let tls_port = free_port();
        let port = tls.plain_listener.then(|| {
            loop {
                let port = free_port();
                if port != tls_port {
                    break port;
                }
            }
        });
        let mut config = format!(
            "{}\
             per_listener_settings true\n\
             listener {tls_port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate {}\n\
             use_identity_as_username {}\n\
             allow_anonymous {}\n",
            common_settings("persistence false\n"),
            tls.ca_file.display(),
            tls.server.cert.display(),
            tls.server.key.display(),
            tls.require_certificate,
            tls.use_identity_as_username,
            tls.passwords.is_empty() && !tls.use_identity_as_username,
        );
        if let Some(acl) = &tls.acl {
            let path = dir.path().join("acl");
            std::fs::write(&path, acl).expect("write the ACL file in the temp dir");
            config.push_str(&format!("acl_file {}\n", path.display()));
        }
        if !tls.passwords.is_empty() {
            let path = dir.path().join("passwords");
            write_password_file(&path, &tls.passwords);
            config.push_str(&format!("password_file {}\n", path.display()));
        }
        if let Some(port) = port {
            config.push_str(&format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n"
            ));
        }
        Mosquitto::write_and_spawn(dir, &config, port, Some(tls_port))
    }

    /// Writes `config` as the broker's config file in `dir` and starts the broker.
    fn write_and_spawn(
        dir: TempDir,
        config: &str,
        port: Option<u16>,
        tls_port: Option<u16>,
    ) -> Mosquitto {
        std::fs::write(dir.path().join("mosquitto.conf"), config)
            .expect("write mosquitto.conf in the temp dir");
        let mut broker = Mosquitto {
            port,
            tls_port,
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
        for port in self.port.into_iter().chain(self.tls_port) {
            process.wait_until(&format!("accepting TCP on 127.0.0.1:{port}"), || {
                port_accepts(port)
            });
        }
        self.process = Some(process);
    }

    /// The plain listener's TCP port. Panics if the broker has none (a [`TlsBroker`] without
    /// [`TlsBroker::plain_listener`]).
    pub fn port(&self) -> u16 {
        self.port
            .unwrap_or_else(|| panic!("this broker has no plain listener"))
    }

    /// The plain listener's URL, `mqtt://127.0.0.1:<port>` (panics like [`Mosquitto::port`]).
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port())
    }

    /// The TLS listener's TCP port. Panics if the broker has none (it was not started with
    /// [`Mosquitto::start_tls`]).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
            .unwrap_or_else(|| panic!("this broker has no TLS listener"))
    }

    /// The TLS listener's URL, `mqtts://127.0.0.1:<port>` (panics like
    /// [`Mosquitto::tls_port`]).
    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port())
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

    /// Stops the broker if it runs (killing it), then starts it again on the same ports and
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

/// The settings every broker shares: `persistence` (one or more lines), the queue and packet
/// limits, and logging to stderr (the log file).
fn common_settings(persistence: &str) -> String {
    format!(
        "# written by ksm-tests\n\
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
    )
}

/// Writes a Mosquitto password file at `path` with `mosquitto_passwd -b`, one user at a time.
fn write_password_file(path: &Path, users: &[(String, String)]) {
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        command.arg("-b");
        if i == 0 {
            command.arg("-c");
        }
        let output = command
            .arg(path)
            .arg(user)
            .arg(password)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run mosquitto_passwd ({e}). Install it with: {INSTALL_HINT}")
            });
        assert!(
            output.status.success(),
            "mosquitto_passwd for {user:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
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
