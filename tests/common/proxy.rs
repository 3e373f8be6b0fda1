//! A TCP proxy on a loopback port that can cut its clients off: a network partition between one
//! client and ZooKeeper, without stopping the server.
//!
//! The proxy runs on its own thread with its own tokio runtime, so it outlives the runtimes of
//! the tests that use it and keeps forwarding while a test's runtime is blocked.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc as std_mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

enum Command {
    Block(std_mpsc::Sender<()>),
    Unblock(std_mpsc::Sender<()>),
    Shutdown,
}

/// A TCP proxy from a free loopback port to `127.0.0.1:target`.
pub struct Proxy {
    port: u16,
    target: u16,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Starts forwarding from a free loopback port to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Proxy {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy port");
        listener.set_nonblocking(true).expect("non-blocking proxy listener");
        let port = listener.local_addr().expect("proxy address").port();
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, target_port));
        let (commands, rx) = mpsc::unbounded_channel();
        let thread = thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build the proxy's runtime");
                runtime.block_on(serve(listener, target, rx));
            })
            .expect("start the proxy thread");
        Proxy { port, target: target_port, commands, thread: Some(thread) }
    }

    /// The port clients connect to, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port it forwards to, on 127.0.0.1.
    pub fn target(&self) -> u16 {
        self.target
    }

    /// `127.0.0.1:PORT/chroot` through the proxy.
    pub fn connect_string(&self, chroot: &str) -> String {
        super::zk::connect_string(self.port, chroot)
    }

    /// Closes every current connection and closes new ones at once, until [`Proxy::unblock`].
    /// When it returns, every connection that was open is closed.
    pub fn block(&self) {
        self.command(Command::Block);
    }

    /// Forwards new connections again.
    pub fn unblock(&self) {
        self.command(Command::Unblock);
    }

    fn command(&self, make: fn(std_mpsc::Sender<()>) -> Command) {
        let (ack, done) = std_mpsc::channel();
        self.commands.send(make(ack)).expect("the proxy thread is alive");
        done.recv_timeout(Duration::from_secs(10)).expect("the proxy thread answers");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(listener: std::net::TcpListener, target: SocketAddr, mut commands: mpsc::UnboundedReceiver<Command>) {
    let listener = TcpListener::from_std(listener).expect("register the proxy listener");
    let mut connections = JoinSet::new();
    let mut blocked = false;
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Shutdown) => break,
                Some(Command::Block(ack)) => {
                    blocked = true;
                    // Aborts every connection task and waits until each is gone (sockets closed).
                    connections.shutdown().await;
                    let _ = ack.send(());
                }
                Some(Command::Unblock(ack)) => {
                    blocked = false;
                    let _ = ack.send(());
                }
            },
            accepted = listener.accept() => {
                if let Ok((client, _)) = accepted {
                    if blocked {
                        drop(client);
                    } else {
                        connections.spawn(forward(client, target));
                    }
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

async fn forward(mut client: TcpStream, target: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(target).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
