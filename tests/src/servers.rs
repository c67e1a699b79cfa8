//! Small real servers for topology tests, each bound inside a namespace and
//! stopped (and joined) when dropped.
use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// A TCP server that answers every line with `"<name>\n"`.
pub struct EchoName {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    peers: Arc<Mutex<HashSet<IpAddr>>>,
    handle: Option<JoinHandle<()>>,
}

impl EchoName {
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(HashSet::new()));
        let (s, c, name) = (stop.clone(), served.clone(), name.to_string());
        let seen = peers.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = crate::netns::spawn_in(ns, move || {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut workers = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        seen.lock().unwrap().insert(peer.ip().to_canonical());
                        let (name, c) = (name.clone(), c.clone());
                        workers.push(thread::spawn(move || {
                            stream.set_nonblocking(false).ok();
                            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
                            let mut w = stream.try_clone().unwrap();
                            for line in BufReader::new(stream).lines() {
                                if line.is_err() {
                                    break;
                                }
                                // Counted before the answer leaves, so a
                                // client that has its answer finds it
                                // counted.
                                c.fetch_add(1, Ordering::Relaxed);
                                if writeln!(w, "{name}").is_err() {
                                    break;
                                }
                            }
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("accept on {addr}: {e}"),
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("server did not start");
        Self {
            stop,
            served,
            peers,
            handle: Some(handle),
        }
    }

    /// Client addresses of the connections accepted so far.
    pub fn peers(&self) -> HashSet<IpAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Requests received so far (each is answered unless the client left).
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for EchoName {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One request to an [`EchoName`] server (through the balancer or not):
/// connect, send a line, return the name it answers with.
pub fn ask(to: SocketAddr) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim().to_string())
}
