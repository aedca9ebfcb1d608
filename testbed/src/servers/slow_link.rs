//! A slow uplink: a TCP relay to a loopback server that delivers the
//! server's answers at a set rate, shared by every connection as a real
//! uplink is, so that a pull lasts long enough for a test to act while it
//! runs (kill the seed's containerd mid-pull, ...) and N nodes pulling at
//! once share it. Requests go through at full speed. It can also be cut, as a
//! network partition cuts a link (connections under way are reset, new ones
//! are accepted and never answered), and heal again. A connection it cannot
//! pass on (the server is stopped) is closed at once, as the server's refusal
//! would be. It counts the connections it accepts: each is a request's
//! attempt to get through.
//! Stopped when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Result, io_err};

pub struct SlowLink {
    /// `127.0.0.1:port` to use in place of the server's address.
    pub host: String,
    stop: Arc<AtomicBool>,
    state: Arc<AtomicU8>,
    accepted: Arc<AtomicU64>,
    /// The client side of every connection, to reset them when cut.
    open: Arc<Mutex<Vec<TcpStream>>>,
    budget: Arc<Budget>,
}

const OPEN: u8 = 0;
const CUT: u8 = 1;

impl SlowLink {
    /// Relays to `target` (`ip:port`), answers at `bytes_per_second`.
    pub fn start(target: &str, bytes_per_second: u64) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err(target.as_ref()))?;
        let host = listener
            .local_addr()
            .map_err(io_err(target.as_ref()))?
            .to_string();
        listener
            .set_nonblocking(true)
            .map_err(io_err(target.as_ref()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let state = Arc::new(AtomicU8::new(OPEN));
        let link_state = state.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = accepted.clone();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let opened = open.clone();
        let target = target.to_string();
        let budget = Arc::new(Budget {
            rate: bytes_per_second,
            started: Instant::now(),
            sent: Mutex::new(0),
            delivered: AtomicU64::new(0),
        });
        let shared = budget.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        counted.fetch_add(1, Ordering::Relaxed);
                        let _ = client.set_nonblocking(false);
                        match link_state.load(Ordering::Relaxed) {
                            // Cut: held open, never answered, as behind a partition.
                            CUT => {
                                opened.lock().expect("open connections").push(client);
                            }
                            _ => match TcpStream::connect(&target) {
                                Ok(server) => {
                                    if let Ok(c) = client.try_clone() {
                                        opened.lock().expect("open connections").push(c);
                                    }
                                    relay(client, server, budget.clone());
                                }
                                // The server is down: so is the connection.
                                Err(_) => {
                                    let _ = client.shutdown(Shutdown::Both);
                                }
                            },
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(SlowLink {
            host,
            stop,
            state,
            accepted,
            open,
            budget: shared,
        })
    }

    /// Bytes of answers delivered to clients so far.
    pub fn delivered(&self) -> u64 {
        self.budget.delivered.load(Ordering::Relaxed)
    }

    /// Cuts the link: connections under way are reset, new ones hang.
    pub fn cut(&self) {
        self.state.store(CUT, Ordering::Relaxed);
        for c in self.open.lock().expect("open connections").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Works again, for new connections.
    pub fn heal(&self) {
        self.state.store(OPEN, Ordering::Relaxed);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// The link's capacity, shared by its connections: a chunk may go once the
/// bytes sent so far, this chunk included, fit in the time elapsed.
struct Budget {
    rate: u64,
    started: Instant,
    sent: Mutex<u64>,
    delivered: AtomicU64,
}

impl Budget {
    /// Books `n` bytes; how long to wait before sending them.
    fn book(&self, n: usize) -> Duration {
        let mut sent = self.sent.lock().expect("budget lock");
        // An idle link does not save up capacity for a burst later.
        let now = self.started.elapsed();
        let floor = (now.as_secs_f64() * self.rate as f64) as u64;
        *sent = (*sent).max(floor) + n as u64;
        let due = Duration::from_secs_f64(*sent as f64 / self.rate as f64);
        due.saturating_sub(now)
    }
}

fn relay(client: TcpStream, server: TcpStream, budget: Arc<Budget>) {
    let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Requests: at full speed.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    // Answers: in 16 KiB steps, paced to the link's shared rate.
    std::thread::spawn(move || {
        let (mut server, mut client) = (server, client);
        let mut buf = [0u8; 16 << 10];
        loop {
            let n = match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            std::thread::sleep(budget.book(n));
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
            budget.delivered.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = client.shutdown(Shutdown::Write);
    });
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_share_the_rate_and_idle_time_is_not_saved_up() {
        let budget = Budget {
            rate: 1000,
            started: Instant::now(),
            sent: Mutex::new(0),
            delivered: AtomicU64::new(0),
        };
        // Two connections' chunks queue behind each other: 0.5 s, then 1 s.
        let first = budget.book(500);
        let second = budget.book(500);
        assert!(first <= Duration::from_millis(500) && first > Duration::from_millis(400));
        assert!(second > Duration::from_millis(900), "{second:?}");
        // A link idle for a while starts again from now, not from a credit.
        let idle = Budget {
            rate: 1000,
            started: Instant::now() - Duration::from_secs(10),
            sent: Mutex::new(0),
            delivered: AtomicU64::new(0),
        };
        assert!(idle.book(500) > Duration::from_millis(400));
    }
}
