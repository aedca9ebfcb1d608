//! A slow uplink: a TCP relay to a loopback server that delivers the
//! server's answers at a set rate, so that a pull lasts long enough for a
//! test to act while it runs (kill the seed's containerd mid-pull, ...).
//! Requests go through at full speed. Stopped when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Result, io_err};

pub struct SlowLink {
    /// `127.0.0.1:port` to use in place of the server's address.
    pub host: String,
    stop: Arc<AtomicBool>,
}

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
        let target = target.to_string();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        if let Ok(server) = TcpStream::connect(&target) {
                            relay(client, server, bytes_per_second);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(SlowLink { host, stop })
    }
}

fn relay(client: TcpStream, server: TcpStream, rate: u64) {
    let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // Requests: at full speed.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    // Answers: in 16 KiB steps, paced to the rate.
    std::thread::spawn(move || {
        let (mut server, mut client) = (server, client);
        let mut buf = [0u8; 16 << 10];
        let started = Instant::now();
        let mut sent: u64 = 0;
        loop {
            let n = match server.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if client.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n as u64;
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let _ = client.shutdown(Shutdown::Write);
    });
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
