//! The in-process milter for protocol-level tests: the whole service runs
//! on a loopback listener the test keeps bound (`127.0.0.1:0`, never
//! closed before use), exactly as `main.rs` runs it (`dualroute::run`),
//! and each test drives it with indymilter-test as an MTA would.

use dualroute::holds::Holds;
use dualroute::policy::Policy;
use dualroute::{Control, Intervals, Start};
use indymilter_test::{
    EomAction, MacroStage, ProtoOpts, Status, TestConnection, TestConnectionBuilder,
};
use std::{
    collections::BTreeSet,
    ffi::CString,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};
use std::{path::Path, sync::Arc};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// An ordinary client on the Internet: not a gateway.
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
/// The gateway listed in the tests' configurations (`gateways: [192.0.2.25, ...]`).
pub const GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25));

/// The header that marks routed mail (docs/design.md §2, end of message).
pub const LOOP_HEADER: &str = "X-Dualroute";

/// Parses and loads a test configuration, failing the test with the
/// loader's own message when it is invalid.
pub fn policy(yaml: &str) -> Policy {
    let config =
        dualroute::config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("test config: {e}"));
    Policy::load(config).unwrap_or_else(|e| panic!("test accounts: {e}"))
}

/// What `dualroute run` starts from, for a test configuration (reloads
/// read `test.yaml`, which does not exist: use [`start_at`] to reload).
pub fn start(yaml: &str) -> Start {
    Start {
        config_path: "test.yaml".into(),
        policy: policy(yaml),
        intervals: Intervals::default(),
    }
}

/// What `dualroute run` starts from for the configuration file at `path`.
pub fn start_at(path: &Path, intervals: Intervals) -> Start {
    let policy = dualroute::load_policy(path).unwrap_or_else(|e| panic!("test config: {e}"));
    Start {
        config_path: path.to_owned(),
        policy,
        intervals,
    }
}

/// The milter, serving on a loopback port until [`Milter::shutdown`].
pub struct Milter {
    addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    handle: JoinHandle<io::Result<()>>,
    /// The running service's handle, as `dualroute run` keeps it for
    /// SIGHUP.
    pub control: Control,
}

impl Milter {
    pub async fn start(yaml: &str) -> Milter {
        Milter::serve(start(yaml)).await
    }

    /// Runs the whole service (`dualroute::run`: the milter and its tasks)
    /// from `start`, and returns once it serves.
    pub async fn serve(start: Start) -> Milter {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the listener");
        let (shutdown, stop) = oneshot::channel::<()>();
        let (control, requests) = dualroute::control();
        let handle = tokio::spawn(dualroute::run(listener, start, requests, async move {
            let _ = stop.await;
        }));
        assert!(control.running().await, "the service ended at start");
        Milter {
            addr,
            shutdown,
            handle,
            control,
        }
    }

    /// Asks for a reload as SIGHUP does, without waiting for it (a signal
    /// is not answered): the reload runs when the reload actor comes to
    /// it; its failure is printed, as `dualroute run` logs it.
    pub async fn sighup(&self) {
        let control = self.control.clone();
        tokio::spawn(async move {
            if let Err(e) = control.reload().await {
                eprintln!("SIGHUP: reload failed, keeping the running configuration: {e}");
            }
        });
    }

    /// Reloads and waits for the outcome.
    pub async fn reload(&self) -> Result<(), dualroute::LoadError> {
        self.control.reload().await
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.control.policy().expect("the service runs")
    }

    /// The holds in force.
    pub fn holds(&self) -> Arc<Holds> {
        self.control.holds().expect("the service runs")
    }

    /// The metrics as the endpoint serves them.
    pub fn metrics(&self) -> String {
        self.control.metrics().expect("the service runs")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the milter and checks that its accept loop ended cleanly. (A
    /// panic in a session task does not reach here: indymilter detaches
    /// sessions. It shows as that session's connection being dropped.)
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(());
        self.handle
            .await
            .expect("milter task panicked")
            .expect("milter ended with an error");
    }

    /// Opens an SMTP session from `client`.
    pub async fn session(&self, client: IpAddr) -> Session {
        Session::open(self.addr, client).await
    }

    /// One message in a session of its own: MAIL (authenticated as `auth`
    /// if given), one RCPT per entry of `rcpts` (each entry is the RCPT
    /// argument list: path first, then ESMTP parameters), then the message.
    pub async fn deliver(&self, client: IpAddr, auth: Option<&str>, rcpts: &[&[&str]]) -> Delivery {
        let mut session = self.session(client).await;
        let delivery = session.message(auth, rcpts, &[]).await;
        session.close().await;
        delivery
    }
}

/// What the milter did with one message.
#[derive(Debug)]
pub struct Delivery {
    /// The milter's reply to each RCPT, in order.
    pub rcpt: Vec<Status>,
    /// Every end-of-message action, in the order the milter sent them.
    pub actions: Vec<EomAction>,
    /// The milter's final reply at end of message.
    pub eom: Status,
}

impl Delivery {
    /// The single RCPT reply of a one-recipient message.
    pub fn status(&self) -> &Status {
        assert_eq!(self.rcpt.len(), 1, "expected exactly one RCPT");
        &self.rcpt[0]
    }
}

/// One SMTP session as the MTA reports it to the milter.
pub struct Session {
    pub conn: TestConnection,
}

impl Session {
    pub async fn open(addr: SocketAddr, client: IpAddr) -> Session {
        Session::open_as(TestConnection::configure(), addr, client).await
    }

    /// Opens a session as an MTA that offers what `mta` is configured with
    /// (protocol version, actions, options).
    pub async fn open_as(mta: TestConnectionBuilder, addr: SocketAddr, client: IpAddr) -> Session {
        let mut conn = mta.open_tcp(addr).await.expect("milter negotiation");
        let status = conn
            .connect("client.example.org", client)
            .await
            .expect("connect stage");
        let mut session = Session { conn };
        assert_eq!(
            status,
            session.continued(ProtoOpts::NOREPLY_CONNECT),
            "connect from {client}"
        );
        if !session.skipped(ProtoOpts::NO_HELO) {
            let status = session
                .conn
                .helo("client.example.org")
                .await
                .expect("helo stage");
            assert_eq!(status, Status::Continue, "HELO");
        }
        session
    }

    /// The milter asked not to see this stage; an MTA then skips it.
    fn skipped(&self, stage: ProtoOpts) -> bool {
        self.conn.negotiated_opts().contains(stage)
    }

    /// The reply to a stage that always continues: none at all where the
    /// milter negotiated not to reply to it (`no_reply`, e.g.
    /// `ProtoOpts::NOREPLY_HEADER`).
    pub fn continued(&self, no_reply: ProtoOpts) -> Status {
        if self.conn.negotiated_opts().contains(no_reply) {
            Status::Noreply
        } else {
            Status::Continue
        }
    }

    /// MAIL FROM, with `{auth_authen}` when the client authenticated.
    pub async fn mail(&mut self, auth: Option<&str>) {
        if let Some(user) = auth {
            self.conn
                .macros(MacroStage::Mail, [("{auth_authen}", user)])
                .await
                .expect("macros at MAIL");
        }
        let status = self
            .conn
            .mail(["<sender@example.org>"])
            .await
            .expect("mail stage");
        assert_eq!(status, self.continued(ProtoOpts::NOREPLY_MAIL), "MAIL FROM");
    }

    /// RCPT TO with `args` (path first, then ESMTP parameters).
    pub async fn rcpt(&mut self, args: &[&str]) -> Status {
        self.conn
            .rcpt(args.iter().copied())
            .await
            .expect("rcpt stage")
    }

    /// RCPT TO with `args`, preceded by the `{rcpt_addr}` macro as Postfix
    /// sends it (its own parse of the argument).
    pub async fn rcpt_as_parsed(&mut self, args: &[&str], rcpt_addr: &str) -> Status {
        self.conn
            .macros(MacroStage::Rcpt, [("{rcpt_addr}", rcpt_addr)])
            .await
            .expect("macros at RCPT");
        self.rcpt(args).await
    }

    /// RCPT TO with arguments that need not be UTF-8 (clients send any bytes).
    pub async fn rcpt_bytes(&mut self, args: &[&[u8]]) -> Status {
        let args: Vec<CString> = args
            .iter()
            .map(|a| CString::new(a.to_vec()).expect("no NUL in test strings"))
            .collect();
        self.conn.rcpt(args).await.expect("rcpt stage")
    }

    /// DATA, the usual headers plus `headers`, end of headers, a body: all
    /// of the message but its end.
    pub async fn data(&mut self, headers: &[(&str, &str)]) {
        if !self.skipped(ProtoOpts::NO_DATA) {
            let status = self.conn.data().await.expect("data stage");
            assert_eq!(status, Status::Continue, "DATA");
        }
        let mut all = vec![("From", "sender@example.org"), ("Subject", "test")];
        all.extend_from_slice(headers);
        if !self.skipped(ProtoOpts::NO_HEADER) {
            for (name, value) in all {
                let status = self.conn.header(name, value).await.expect("header stage");
                assert_eq!(
                    status,
                    self.continued(ProtoOpts::NOREPLY_HEADER),
                    "header {name}"
                );
            }
        }
        if !self.skipped(ProtoOpts::NO_EOH) {
            let status = self.conn.eoh().await.expect("eoh stage");
            assert_eq!(status, Status::Continue, "end of headers");
        }
        if !self.skipped(ProtoOpts::NO_BODY) {
            let status = self.conn.body("Hello.\r\n").await.expect("body stage");
            assert_eq!(status, self.continued(ProtoOpts::NOREPLY_BODY), "body");
        }
    }

    /// End of message: the milter's actions and final reply.
    pub async fn eom(&mut self) -> (Vec<EomAction>, Status) {
        let (actions, status) = self.conn.eom().await.expect("end-of-message stage");
        (actions.actions, status)
    }

    /// A whole message: MAIL, the RCPTs, DATA with `headers`, end of message.
    pub async fn message(
        &mut self,
        auth: Option<&str>,
        rcpts: &[&[&str]],
        headers: &[(&str, &str)],
    ) -> Delivery {
        self.mail(auth).await;
        let mut rcpt = Vec::new();
        for args in rcpts {
            rcpt.push(self.rcpt(args).await);
        }
        self.data(headers).await;
        let (actions, eom) = self.eom().await;
        Delivery { rcpt, actions, eom }
    }

    /// The client gave up on the message (RSET, or the connection broke).
    pub async fn abort(&mut self) {
        self.conn.abort().await.expect("abort");
    }

    pub async fn close(self) {
        self.conn.close().await.expect("close");
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s).expect("no NUL in test strings")
}

/// `AddRecipient` of `rcpt` (angle brackets included) with ESMTP `args`.
pub fn add(rcpt: &str, args: &str) -> EomAction {
    EomAction::AddRecipient {
        rcpt: cstring(rcpt),
        args: Some(cstring(args)),
    }
}

/// `DeleteRecipient` of `rcpt`, exactly as the RCPT argument was given.
pub fn delete(rcpt: &str) -> EomAction {
    EomAction::DeleteRecipient {
        rcpt: cstring(rcpt),
    }
}

/// The loop-prevention header naming `instance`.
pub fn header(instance: &str) -> EomAction {
    EomAction::AddHeader {
        name: cstring(LOOP_HEADER),
        value: cstring(instance),
    }
}

/// An action in words. ESMTP parameters are sorted: RFC 3461 gives no order
/// for NOTIFY and ORCPT (Sendmail itself sends NOTIFY first), so only the
/// parameters themselves are compared, not their order.
pub fn describe(action: &EomAction) -> String {
    match action {
        EomAction::AddRecipient { rcpt, args } => {
            let mut params: Vec<String> = args
                .as_deref()
                .map(|a| {
                    a.to_string_lossy()
                        .split_ascii_whitespace()
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            params.sort();
            format!("add {} [{}]", rcpt.to_string_lossy(), params.join(" "))
        }
        EomAction::DeleteRecipient { rcpt } => format!("delete {}", rcpt.to_string_lossy()),
        EomAction::AddHeader { name, value } => {
            // The MTA may pass header values with their leading space.
            format!(
                "header {}: {}",
                name.to_string_lossy(),
                value.to_string_lossy().trim_start()
            )
        }
        other => format!("{other:?}"),
    }
}

/// Asserts that the milter sent exactly `expected`: the same actions, each
/// as often, in any order.
#[track_caller]
pub fn assert_actions(actual: &[EomAction], expected: &[EomAction]) {
    let mut got: Vec<String> = actual.iter().map(describe).collect();
    let mut want: Vec<String> = expected.iter().map(describe).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "end-of-message actions differ (sorted)");
}

/// The reply text of a rejection, or a failure if it is not one.
#[track_caller]
pub fn rejection(status: &Status) -> String {
    match status {
        Status::Reject { message: Some(m) } => m.to_string_lossy().into_owned(),
        other => panic!("expected a rejection with a reply text, got {other:?}"),
    }
}

/// Asserts a 5xx rejection whose reply starts with `code` (e.g. `550 5.1.1`).
#[track_caller]
pub fn assert_rejected(status: &Status, code: &str) {
    let text = rejection(status);
    assert!(
        text.starts_with(&format!("{code} ")),
        "expected a {code} reply, got {text:?}"
    );
}

/// Recipients added, as (path, sorted parameters).
pub fn added(actions: &[EomAction]) -> BTreeSet<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            EomAction::AddRecipient { rcpt, .. } => Some(rcpt.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// Recipients deleted.
pub fn deleted(actions: &[EomAction]) -> BTreeSet<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            EomAction::DeleteRecipient { rcpt } => Some(rcpt.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// The conversation Postfix's cleanup simulates for locally submitted
/// mail (`non_smtpd_milters`): host name `localhost`, 127.0.0.1, port 0,
/// recipients without angle brackets (docs/design.md "Local submission").
pub async fn non_smtp_session(milter: &Milter) -> Session {
    let mut conn = TestConnection::configure()
        .open_tcp(milter.addr())
        .await
        .expect("milter negotiation");
    let status = conn
        .connect("localhost", (std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("connect stage");
    assert!(
        matches!(status, Status::Continue | Status::Noreply),
        "{status:?}"
    );
    Session { conn }
}
