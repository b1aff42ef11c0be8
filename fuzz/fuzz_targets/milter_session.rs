//! A whole milter session, driven from the fuzzer's bytes through
//! indymilter-test against the real `dualroute::run` on a unix socket:
//! connects from outside or from a gateway, MAIL, RCPTs with arbitrary
//! arguments and `{rcpt_addr}` macros, headers (the loop header among
//! them), end of message or abort, several messages per session.
//!
//! Properties: the milter never drops the connection; every RCPT is
//! continued, refused 5xx or tempfailed 4xx with a reply text; at end of
//! message it adds recipients only where the configuration routes
//! (dualroute_fuzz::check_routing_address), deletes only recipients it was
//! given, adds no other header than its own, and a recipient it deletes
//! always has its replacement.
#![no_main]

use dualroute_fuzz::{check_esmtp_args, check_routing_address, load_policy, policy};
use indymilter_test::{EomAction, MacroStage, Status, TestConnection};
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Server {
    rt: tokio::runtime::Runtime,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// The milter, started once per fuzzing process.
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("milter.sock");
        let listener = rt
            .block_on(async { tokio::net::UnixListener::bind(&socket) })
            .expect("bind the milter socket");
        let start = dualroute::Start {
            config_path: "fuzz.yaml".into(),
            policy: load_policy(),
            intervals: Default::default(),
        };
        // The control is kept: no reload is ever asked for.
        let (control, requests) = dualroute::control();
        std::mem::forget(control);
        rt.spawn(dualroute::run(
            listener,
            start,
            requests,
            std::future::pending::<()>(),
        ));
        Server {
            rt,
            socket,
            _dir: dir,
        }
    })
}

/// Reads the fuzzer's bytes as a sequence of small numbers and strings.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    /// A string of up to 63 bytes (length from one byte), without NUL
    /// (a milter string cannot hold one).
    fn string(&mut self) -> String {
        let len = usize::from(self.byte().unwrap_or(0) & 63).min(self.0.len());
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8_lossy(s).replace('\0', "")
    }

    /// A RCPT path: often built from parts the policy knows, so the
    /// decisions are reached; sometimes raw.
    fn path(&mut self) -> String {
        const LOCALS: [&str; 8] = [
            "alice", "carol", "dave", "erin", "zed", "a", "\"j d\"", "b+x",
        ];
        const DOMAINS: [&str; 7] = [
            "split.test",
            "dual.test",
            "route.test",
            "bücher.test",
            "xn--bcher-kva.test",
            "elsewhere.example",
            "SPLIT.TEST.",
        ];
        let pick = self.byte().unwrap_or(0);
        match pick % 4 {
            0 => self.string(),
            1 => format!("<{}>", self.string()),
            _ => {
                let local = LOCALS[usize::from(pick / 4) % LOCALS.len()];
                let domain = DOMAINS[usize::from(self.byte().unwrap_or(0)) % DOMAINS.len()];
                let route = if pick & 0x80 != 0 {
                    "@relay.example:"
                } else {
                    ""
                };
                format!("<{route}{local}{}@{domain}>", self.string())
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let policy = policy();
    server.rt.block_on(async {
        let mut input = Input(data);
        let mut conn = TestConnection::configure()
            .open_unix(&server.socket)
            .await
            .expect("negotiation");
        let client: [u8; 4] = if input.byte().unwrap_or(0) & 1 == 0 {
            [203, 0, 113, 9]
        } else {
            [192, 0, 2, 25]
        };
        let status = conn
            .connect("client.example", client)
            .await
            .expect("connect");
        assert!(
            matches!(status, Status::Continue | Status::Noreply),
            "{status:?}"
        );
        // Messages until the input runs out.
        while !input.0.is_empty() {
            let flags = input.byte().unwrap_or(0);
            if flags & 1 != 0 {
                conn.macros(MacroStage::Mail, [("{auth_authen}", "user")])
                    .await
                    .expect("macros");
            }
            let sender = input.string();
            let status = conn.mail([sender.as_str()]).await.expect("mail");
            assert!(
                matches!(status, Status::Continue | Status::Noreply),
                "{status:?}"
            );
            let mut sent = Vec::new();
            for _ in 0..(flags >> 1) % 8 {
                let mut args = vec![input.path()];
                let extra = input.byte().unwrap_or(0);
                for _ in 0..extra % 3 {
                    args.push(input.string());
                }
                if extra & 0x80 != 0 {
                    let mta = input.string();
                    conn.macros(MacroStage::Rcpt, [("{rcpt_addr}", mta.as_str())])
                        .await
                        .expect("macros");
                }
                let status = conn
                    .rcpt(args.iter().map(String::as_str))
                    .await
                    .expect("rcpt");
                match &status {
                    Status::Continue => sent.push(args[0].clone()),
                    Status::Reject { message: Some(m) } => {
                        assert!(m.to_bytes().starts_with(b"5"), "{m:?}")
                    }
                    Status::Tempfail { message: Some(m) } => {
                        assert!(m.to_bytes().starts_with(b"4"), "{m:?}")
                    }
                    other => panic!("RCPT {args:?}: {other:?}"),
                }
            }
            if flags & 0x10 != 0 {
                let value = if flags & 0x20 != 0 {
                    "fuzz.test".to_owned()
                } else {
                    input.string()
                };
                let status = conn
                    .header("X-Dualroute", value.as_str())
                    .await
                    .expect("header");
                assert!(
                    matches!(status, Status::Continue | Status::Noreply),
                    "{status:?}"
                );
            }
            // An MTA goes on to DATA only with a recipient it accepted
            // (indymilter, like libmilter, ignores an end of message
            // straight after MAIL and sends no reply).
            if flags & 0x40 != 0 || sent.is_empty() {
                conn.abort().await.expect("abort");
                continue;
            }
            let (actions, status) = conn.eom().await.expect("eom");
            let (mut added, mut deleted) = (0, 0);
            for a in &actions.actions {
                match a {
                    EomAction::AddRecipient { rcpt, args } => {
                        added += 1;
                        let rcpt = rcpt.to_string_lossy();
                        let inner = rcpt.strip_prefix('<').and_then(|r| r.strip_suffix('>'));
                        check_routing_address(&policy.config, inner.unwrap_or("")).unwrap();
                        check_esmtp_args(&args.as_ref().expect("ESMTP args").to_string_lossy())
                            .unwrap();
                    }
                    EomAction::DeleteRecipient { rcpt } => {
                        deleted += 1;
                        let rcpt = rcpt.to_string_lossy();
                        assert!(
                            sent.iter()
                                .any(|s| *s == rcpt || s.ends_with(&*rcpt.trim_start_matches('<'))),
                            "deleted {rcpt} of {sent:?}"
                        );
                    }
                    EomAction::AddHeader { name, value } => {
                        assert_eq!(name.to_bytes(), b"X-Dualroute");
                        assert_eq!(value.to_bytes(), b"fuzz.test");
                    }
                    other => panic!("unexpected action {other:?}"),
                }
            }
            if deleted > 0 {
                assert!(added > 0, "{actions:?}");
            }
            match &status {
                Status::Continue => {}
                Status::Reject { message: Some(m) } => {
                    assert!(m.to_bytes().starts_with(b"554 5.4.6"), "{m:?}");
                    assert!(actions.actions.is_empty(), "{actions:?}");
                }
                other => panic!("end of message: {other:?}"),
            }
        }
        conn.close().await.expect("close");
    });
});
