//! The milter protocol's framing, for tests that write raw bytes to the
//! milter (garbage, half packets, a thousand idle connections) where
//! indymilter-test (tests/support/protocol.rs) would only send well-formed
//! conversations. A packet is a 4-byte big-endian length, counting the
//! command byte, then the command byte and the payload (the Sendmail
//! milter protocol, libmilter's mfdef.h).

use std::io::Read;

/// One packet: `command` with `payload`.
pub fn packet(command: u8, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len() + 1).expect("a packet shorter than 4 GB");
    let mut p = len.to_be_bytes().to_vec();
    p.push(command);
    p.extend_from_slice(payload);
    p
}

/// The MTA's negotiation (SMFIC_OPTNEG) as Postfix sends it: protocol
/// version 6, every action (0x1ff), and `protocol` as the protocol flags
/// (0x1f_ffff: every "no reply" and "skip" step Postfix offers; 0: every
/// command answered).
pub fn optneg(protocol: u32) -> Vec<u8> {
    let mut payload = 6u32.to_be_bytes().to_vec();
    payload.extend(0x1ffu32.to_be_bytes());
    payload.extend(protocol.to_be_bytes());
    packet(b'O', &payload)
}

/// Reads one packet from the milter and returns its command byte.
pub fn read_command(s: &mut impl Read) -> u8 {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("reply length");
    let len = usize::try_from(u32::from_be_bytes(len)).expect("a 32-bit length");
    assert!(len > 0, "a reply packet of length 0");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("reply body");
    body[0]
}
