//! The real `dualroute run` on a unix socket: one milter per socket
//! (a second instance is refused and the first keeps serving), a stale
//! socket is replaced, the socket is 0660 with its directory's group and is
//! removed on exit only while it is still ours; a SIGTERM or SIGHUP sent
//! as soon as the socket accepts, while the milter is still starting, is
//! handled (not the default action); systemd notification
//! (READY, RELOADING/READY around SIGHUP); `check` on the socket
//! directory. (Logs: tests/logging.rs.)

mod support;

use indymilter_test::{Status, TestConnection};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{dualroute, unix_config, MilterProcess, UnixTree};

fn setup() -> UnixTree {
    UnixTree::new("dualroute-socket-")
}

/// A milter conversation as Postfix has it: the unknown recipient of the
/// dual domain is refused, the account is accepted.
fn converse(socket: &Path) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut conn = TestConnection::configure()
            .open_unix(socket)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
        conn.connect("client.test", [127, 0, 0, 3])
            .await
            .expect("connect");
        conn.mail(["<sender@outside.test>"]).await.expect("mail");
        let refused = conn.rcpt(["<zed@example.com>"]).await.expect("rcpt");
        assert!(
            matches!(&refused, Status::Reject { .. } | Status::Tempfail { .. })
                || format!("{refused:?}").contains("550"),
            "zed@ (no account, dual) must be refused, got {refused:?}"
        );
        let kept = conn.rcpt(["<alice@example.com>"]).await.expect("rcpt");
        assert!(
            matches!(kept, Status::Continue),
            "alice@ must be accepted, got {kept:?}"
        );
        conn.abort().await.expect("abort");
        conn.close().await.expect("close");
    });
}

fn inode(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

#[test]
fn second_instance_is_refused_and_the_first_keeps_serving() {
    let s = setup();
    let first = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("first.log"), &[]);
    let before = inode(&s.socket);

    // Before the fix the second one deleted the live socket, bound its own
    // and served: it must exit by itself, non-zero, at once.
    let mut second = Command::new(env!("CARGO_BIN_EXE_dualroute"))
        .args(["run", "--config"])
        .arg(&s.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second dualroute");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second instance kept running on the first one's socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(
        !status.success(),
        "the second instance must exit non-zero: {stderr}"
    );
    let expected = format!(
        "another dualroute (or another program) is listening on {}",
        s.socket.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");

    // The first one's socket is untouched and it still applies its policy.
    assert_eq!(inode(&s.socket), before, "the socket file was replaced");
    converse(&s.socket);
    drop(first);
}

#[test]
fn stale_socket_is_replaced_and_ours_removed_on_exit() {
    let s = setup();
    let mut milter = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("m.log"), &[]);
    milter.kill(); // SIGKILL: the socket file stays behind.
    assert!(s.socket.exists(), "SIGKILL leaves the socket file");
    milter.spawn();
    converse(&s.socket);
    assert!(
        milter.log().contains("replaced the stale socket"),
        "{}",
        milter.log()
    );
    milter.signal("TERM");
    assert!(milter.wait_exit().success());
    assert!(
        !s.socket.exists(),
        "a clean exit removes our own socket file"
    );
}

#[test]
fn a_socket_that_is_no_longer_ours_is_left_in_place() {
    let s = setup();
    let mut milter = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("m.log"), &[]);
    // Someone removed our socket and another program bound the path.
    fs::remove_file(&s.socket).expect("remove the socket");
    let other = UnixListener::bind(&s.socket).expect("bind the path again");
    let theirs = inode(&s.socket);
    milter.signal("TERM");
    assert!(milter.wait_exit().success());
    assert_eq!(
        inode(&s.socket),
        theirs,
        "dualroute removed a socket that was not its own"
    );
    drop(other);
}

/// A milter that accepts connections but is still starting: its state
/// file is a FIFO, so reading the holds waits until the test writes to it.
/// Anything that sees the socket accept may signal the milter (systemd,
/// logrotate, an admin): the signal must be handled, not kill it.
fn stalled_after_bind(s: &UnixTree) -> (MilterProcess, std::path::PathBuf) {
    let state = s.dir.join("state");
    fs::create_dir_all(&state).expect("create the state directory");
    let fifo = state.join("example.com.disabled");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo (coreutils)");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let milter = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("m.log"), &[]);
    (milter, fifo)
}

/// Lets the stalled milter go on: the FIFO is moved aside (later reads
/// find no state file) and opened for writing, which ends the milter's
/// read with nothing read. Gives up if the milter is gone.
fn release(milter: &mut MilterProcess, fifo: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let parked = fifo.with_extension("released");
    fs::rename(fifo, &parked).expect("move the FIFO aside");
    let deadline = Instant::now() + Duration::from_secs(10);
    while milter.is_running() && Instant::now() < deadline {
        // Non-blocking: ENXIO while the milter has not opened it yet.
        match fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&parked)
        {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("open {}: {e}", parked.display()),
        }
    }
}

#[test]
fn a_signal_while_starting_is_handled_once_the_socket_accepts() {
    // SIGTERM: a clean exit, and our socket file removed.
    let s = setup();
    let (mut milter, fifo) = stalled_after_bind(&s);
    milter.signal("TERM");
    std::thread::sleep(Duration::from_millis(200));
    release(&mut milter, &fifo);
    let status = milter.wait_exit();
    assert!(
        status.success(),
        "SIGTERM while starting: {status}, not a clean exit:\n{}",
        milter.log()
    );
    assert!(
        !s.socket.exists(),
        "a clean exit removes our own socket file"
    );

    // SIGHUP: the milter reloads and keeps serving.
    let s = setup();
    let (mut milter, fifo) = stalled_after_bind(&s);
    milter.signal("HUP");
    std::thread::sleep(Duration::from_millis(200));
    release(&mut milter, &fifo);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !milter.log().contains("SIGHUP: reloaded") && Instant::now() < deadline {
        assert!(
            milter.is_running(),
            "SIGHUP while starting killed the milter:\n{}",
            milter.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(milter.is_running(), "{}", milter.log());
    converse(&s.socket);
}

#[test]
fn socket_is_0660_with_the_group_of_its_directory() {
    let s = setup();
    let sockdir = s.socket.parent().expect("parent").to_path_buf();
    // A group other than ours (root's): the socket must take the
    // directory's, as Postfix reaches it through that group.
    let gid = support::user_ids("nobody").1;
    std::os::unix::fs::chown(&sockdir, None, Some(gid)).expect("chgrp the socket directory");
    let _milter = MilterProcess::start_unix(&s.config, &s.socket, &s.dir.join("m.log"), &[]);
    let meta = fs::symlink_metadata(&s.socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), gid, "socket group");
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let s = setup();
    fs::write(&s.socket, "not a socket").expect("write");
    let (status, out) = dualroute(&s.config, &["run"]);
    assert!(!status.success(), "{out}");
    assert!(out.contains("exists and is not a socket"), "{out}");
    assert_eq!(fs::read_to_string(&s.socket).expect("kept"), "not a socket");
}

#[test]
fn systemd_notify_ready_and_reloading() {
    let s = setup();
    let notify_path = s.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let notify_env = notify_path.to_str().expect("UTF-8 path").to_owned();
    let mut milter = MilterProcess::start_unix(
        &s.config,
        &s.socket,
        &s.dir.join("m.log"),
        &[("NOTIFY_SOCKET", &notify_env)],
    );
    let ready = recv();
    assert_eq!(ready.trim(), "READY=1", "first notification");
    milter.signal("HUP");
    let reloading = recv();
    assert!(reloading.contains("RELOADING=1"), "{reloading}");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert_eq!(recv().trim(), "READY=1", "after the reload");
    milter.signal("TERM");
    assert_eq!(recv().trim(), "STOPPING=1");
    assert!(milter.wait_exit().success());
}

#[test]
fn check_names_a_missing_socket_directory_and_the_fix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let missing = tmp.path().join("nowhere").join("dualroute.sock");
    let config = unix_config(tmp.path(), &missing);
    let (status, out) = dualroute(&config, &["check"]);
    assert!(!status.success(), "{out}");
    let want = format!(
        "install -d -o dualroute -g dualroute -m 0750 {}",
        missing.parent().expect("parent").display()
    );
    assert!(out.contains(&want), "{out}");

    // The chroot-relative form Postfix's smtpd_milters uses.
    let config = unix_config(tmp.path(), Path::new("/dualroute/dualroute.sock"));
    let (status, out) = dualroute(&config, &["check"]);
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("listen: unix:/var/spool/postfix/dualroute/dualroute.sock"),
        "{out}"
    );

    // A usable directory passes.
    let ok = tmp.path().join("ok");
    fs::create_dir(&ok).expect("mkdir");
    fs::set_permissions(&ok, fs::Permissions::from_mode(0o750)).expect("chmod");
    let config = unix_config(tmp.path(), &ok.join("d.sock"));
    let (status, out) = dualroute(&config, &["check"]);
    assert!(status.success(), "{out}");
}
