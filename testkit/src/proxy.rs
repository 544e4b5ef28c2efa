//! A TCP proxy under the test's control, to inject network faults between two real processes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward everything.
    Pass,
    /// Close every connection and refuse new ones at once (a crashed or firewalled peer).
    Cut,
    /// Accept connections but forward nothing (a black-holed network: peers hang until timeouts).
    Blackhole,
    /// Forward, delaying every chunk (a slow link).
    Delay(Duration),
}

struct Shared {
    mode: Mutex<ProxyMode>,
    /// Bumped to drop every established connection.
    generation: watch::Sender<u64>,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock().expect("proxy mode lock is never poisoned")
    }
}

/// A TCP proxy from `127.0.0.1:port` to `127.0.0.1:upstream`, running on its own thread.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy").field("port", &self.port).field("mode", &self.shared.mode()).finish()
    }
}

impl FaultProxy {
    /// Listens on `port` (0 = pick one) and forwards to `upstream`.
    pub fn start(port: u16, upstream: u16) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let (generation, _) = watch::channel(0);
        let shared = Arc::new(Shared { mode: Mutex::new(ProxyMode::Pass), generation });
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, st) = (shared.clone(), stop.clone());
        std::thread::Builder::new().name(format!("fault-proxy-{port}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                loop {
                    let (inbound, _) = tokio::select! {
                        _ = st.cancelled() => return,
                        r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    };
                    let s = s.clone();
                    tokio::spawn(async move { handle(inbound, upstream, s).await });
                }
            });
        })?;
        Ok(Self { port, shared, stop })
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        *self.shared.mode.lock().expect("proxy mode lock is never poisoned") = mode;
        if matches!(mode, ProxyMode::Cut | ProxyMode::Blackhole) {
            self.shared.generation.send_modify(|g| *g += 1);
        }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.set_mode(ProxyMode::Cut);
    }

    /// Forwards again.
    pub fn heal(&self) {
        self.set_mode(ProxyMode::Pass);
    }

    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.generation.send_modify(|g| *g += 1);
    }
}

async fn handle(inbound: TcpStream, upstream: u16, shared: Arc<Shared>) {
    let mut gen_rx = shared.generation.subscribe();
    match shared.mode() {
        ProxyMode::Cut => return,
        ProxyMode::Blackhole => {
            // Hold the socket open, forwarding nothing, until the mode changes.
            let _ = gen_rx.changed().await;
            return;
        }
        ProxyMode::Pass | ProxyMode::Delay(_) => {}
    }
    let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    tokio::select! {
        _ = pipe(ri, wo, shared.clone()) => {}
        _ = pipe(ro, wi, shared.clone()) => {}
        _ = gen_rx.changed() => {}
    }
}

async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        match shared.mode() {
            ProxyMode::Delay(d) => tokio::time::sleep(d).await,
            ProxyMode::Cut | ProxyMode::Blackhole => return,
            ProxyMode::Pass => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
