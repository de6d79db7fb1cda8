//! A service process for tests: spawned with its output in a log file, waited for until it
//! answers, and killed when dropped.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a service may take to start answering before the test fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A running child process whose stdout and stderr go to a log file; killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
}

impl ServiceProcess {
    /// Spawns `command` as the service `name`, appending its output to `log_path`.
    ///
    /// Panics with `install_hint` when the program is not installed.
    pub fn spawn(
        name: &str,
        mut command: Command,
        log_path: &Path,
        install_hint: &str,
    ) -> ServiceProcess {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap_or_else(|e| panic!("open log file {}: {e}", log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("clone log file handle {}: {e}", log_path.display()));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "cannot start {name}: {:?} is not installed or not on PATH ({e}). \
                 Install it with: {install_hint}",
                command.get_program()
            ),
            Err(e) => panic!("cannot start {name} ({command:?}): {e}"),
        };
        ServiceProcess {
            name: name.to_owned(),
            child: Some(child),
            log_path: log_path.to_owned(),
        }
    }

    /// The service's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the service has printed so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The path of the service's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        let Some(child) = self.child.as_mut() else {
            panic!("{} was stopped", self.name);
        };
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{} exited early with {status}; its log ({}):\n{}",
                self.name,
                self.log_path.display(),
                self.log()
            );
        }
    }

    /// Polls `ready` until it returns true, failing after [`START_TIMEOUT`] or if the
    /// process exits first; either failure prints the service's log.
    pub fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.assert_running();
            if ready() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not become ready ({what}) within {START_TIMEOUT:?}; its log ({}):\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Kills the process (SIGKILL) and reaps it. Does nothing if it already stopped.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .and_then(|mut f| writeln!(f, "--- ksm-tests: {} killed ---", self.name));
        }
    }
}

impl ServiceProcess {
    /// Asks the process to exit (SIGTERM, sent with the `kill` command) and waits up to
    /// `timeout` for it to exit; kills it (SIGKILL) if it does not. Returns true if it exited
    /// by itself. Does nothing (and returns true) if it already stopped.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let signalled = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + timeout;
        let mut exited = false;
        while signalled && Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                exited = true;
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        if !exited {
            let _ = child.kill();
        }
        let status = child.wait();
        let note = match (exited, status) {
            (true, Ok(status)) => format!("terminated ({status})"),
            (true, Err(e)) => format!("terminated (wait failed: {e})"),
            (false, _) => format!("did not exit within {timeout:?} of SIGTERM; killed"),
        };
        let _ = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .and_then(|mut f| writeln!(f, "--- ksm-tests: {} {note} ---", self.name));
        exited
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True if something accepts TCP connections on `127.0.0.1:port`.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Sends `GET path` over HTTP/1.0 to `127.0.0.1:port` and returns the status code, if any
/// HTTP response came back.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let line = std::str::from_utf8(&head[..len]).ok()?;
    let status = line.strip_prefix("HTTP/1.")?.get(2..5)?;
    status.parse().ok()
}

/// Reads a log file as lossy UTF-8 (empty if it cannot be read).
pub fn read_log(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
