//! Serving the admin API: over plain HTTP, or over HTTPS with handshakes
//! run beside each other, so that a slow or broken client holds up no one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes under way at once; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 64;

/// The client's address, for the activity log's "who".
#[derive(Debug, Clone, Copy)]
pub struct Peer(SocketAddr);

impl Peer {
    /// Who made a change, as the activity log says it.
    pub fn who(&self) -> String {
        format!("the admin API (client {})", self.0)
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Serves `app` on `listener` until the task is dropped; over TLS when
/// `tls` is given.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<Arc<ServerConfig>>) {
    let result = match tls {
        None => {
            let app = app.into_make_service_with_connect_info::<Peer>();
            axum::serve(listener, app).await
        }
        Some(config) => {
            let listener = TlsListener {
                tcp: listener,
                acceptor: TlsAcceptor::from(config),
                handshakes: JoinSet::new(),
            };
            let app = app.into_make_service_with_connect_info::<Peer>();
            axum::serve(listener, app).await
        }
    };
    if let Err(error) = result {
        tracing::error!("admin API stopped: {error}");
    }
}

/// A TCP listener whose connections come out once their TLS handshake is done.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_HANDSHAKES => {
                    match accepted {
                        Ok((stream, peer)) => {
                            let acceptor = self.acceptor.clone();
                            self.handshakes.spawn(async move {
                                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                    Ok(Ok(stream)) => Some((stream, peer)),
                                    Ok(Err(error)) => {
                                        tracing::debug!("admin API: TLS handshake with {peer} failed: {error}");
                                        None
                                    }
                                    Err(_) => None,
                                }
                            });
                        }
                        // Out of file descriptors and the like: wait, as axum's own listener does.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
