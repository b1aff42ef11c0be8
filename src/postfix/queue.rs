//! What waits in Postfix's queue because the milter did not route it
//! (docs/design.md §9, docs/postfix.md "Mail waiting in the queue"): the
//! recipients the wait transport deferred, counted from `postqueue -j`
//! (postqueue(1) "JSON OBJECT FORMAT": one object per message, each
//! recipient with its `delay_reason`).

use serde::Deserialize;
use std::path::Path;
use std::process::Command;

/// One message of `postqueue -j`; only the fields counted here.
#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    recipients: Vec<Recipient>,
}

#[derive(Debug, Deserialize)]
struct Recipient {
    #[serde(default)]
    delay_reason: String,
}

/// What waits: messages and recipients.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct Waiting {
    pub messages: usize,
    pub recipients: usize,
}

/// Counts the recipients whose delay reason is the wait transport's
/// ([`super::WAIT_REASON`]) in `postqueue -j` output. Each line is one
/// JSON object; JSON is YAML 1.2, so serde_yaml reads it. A line that
/// does not parse is an error naming its number: a count that silently
/// skipped messages would say less waits than does.
pub fn count(json_lines: &str) -> Result<Waiting, String> {
    let mut w = Waiting::default();
    for (n, line) in json_lines.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let m: Message =
            serde_yaml::from_str(line).map_err(|e| format!("postqueue -j line {}: {e}", n + 1))?;
        let here = m
            .recipients
            .iter()
            .filter(|r| r.delay_reason.contains(super::WAIT_REASON))
            .count();
        if here > 0 {
            w.messages += 1;
            w.recipients += here;
        }
    }
    Ok(w)
}

/// Runs `postqueue -j` (on `config_dir`, or where MAIL_CONFIG or the
/// default /etc/postfix says) and counts what waits. `Ok(None)`: no
/// configured Postfix here (a Sendmail host, Postfix's programs without a
/// main.cf).
pub fn waiting(config_dir: Option<&Path>) -> Result<Option<Waiting>, String> {
    let Some(postqueue) = [
        "/usr/sbin/postqueue",
        "/usr/bin/postqueue",
        "/sbin/postqueue",
    ]
    .iter()
    .map(Path::new)
    .find(|p| p.is_file()) else {
        return Ok(None);
    };
    let dir = config_dir.map(Path::to_path_buf).unwrap_or_else(|| {
        std::env::var_os("MAIL_CONFIG")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/etc/postfix".into())
    });
    if !dir.join("main.cf").is_file() {
        return Ok(None);
    }
    let mut cmd = Command::new(postqueue);
    if let Some(dir) = config_dir {
        cmd.arg("-c").arg(dir);
    }
    let out = cmd
        .arg("-j")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", postqueue.display()))?;
    if !out.status.success() {
        return Err(format!(
            "postqueue -j: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    count(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

/// The line `dualroute status` prints.
pub fn status_line(w: Waiting) -> String {
    if w.recipients == 0 {
        "postfix queue: nothing waits for dualroute".to_owned()
    } else {
        format!(
            "postfix queue: {} recipient(s) in {} message(s) WAIT because the milter did not route them (delay reason \"{}\"); see docs/postfix.md \"Mail waiting in the queue\"",
            w.recipients,
            w.messages,
            super::WAIT_REASON
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_the_wait_transport() {
        let reason = format!(
            "temporary failure. Command output: {} ",
            crate::postfix::WAIT_REASON
        );
        let json = format!(
            "{{\"queue_name\": \"deferred\", \"queue_id\": \"A1\", \"arrival_time\": 1, \"message_size\": 2, \"forced_expire\": false, \"sender\": \"s@x.test\", \"recipients\": [{{\"address\": \"zed@example.com\", \"delay_reason\": \"{reason}\"}}, {{\"address\": \"ann@remote.test\", \"delay_reason\": \"connect to mx.remote.test[192.0.2.1]:25: Connection refused\"}}]}}\n\
             {{\"queue_name\": \"deferred\", \"queue_id\": \"B2\", \"arrival_time\": 1, \"message_size\": 2, \"forced_expire\": false, \"sender\": \"\", \"recipients\": [{{\"address\": \"a\\u00e9@example.com\", \"delay_reason\": \"{reason}\"}}, {{\"address\": \"b@example.com\", \"delay_reason\": \"{reason}\"}}]}}\n\
             {{\"queue_name\": \"active\", \"queue_id\": \"C3\", \"arrival_time\": 1, \"message_size\": 2, \"forced_expire\": false, \"sender\": \"s@x.test\", \"recipients\": [{{\"address\": \"c@example.com\"}}]}}\n"
        );
        assert_eq!(
            count(&json),
            Ok(Waiting {
                messages: 2,
                recipients: 3
            })
        );
        assert_eq!(count(""), Ok(Waiting::default()));
        let err = count("{\"recipients\": [\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}
