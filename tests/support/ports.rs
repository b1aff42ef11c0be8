//! TCP ports for the tests' servers, chosen so that no test can use a
//! port another process takes (issue 22). There used to be a
//! `free_port()` that picked a free port and let the server bind it
//! later: under load another test's sink or Postfix took the port in
//! between, and one test's mail arrived at another test's server.
//!
//! Three cases, three tools:
//! - **Our own servers** (sinks, SMTP stubs, a silent name server):
//!   [`loopback_listener`] binds 127.0.0.1:0 and the test keeps the socket,
//!   so the port is never free between choosing and binding.
//! - **The milter** (`dualroute run`) and **a port that must refuse
//!   connections** (a dead destination): a [`Port`] holds a socket bound to
//!   127.0.0.1:0 without listening, so a connection to it is refused as to
//!   a closed port, and nothing else can bind it (the reservation does not
//!   set SO_REUSEADDR, so even another SO_REUSEADDR socket conflicts).
//!   [`Port::listen`] opens a second socket on the same port (both set
//!   SO_REUSEPORT, which Linux allows for sockets of one user) and hands it
//!   to `dualroute run` by socket activation (tests/support/milter.rs,
//!   docs/design.md "Socket activation"); when the milter dies its socket
//!   closes and the port refuses again, still reserved, so a restarted
//!   milter gets the same port back. No other program of the suite sets
//!   SO_REUSEPORT.
//! - **Daemons that bind their own ports** (a private Postfix's smtpd,
//!   Sendmail, smtp-sink, dnsmasq, the milter's metrics endpoint): they
//!   cannot take a socket from us, so [`start_on_a_port`] starts them on a
//!   candidate port and starts again on another one when the daemon could
//!   not bind it, a bounded number of times. Whether the daemon bound it is
//!   read from the kernel ([`holder`]): the listening socket on the port
//!   must be one of the daemon's own file descriptors, not just "something
//!   listens there" (that something may be the other process).

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

/// A listening socket on 127.0.0.1 at a port the kernel chose, for a
/// server the test runs itself.
pub fn loopback_listener() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:0: {e}"))
}

/// A TCP port on 127.0.0.1 reserved for the life of this value: bound,
/// not listening (connections are refused), and bindable only through
/// [`Port::listen`]. Displays as its number, for configuration text.
pub struct Port {
    reservation: Socket,
    port: u16,
}

impl Port {
    /// A port the kernel chose, reserved.
    pub fn reserve() -> Port {
        let reservation = reuse_port_socket();
        reservation
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
        let port = reservation
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .expect("the local address of a bound TCP socket");
        Port { reservation, port }
    }

    pub fn number(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1:port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A new socket listening on this port, to hand to a server. The port
    /// stays reserved after the server closes it.
    pub fn listen(&self) -> TcpListener {
        let socket = reuse_port_socket();
        let listening = socket
            .bind(&self.addr().into())
            .and_then(|()| socket.listen(1024));
        if let Err(e) = listening {
            panic!("cannot listen on the reserved port {}: {e}", self.addr());
        }
        socket.into()
    }

    /// Another handle on the same reservation (the port stays reserved
    /// until both are dropped).
    pub fn try_clone(&self) -> Port {
        Port {
            reservation: self
                .reservation
                .try_clone()
                .expect("duplicate the port's socket"),
            port: self.port,
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.port.fmt(f)
    }
}

impl fmt::Debug for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Port({})", self.port)
    }
}

/// A TCP socket with SO_REUSEPORT and without SO_REUSEADDR (see the
/// module comment).
fn reuse_port_socket() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)
        .unwrap_or_else(|e| panic!("cannot create a TCP socket: {e}"));
    socket
        .set_reuse_port(true)
        .unwrap_or_else(|e| panic!("cannot set SO_REUSEPORT: {e}"));
    socket
}

/// How often [`start_on_ports`] tries other ports.
const ATTEMPTS: usize = 5;

/// Starts a daemon that binds its own port: `start(port)` starts it on
/// `port` and returns it, or `Err(why)` when the daemon could not bind the
/// port (another process has it); any other failure is the callback's own
/// panic. Tries [`ATTEMPTS`] candidate ports, then fails the test with
/// every reason.
pub fn start_on_a_port<T>(what: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    start_on_ports(what, 1, |ports| start(ports[0]))
}

/// [`start_on_a_port`] for a daemon that binds `count` ports: each attempt
/// gets `count` new candidates.
pub fn start_on_ports<T>(
    what: &str,
    count: usize,
    mut start: impl FnMut(&[u16]) -> Result<T, String>,
) -> T {
    let mut tried = Vec::new();
    for _ in 0..ATTEMPTS {
        let ports: Vec<u16> = (0..count).map(|_| candidate()).collect();
        match start(&ports) {
            Ok(started) => return started,
            Err(why) => {
                eprintln!("{what} could not bind 127.0.0.1:{ports:?}, trying other ports: {why}");
                tried.push(format!("ports {ports:?}: {why}"));
            }
        }
    }
    panic!(
        "{what} could not bind its ports in {ATTEMPTS} attempts (each time taken by another process?):\n{}",
        tried.join("\n")
    )
}

/// [`start_on_a_port`] for a start that is async (the whole service
/// in-process, whose metrics endpoint binds its own port).
pub async fn start_on_a_port_async<T, F>(what: &str, mut start: impl FnMut(u16) -> F) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let mut tried = Vec::new();
    for _ in 0..ATTEMPTS {
        let port = candidate();
        match start(port).await {
            Ok(started) => return started,
            Err(why) => {
                eprintln!("{what} could not bind 127.0.0.1:{port}, trying another port: {why}");
                tried.push(format!("port {port}: {why}"));
            }
        }
    }
    panic!(
        "{what} could not bind a port in {ATTEMPTS} attempts (each time taken by another process?):\n{}",
        tried.join("\n")
    )
}

/// Waits until this very process (a service running in-process) listens
/// on `port`; `Err` when another process does. Polls on the blocking pool,
/// so the service's own tasks run meanwhile.
pub async fn bound_here(port: u16) -> Result<(), String> {
    let me = std::process::id();
    let bound =
        tokio::task::spawn_blocking(move || wait_bound(port, super::WAIT, || vec![me], || None))
            .await
            .expect("wait for the port");
    match bound {
        Ok(()) => Ok(()),
        Err(NotBound::Taken(why)) => Err(why),
        Err(NotBound::TimedOut) => panic!(
            "nothing listens on 127.0.0.1:{port} after {:?}",
            super::WAIT
        ),
    }
}

/// A port for a daemon that binds it itself: one that nothing listens on
/// now, from 20000–31999. Not from `bind(0)`: that range
/// (`ip_local_port_range`, 32768–60999 by default) is the one the kernel
/// hands to every [`Port`] and [`loopback_listener`] of the suite and to
/// outgoing connections, which the daemon would then collide with. Each
/// candidate is handed out once per process, starting at an offset
/// derived from the pid so concurrent test binaries rarely meet; when they
/// do, [`start_on_ports`] tries again.
fn candidate() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20000;
    const COUNT: u32 = 12000;
    let offset = (std::process::id() % 600) * 20;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (FIRST + (offset + n) % COUNT) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() && !is_listening(port) {
            return port;
        }
    }
    panic!(
        "no free TCP port on 127.0.0.1 in {FIRST}..{}",
        FIRST + COUNT
    );
}

/// Who holds the listening TCP socket on 127.0.0.1:port (or 0.0.0.0:port).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Holder {
    /// Nothing listens there.
    Nobody,
    /// One of the given processes has the listening socket among its file
    /// descriptors.
    Ours,
    /// Something else listens there.
    Other,
}

/// Who listens on `port`: one of `pids`, another process, or nobody.
/// Reads /proc/net/tcp and /proc/PID/fd (the suite runs as root).
pub fn holder(port: u16, pids: &[u32]) -> Holder {
    let Some(inode) = listening_inode(port) else {
        return Holder::Nobody;
    };
    let link = format!("socket:[{inode}]");
    let ours = pids.iter().any(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == link.as_str()))
    });
    if ours {
        Holder::Ours
    } else {
        Holder::Other
    }
}

/// Why a daemon does not listen on its port.
#[derive(Debug)]
pub enum NotBound {
    /// Another process listens there, or the daemon said it could not
    /// bind: start again on another port.
    Taken(String),
    /// Nothing listens there yet, after the time allowed.
    TimedOut,
}

/// Waits until one of `pids()` listens on `port`, or another process
/// does, or `failed()` says the daemon gave up (it exited, or logged that
/// the address is in use), for up to `within`.
pub fn wait_bound(
    port: u16,
    within: Duration,
    mut pids: impl FnMut() -> Vec<u32>,
    mut failed: impl FnMut() -> Option<String>,
) -> Result<(), NotBound> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(why) = failed() {
            return Err(NotBound::Taken(why));
        }
        match holder(port, &pids()) {
            Holder::Ours => return Ok(()),
            // Its socket is in LISTEN state: the daemon's bind fails.
            Holder::Other => {
                return Err(NotBound::Taken(format!(
                    "another process listens on 127.0.0.1:{port}"
                )))
            }
            Holder::Nobody if Instant::now() > deadline => return Err(NotBound::TimedOut),
            Holder::Nobody => std::thread::sleep(super::POLL),
        }
    }
}

/// Whether something listens on TCP `port` on 127.0.0.1 or 0.0.0.0. Reads
/// /proc/net/tcp instead of connecting, so smtpd logs no extra session.
pub fn is_listening(port: u16) -> bool {
    match fs::read_to_string("/proc/net/tcp") {
        Ok(_) => listening_inode(port).is_some(),
        Err(_) => TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok(),
    }
}

/// The inode of the socket listening on 127.0.0.1:port or 0.0.0.0:port.
fn listening_inode(port: u16) -> Option<u64> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let wanted = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // fields[1] is local_address, fields[3] is st (0A: LISTEN),
        // fields[9] is the inode.
        (fields.len() > 9 && wanted.iter().any(|w| w == fields[1]) && fields[3] == "0A")
            .then(|| fields[9].parse().ok())
            .flatten()
    })
}
