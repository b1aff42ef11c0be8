//! A second reader of the milter protocol's framing, beside indymilter's.
//!
//! Why it exists: indymilter parses the MTA's packets but does not expose
//! them one by one, nor when each began. The connection guard (the parent
//! module) needs exactly that: whether a packet is half read (a stalled
//! packet gets `connections.command_timeout`, an idle connection between
//! commands `idle_timeout`), and what is wrong with input indymilter drops
//! with a trace-level line only (garbage on the socket is logged here with
//! the peer that sent it). It only follows lengths, command bytes and
//! their order; the payloads are indymilter's.

/// indymilter's limit on a packet's payload (1 MiB - 1); it drops the
/// connection on a longer one. Postfix sends body chunks of at most 64 KiB.
const MAX_PAYLOAD: usize = 1024 * 1024 - 1;

/// What can be wrong with the MTA's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    /// A packet length of zero (there is not even a command byte).
    ZeroLength,
    /// A packet longer than indymilter accepts.
    Oversized(u32),
    /// A command byte that is no milter command.
    Unknown(u8),
    /// A known command where the protocol does not allow it.
    OutOfOrder(u8),
    /// The connection closed in the middle of a packet.
    Truncated,
    /// A started packet did not complete within this many seconds.
    Stalled(u64),
    /// Nothing at all within this many seconds of connecting.
    Silent(u64),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::ZeroLength => write!(f, "packet of length 0; closing the connection"),
            Problem::Oversized(len) => write!(
                f,
                "packet of {len} bytes, longer than the {} the milter accepts; closing the connection",
                MAX_PAYLOAD + 1
            ),
            Problem::Unknown(cmd) => write!(
                f,
                "unknown command byte {cmd:#04x}; closing the connection (is this an MTA speaking the milter protocol?)"
            ),
            Problem::OutOfOrder(cmd) => write!(
                f,
                "command '{}' out of order; ignored",
                char::from(*cmd).escape_default()
            ),
            Problem::Truncated => write!(f, "connection closed in the middle of a packet"),
            Problem::Stalled(secs) => write!(
                f,
                "packet incomplete for {secs}s (connections.command_timeout); closing the connection"
            ),
            Problem::Silent(secs) => write!(
                f,
                "no option negotiation within {secs}s of connecting (connections.command_timeout); closing the connection"
            ),
        }
    }
}

/// Follows the packet framing of the MTA's input (4-byte length, command
/// byte, payload) exactly as indymilter reads it, and the order of the
/// commands as far as it can be checked without the negotiated options.
#[derive(Debug, Default)]
pub(crate) struct Framing {
    header: [u8; 5],
    header_len: usize,
    payload_left: usize,
    /// The first problem made the rest unreadable (indymilter closes).
    broken: bool,
    pub(crate) negotiated: bool,
    in_transaction: bool,
}

impl Framing {
    /// True while a packet has started but not completed.
    pub(crate) fn mid_packet(&self) -> bool {
        !self.broken && (self.header_len > 0 || self.payload_left > 0)
    }

    /// Takes the next bytes of input; returns the first problem in them.
    pub(crate) fn feed(&mut self, mut input: &[u8]) -> Option<Problem> {
        let mut first = None;
        while !input.is_empty() && !self.broken {
            if self.payload_left > 0 {
                let n = self.payload_left.min(input.len());
                self.payload_left -= n;
                input = &input[n..];
                continue;
            }
            // A whole header in the input, the usual case, is read where it
            // is; a split one is gathered in `self.header`.
            let header = match input.split_first_chunk::<5>() {
                Some((header, rest)) if self.header_len == 0 => {
                    input = rest;
                    *header
                }
                _ => {
                    let n = (self.header.len() - self.header_len).min(input.len());
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&input[..n]);
                    self.header_len += n;
                    input = &input[n..];
                    if self.header_len < self.header.len() {
                        break;
                    }
                    self.header_len = 0;
                    self.header
                }
            };
            let [a, b, c, d, command] = header;
            let len = u32::from_be_bytes([a, b, c, d]);
            let problem = self.packet(len, command);
            first = first.or(problem);
        }
        first
    }

    fn packet(&mut self, len: u32, command: u8) -> Option<Problem> {
        let payload = usize::try_from(len).unwrap_or(usize::MAX).saturating_sub(1);
        if len == 0 {
            self.broken = true;
            return Some(Problem::ZeroLength);
        }
        if payload > MAX_PAYLOAD {
            self.broken = true;
            return Some(Problem::Oversized(len));
        }
        self.payload_left = payload;
        self.command(command)
    }

    /// The milter protocol's commands (libmilter's `mfdef.h`, Postfix's
    /// `milter8.c`): negotiation first; RCPT, DATA, headers, body and end of
    /// message only inside a transaction that MAIL opened.
    fn command(&mut self, command: u8) -> Option<Problem> {
        let in_order = match command {
            b'O' => !std::mem::replace(&mut self.negotiated, true),
            _ if !self.negotiated => {
                // Still accept the rest of the session as negotiated, so
                // that one early packet is one warning.
                self.negotiated = true;
                false
            }
            b'M' => {
                self.in_transaction = true;
                true
            }
            b'R' | b'T' | b'L' | b'N' | b'B' => self.in_transaction,
            b'E' => std::mem::replace(&mut self.in_transaction, false),
            b'A' | b'K' => {
                self.in_transaction = false;
                true
            }
            b'C' | b'D' | b'H' | b'Q' | b'U' => true,
            other => {
                self.broken = true;
                return Some(Problem::Unknown(other));
            }
        };
        (!in_order).then_some(Problem::OutOfOrder(command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(command: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = u32::try_from(payload.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        p.push(command);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn a_postfix_conversation_is_in_order_byte_by_byte() {
        let mut input = packet(b'O', &[0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff]);
        for (cmd, payload) in [
            (b'D', &b"Cj\0mx\0"[..]),
            (b'C', b"client\x004\x00\x19127.0.0.1\0"),
            (b'M', b"<a@b>\0"),
            (b'R', b"<c@d>\0"),
            (b'L', b"Subject\0x\0"),
            (b'N', b""),
            (b'E', b""),
            (b'M', b"<a@b>\0"),
            (b'A', b""),
            (b'Q', b""),
        ] {
            input.extend(packet(cmd, payload));
        }
        let mut framing = Framing::default();
        for byte in &input {
            assert_eq!(framing.feed(std::slice::from_ref(byte)), None);
        }
        assert!(!framing.mid_packet());
        let mut whole = Framing::default();
        assert_eq!(whole.feed(&input), None);
        // Cut anywhere: a header read where it is or gathered over two
        // reads comes to the same.
        for cut in 0..input.len() {
            let mut f = Framing::default();
            assert_eq!(f.feed(&input[..cut]), None, "cut at {cut}");
            assert_eq!(f.feed(&input[cut..]), None, "cut at {cut}");
            assert!(!f.mid_packet(), "cut at {cut}");
        }
        let mut garbage = packet(b'O', &[0; 12]);
        garbage.extend(packet(b'Z', b"x"));
        for cut in 0..garbage.len() {
            let mut f = Framing::default();
            let first = f.feed(&garbage[..cut]);
            let second = f.feed(&garbage[cut..]);
            assert_eq!(
                first.or(second),
                Some(Problem::Unknown(b'Z')),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn garbage_is_named() {
        let mut f = Framing::default();
        assert_eq!(
            f.feed(b"GET / HTTP/1.1\r\n"),
            Some(Problem::Oversized(0x47455420))
        );
        let mut f = Framing::default();
        assert_eq!(f.feed(&[0, 0, 0, 0, b'O']), Some(Problem::ZeroLength));
        let mut f = Framing::default();
        f.feed(&packet(b'O', &[0; 12]));
        assert_eq!(f.feed(&packet(b'Z', b"")), Some(Problem::Unknown(b'Z')));
        let mut f = Framing::default();
        f.feed(&packet(b'O', &[0; 12]));
        assert_eq!(
            f.feed(&packet(b'R', b"<c@d>\0")),
            Some(Problem::OutOfOrder(b'R'))
        );
        let mut f = Framing::default();
        assert_eq!(
            f.feed(&packet(b'M', b"<a@b>\0")),
            Some(Problem::OutOfOrder(b'M'))
        );
    }

    #[test]
    fn a_half_packet_is_mid_packet() {
        let mut f = Framing::default();
        let p = packet(b'O', &[0; 12]);
        f.feed(&p[..3]);
        assert!(f.mid_packet());
        f.feed(&p[3..8]);
        assert!(f.mid_packet());
        f.feed(&p[8..]);
        assert!(!f.mid_packet());
        assert!(f.negotiated);
    }
}
