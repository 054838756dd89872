//! A TCP proxy that the test steers, standing in for a bad network between a node and
//! Redis: every chunk arrives `delay` late (in order); a partition holds everything, both
//! ways, until it heals (TCP below sees no loss, as a real partition shorter than the
//! connection's timeouts looks to it); a cut closes every connection and refuses new ones
//! until it heals (a partition long enough for the connections to give up). (This kernel has no `sch_netem`: `tc qdisc ... netem`
//! answers "Specified qdisc kind is unknown", so the network is bent here instead.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub struct Proxy {
    pub addr: SocketAddr,
    partitioned: Arc<watch::Sender<bool>>,
    cut: Arc<watch::Sender<bool>>,
}

impl Proxy {
    /// Forwards connections on a free loopback port to `upstream`, each chunk `delay` late.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (partitioned, cut) = (Arc::new(watch::channel(false).0), Arc::new(watch::channel(false).0));
        let (held, cutting) = (partitioned.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cutting.borrow() {
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream).await else { continue };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [(Box::new(client_read) as Reader, Box::new(server_write) as Writer), (Box::new(server_read), Box::new(client_write))] {
                    let (held, mut cut) = (held.subscribe(), cutting.subscribe());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = pump(from, to, delay, held) => {}
                            _ = cut.wait_for(|cut| *cut) => {}
                        }
                    });
                }
            }
        });
        Proxy { addr, partitioned, cut }
    }

    /// Closes every connection, and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Holds every byte, both ways, until [`Proxy::heal`].
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
        self.partitioned.send_replace(false);
    }
}

type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Copies `from` to `to`, each chunk at `delay` after it was read, none while partitioned.
async fn pump(mut from: Reader, mut to: Writer, delay: Duration, mut partitioned: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    while let Some((due, chunk)) = rx.recv().await {
        tokio::time::sleep_until(due).await;
        if partitioned.wait_for(|held| !held).await.is_err() || to.write_all(&chunk).await.is_err() {
            return;
        }
    }
}
