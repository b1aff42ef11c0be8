//! Reading the metrics endpoint as Prometheus does: one `GET /metrics`
//! ([`scrape`]) and the value of one sample of its text ([`Scrape::value`]);
//! the whole service with its endpoint on a port of its own ([`with_metrics`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One scrape: the status line, the headers and the OpenMetrics text.
#[derive(Debug)]
pub struct Scrape {
    pub status: String,
    pub content_type: String,
    pub text: String,
}

/// `GET path` from the endpoint at `addr`. Blocking: call it from
/// `spawn_blocking` in an async test. The endpoint starts with the
/// service's tasks, a moment after the milter's socket is bound: a refused
/// connection is tried again for up to [`super::WAIT`].
pub fn get(addr: SocketAddr, path: &str) -> Scrape {
    let mut last = None;
    let stream = super::poll(|| match TcpStream::connect(addr) {
        Ok(s) => Some(s),
        Err(e) => {
            last = Some(e);
            None
        }
    });
    let mut stream = stream.unwrap_or_else(|| {
        panic!(
            "connect to the metrics endpoint {addr}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("read the response from {addr}: {e}"));
    let (head, text) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in {response:?}"));
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_owned();
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    Scrape {
        status,
        content_type,
        text: text.to_owned(),
    }
}

/// `GET /metrics`, which must succeed.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let s = get(addr, "/metrics");
    assert!(s.status.contains(" 200 "), "scrape of {addr}: {s:?}");
    s
}

impl Scrape {
    /// The value of sample `name` with exactly these labels (in any
    /// order); `None` when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        want.sort();
        self.text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, got) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let mut got: Vec<String> = got
                .split(',')
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            got.sort();
            (metric == name && got == want).then(|| value.parse().ok())?
        })
    }

    /// Like [`Scrape::value`], 0 when the sample is absent (a counter
    /// nothing has incremented yet).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name`: (its labels as written, value), sorted.
    pub fn samples(&self, name: &str) -> Vec<(String, f64)> {
        let mut found: Vec<(String, f64)> = self
            .text
            .lines()
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, labels) = series.split_once('{').unwrap_or((series, "}"));
                (metric == name).then(|| {
                    (
                        labels.trim_end_matches('}').to_owned(),
                        value.parse().unwrap_or(f64::NAN),
                    )
                })
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(&b.0));
        found
    }
}

/// The whole service, its metrics endpoint on a port of its own: the
/// service binds `metrics.listen` itself, so when another process has the
/// port the service starts again on another (tests/support/ports.rs).
pub async fn with_metrics<F>(start: impl Fn(u16) -> F) -> (super::protocol::Milter, SocketAddr)
where
    F: std::future::Future<Output = super::protocol::Milter>,
{
    super::ports::start_on_a_port_async("the metrics endpoint", |port| {
        let starting = start(port);
        async move {
            let milter = starting.await;
            match super::ports::bound_here(port).await {
                Ok(()) => Ok((milter, SocketAddr::from(([127, 0, 0, 1], port)))),
                Err(why) => {
                    milter.shutdown().await;
                    Err(why)
                }
            }
        }
    })
    .await
}
