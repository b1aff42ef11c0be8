//! The harness's ports (tests/support/ports.rs, issue 22 §1) and
//! `dualroute run`'s socket activation, which the harness uses to hand the
//! milter its socket: a port chosen for a server is never one another
//! process can take, before the server binds it or while it is down.

mod support;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use support::ports::{holder, Holder};
use support::{dualroute_output, MilterProcess, Port};

fn config(dir: &std::path::Path, port: u16) -> std::path::PathBuf {
    let path = dir.join("milter.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: inet:127.0.0.1:{port}\ninstance: ports.test\nstate_dir: {}\n",
            dir.join("state").display()
        ),
    )
    .expect("write milter.yaml");
    path
}

/// The old `free_port()` chose a port and let it go: another process
/// could bind it before the milter did (`milter_down_tempfails_then_retry_
/// delivers_once` failed so under load). A reserved port refuses
/// connections and cannot be bound by anyone else.
#[test]
fn a_reserved_port_cannot_be_taken_and_refuses_connections() {
    let port = Port::reserve();
    let other = TcpListener::bind((Ipv4Addr::LOCALHOST, port.number()));
    assert!(
        other.is_err(),
        "another process took the reserved port {port}: {other:?}"
    );
    assert!(
        TcpStream::connect(port.addr()).is_err(),
        "a reserved port accepted a connection"
    );
    assert_eq!(holder(port.number(), &[std::process::id()]), Holder::Nobody);
}

/// The milter serves the socket the harness passes (LISTEN_FDS), and the
/// port stays ours while it is killed: a restart gets it back.
#[test]
fn the_milter_serves_the_passed_socket_and_keeps_its_port_across_a_restart() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let port = Port::reserve();
    let path = config(dir.path(), port.number());
    let mut milter = MilterProcess::start(&path, &port, &dir.path().join("milter.log"));
    assert_eq!(holder(port.number(), &[milter.pid()]), Holder::Ours);
    milter.wait_log(
        &[&format!(
            "inet:127.0.0.1:{port}: the socket passed by the service manager (LISTEN_FDS)"
        )],
        1,
    );

    milter.kill();
    assert!(
        TcpStream::connect(port.addr()).is_err(),
        "the port accepts with the milter down"
    );
    assert!(
        TcpListener::bind((Ipv4Addr::LOCALHOST, port.number())).is_err(),
        "another process could take port {port} while the milter is down"
    );
    milter.spawn();
    assert_eq!(holder(port.number(), &[milter.pid()]), Holder::Ours);
}

/// A passed socket that is not the one `listen:` names stops `run` with
/// both named: the MTA is pointed at `listen:`.
#[test]
fn a_passed_socket_that_is_not_listen_stops_run() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let passed = Port::reserve();
    let named = Port::reserve();
    let path = config(dir.path(), named.number());
    let out = support::milter::activated(passed.listen())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run dualroute");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "the service manager passed a socket on inet:127.0.0.1:{passed}, but milter.yaml says listen: inet:127.0.0.1:{named}"
        )),
        "{err}"
    );
}

/// Without LISTEN_FDS, `run` binds `listen:` itself, as before.
#[test]
fn without_a_passed_socket_run_binds_listen() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // Held: `run` must fail to bind it, and say so.
    let held = support::loopback_listener();
    let port = held.local_addr().expect("local address").port();
    let out = dualroute_output(&config(dir.path(), port), &["run"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on inet:127.0.0.1:{port}")),
        "{err}"
    );
}
