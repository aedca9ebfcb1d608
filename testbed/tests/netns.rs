//! A network namespace of the bed's own reaches a server on the test's
//! loopback only through a relay, at the same address.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;

use testbed::support::netns::NetNs;

/// Inside `ns`: connect to 127.0.0.1:`port`, send a line, print the answer.
fn ask(ns: &NetNs, port: u16) -> std::process::Output {
    ns.command(std::path::Path::new("bash"))
        .args([
            "-c",
            &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo ping >&3 && head -c 5 <&3"),
        ])
        .output()
        .expect("nsenter runs")
}

#[test]
fn a_relay_carries_connections_from_a_namespace_to_the_tests_loopback() {
    // An echo server on the test's loopback.
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in server.incoming().flatten() {
            let mut buf = [0u8; 5];
            if conn.read_exact(&mut buf).is_ok() {
                let _ = conn.write_all(b"pong\n");
            }
        }
    });
    let ns = NetNs::create(&format!("ipf-test-{}", std::process::id())).unwrap();
    // The namespace's loopback is its own: nothing answers there yet.
    assert!(!ask(&ns, addr.port()).status.success());
    let _relay = ns.relay(addr, addr).unwrap();
    let out = ask(&ns, addr.port());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pong\n");
    // The namespace goes with its handle.
    let name = ns.name.clone();
    drop(ns);
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&name));
}
