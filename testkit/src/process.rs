//! Child processes that die with their handle, free ports, and waiting for a port to listen.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A port nobody listens on right now (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface can hand out a free port")
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("nothing listened on 127.0.0.1:{port} within {timeout:?}")
}

/// Finds an executable: `$env_var`, then `PATH`, then `~/.cargo/bin`, then the extra paths.
pub fn find_binary(name: &str, env_var: &str, extra: &[&str]) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin").join(name));
    }
    candidates.extend(extra.iter().map(PathBuf::from));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` not found (set {env_var} or run .ci/run to install it)"))
}

/// A child process killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct Child {
    name: String,
    inner: Option<std::process::Child>,
}

impl Child {
    /// Starts `cmd` with stdout/stderr appended to `log` (or discarded).
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&std::path::Path>) -> Result<Self> {
        match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        cmd.stdin(Stdio::null());
        let inner = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name: name.to_owned(), inner: Some(inner) })
    }

    /// Takes ownership of an already started process.
    pub fn adopt(name: &str, inner: std::process::Child) -> Self {
        Self { name: name.to_owned(), inner: Some(inner) }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.inner.as_ref().map(std::process::Child::id)
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.inner.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for exit; returns the exit status if it exited.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.inner.as_mut()?;
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.inner = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.inner.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A command that runs `program` (append its arguments with `.arg`) with `dir` on a fresh tmpfs
/// of `size` (`"4m"`) in a private mount namespace: a real, small filesystem that fills up
/// (ENOSPC) without touching the host's disks. As root a mount namespace is enough; otherwise the command maps the
/// current user to root in a user namespace.
pub fn on_small_disk(dir: &std::path::Path, size: &str, program: &std::path::Path) -> Command {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mut cmd = Command::new("unshare");
    cmd.arg(if root { "-m" } else { "-rm" })
        .args(["sh", "-c", r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$0" "$@""#])
        .arg(program)
        .arg(size)
        .arg(dir);
    cmd
}
