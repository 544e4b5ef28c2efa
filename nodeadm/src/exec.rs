//! Running nodeadm: a time limit, its output streamed line by line to the log with secrets
//! redacted, and the whole process group stopped on timeout or shutdown.
//!
//! nodeadm echoes a malformed activation code into its output (and the SSM setup CLI it runs
//! gets the code on its command line), so every line goes through [`Redactor`] before it reaches
//! `tracing` or an error message.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::state::Step;

/// What replaces a secret in output.
pub const REDACTED: &str = "[REDACTED]";

/// How many output lines an error keeps.
const TAIL_LINES: usize = 20;

/// How long output is still read after nodeadm exits.
const DRAIN: Duration = Duration::from_secs(2);

/// Replaces secrets (and their JSON-escaped forms) in text.
#[derive(Clone, Default)]
pub struct Redactor {
    needles: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor for `secrets`; empty ones are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles = Vec::new();
        for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
            needles.push(secret.to_owned());
            // As it appears inside a JSON (zap) log line.
            let json = serde_json::Value::String(secret.to_owned()).to_string();
            let inner = json[1..json.len() - 1].to_owned();
            if inner != secret {
                needles.push(inner);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Self { needles }
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut out = Cow::Borrowed(text);
        for needle in &self.needles {
            if out.contains(needle.as_str()) {
                out = Cow::Owned(out.replace(needle.as_str(), REDACTED));
            }
        }
        out
    }
}

/// How a nodeadm run ended.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// The last lines of its output, redacted.
    pub tail: Vec<String>,
}

/// Why a nodeadm run did not finish by itself.
#[derive(Debug)]
pub enum RunError {
    /// It could not be started.
    Spawn(std::io::Error),
    /// It ran past its time limit and was killed.
    TimedOut {
        /// The last lines of its output, redacted.
        tail: Vec<String>,
    },
    /// Shutdown was requested; it was killed.
    Cancelled,
}

/// Runs `program args…`, logging each output line (redacted) at INFO with the step's name, and
/// killing its process group after `timeout` or when `cancel` fires.
pub async fn run(
    program: &Path,
    args: &[String],
    step: Step,
    timeout: Duration,
    redactor: &Redactor,
    cancel: &CancellationToken,
) -> Result<Finished, RunError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout also stops what nodeadm started (package
        // managers, the SSM setup CLI).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(RunError::Spawn)?;
    let pid = child.id();
    let mut stdout = child.stdout.take().map(BufReader::new);
    let mut stderr = child.stderr.take().map(BufReader::new);
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let deadline = tokio::time::Instant::now() + timeout;

    let mut exited: Option<ExitStatus> = None;
    // After nodeadm exits, what it wrote last is still read, but a grandchild that keeps the
    // pipes open does not hold the step hostage.
    let mut drain_until = deadline;
    let status = loop {
        if let Some(status) = exited
            && stdout.is_none()
            && stderr.is_none()
        {
            break status;
        }
        tokio::select! {
            line = next_line(&mut stdout) => match line {
                Some(line) => emit(step, "stdout", &line, redactor, &mut tail),
                None => stdout = None,
            },
            line = next_line(&mut stderr) => match line {
                Some(line) => emit(step, "stderr", &line, redactor, &mut tail),
                None => stderr = None,
            },
            status = child.wait(), if exited.is_none() => {
                exited = Some(status.map_err(RunError::Spawn)?);
                drain_until = drain_until.min(tokio::time::Instant::now() + DRAIN);
            }
            () = tokio::time::sleep_until(drain_until), if exited.is_some() => {
                // Whatever still holds the pipes belongs to nodeadm's group.
                kill_group(pid);
                stdout = None;
                stderr = None;
            }
            () = tokio::time::sleep_until(deadline), if exited.is_none() => {
                kill_group(pid);
                let _ = child.wait().await;
                return Err(RunError::TimedOut { tail: tail.into() });
            }
            () = cancel.cancelled() => {
                kill_group(pid);
                let _ = child.wait().await;
                return Err(RunError::Cancelled);
            }
        }
    };
    Ok(Finished { status, tail: tail.into() })
}

/// The next line of a pipe, or `None` at its end (then the branch is disabled by the caller).
async fn next_line<R: AsyncRead + Unpin>(reader: &mut Option<BufReader<R>>) -> Option<String> {
    let Some(r) = reader.as_mut() else { return std::future::pending().await };
    let mut buf = Vec::new();
    match r.read_until(b'\n', &mut buf).await {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                buf.pop();
            }
            Some(String::from_utf8_lossy(&buf).into_owned())
        }
    }
}

fn emit(step: Step, stream: &'static str, line: &str, redactor: &Redactor, tail: &mut VecDeque<String>) {
    let line = redactor.redact(line);
    tracing::info!(target: "edgeflow_nodeadm::nodeadm", step = step.as_str(), stream, "{line}");
    if tail.len() == TAIL_LINES {
        tail.pop_front();
    }
    tail.push_back(line.into_owned());
}

/// SIGKILL to the child's process group (it is the group leader).
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).and_then(rustix::process::Pid::from_raw) else { return };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_plain_and_json_escaped_secrets() {
        let r = Redactor::new(["abc/def\"ghi", "", "short"]);
        assert_eq!(r.redact("code=abc/def\"ghi!"), "code=[REDACTED]!");
        assert_eq!(r.redact(r#"{"code":"abc/def\"ghi"}"#), r#"{"code":"[REDACTED]"}"#);
        assert_eq!(r.redact("a short one"), "a [REDACTED] one");
        assert_eq!(r.redact("nothing here"), "nothing here");
    }

    #[tokio::test]
    async fn times_out_and_kills_the_group() {
        let cancel = CancellationToken::new();
        let args = vec!["-c".to_owned(), "echo started; sleep 30 & sleep 30".to_owned()];
        let started = std::time::Instant::now();
        let result =
            run(Path::new("/bin/sh"), &args, Step::Install, Duration::from_millis(500), &Redactor::default(), &cancel)
                .await;
        match result {
            Err(RunError::TimedOut { tail }) => assert_eq!(tail, vec!["started".to_owned()]),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn collects_exit_status_and_redacted_tail() {
        let cancel = CancellationToken::new();
        let args = vec!["-c".to_owned(), "echo out secret-code; echo err >&2; exit 3".to_owned()];
        let r = Redactor::new(["secret-code"]);
        let finished =
            run(Path::new("/bin/sh"), &args, Step::Init, Duration::from_secs(10), &r, &cancel).await.expect("runs");
        assert_eq!(finished.status.code(), Some(3));
        assert!(finished.tail.contains(&"out [REDACTED]".to_owned()), "{:?}", finished.tail);
        assert!(finished.tail.contains(&"err".to_owned()));
    }

    #[tokio::test]
    async fn cancellation_stops_the_run() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let args = vec!["-c".to_owned(), "sleep 30".to_owned()];
        let result =
            run(Path::new("/bin/sh"), &args, Step::Verify, Duration::from_secs(60), &Redactor::default(), &cancel)
                .await;
        assert!(matches!(result, Err(RunError::Cancelled)));
    }
}
