//! A connection that keeps failing on the same message drops that message, not the
//! connection. With a persistent session the broker sends the messages it holds again on
//! every reconnect, so a message the client cannot decode ends every connection the same way
//! right after it starts: before this, 199 reconnects in 70 s, readiness 503, until someone
//! wiped the session by hand.
//!
//! Only errors in decoding what the broker sent count: a network or broker failure (a
//! restart, another client taking over the id) says nothing about a message, and wiping a
//! session for it would lose what the broker holds. Two remedies, the cheaper first:
//! - a packet over the client's size limit: the next connection reads up to
//!   [`LARGEST_READ_ONCE`], so the pipeline sees the message, acks it and counts it as too
//!   large. Nothing else is lost;
//! - the same decode error [`STRIKES`] times in a row, each within [`SOON`] of connecting:
//!   the next connection starts with a clean session, which discards every message the
//!   broker held for this client id, the poisoned one with the others (see the decision note
//!   2026-12-04-mqtt-oversize-and-junk for why that is the last resort).

use std::time::{Duration, Instant};

use rumqttc::{ConnectionError, StateError};

/// Decode failures in a row, each soon after connecting, before the session is discarded.
pub const STRIKES: u32 = 3;
/// A failure this soon after the CONNACK is one of the messages the broker sent again at
/// once; later ones may be anything.
pub const SOON: Duration = Duration::from_secs(10);
/// Largest packet read once to get past an oversized one (the broker's own limit is far
/// below). Larger, the only way past it is to discard the session.
pub const LARGEST_READ_ONCE: usize = 64 * 1024 * 1024;

/// What to change before the next connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// Reconnect as usual.
    None,
    /// A packet of this many bytes was over the limit: read up to [`LARGEST_READ_ONCE`] on
    /// the next connection.
    ReadLarger(usize),
    /// Start the next connection with a clean session.
    DiscardSession,
}

/// Watches one connection's failures for a loop.
#[derive(Debug, Default)]
pub struct Breaker {
    connected_at: Option<Instant>,
    /// The decode error that ended the last connection(s), and how many in a row.
    last: Option<String>,
    strikes: u32,
}

impl Breaker {
    /// The broker accepted a connection.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection (or an attempt at one) failed with `error`.
    pub fn failed(&mut self, error: &ConnectionError, now: Instant) -> Remedy {
        let connected_at = self.connected_at.take();
        let soon = connected_at.is_some_and(|at| now.saturating_duration_since(at) < SOON);
        let Some(decode) = undecodable(error) else {
            // A connection ended another way breaks the run; a failure to connect at all
            // leaves it alone (the broker may restart between two rounds of a loop).
            if connected_at.is_some() {
                self.reset();
            }
            return Remedy::None;
        };
        if let rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(size) = decode
            && *size <= LARGEST_READ_ONCE
        {
            self.reset();
            return Remedy::ReadLarger(*size);
        }
        let key = decode.to_string();
        if soon && self.last.as_deref() == Some(key.as_str()) {
            self.strikes += 1;
        } else {
            self.strikes = 1;
            self.last = Some(key);
        }
        if self.strikes >= STRIKES {
            self.reset();
            return Remedy::DiscardSession;
        }
        Remedy::None
    }

    fn reset(&mut self) {
        self.last = None;
        self.strikes = 0;
    }
}

/// The error, when it is about something the broker sent that could not be decoded. The
/// codec's errors also carry the socket's (`Io`) and our own packets' (`OutgoingPacketTooLarge`),
/// which are not.
fn undecodable(error: &ConnectionError) -> Option<&rumqttc::mqttbytes::Error> {
    match error {
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(_)
            | rumqttc::mqttbytes::Error::OutgoingPacketTooLarge { .. },
        )) => None,
        ConnectionError::MqttState(StateError::Deserialization(decode)) => Some(decode),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(error: rumqttc::mqttbytes::Error) -> ConnectionError {
        ConnectionError::MqttState(StateError::Deserialization(error))
    }

    #[test]
    fn an_oversized_packet_is_read_once_on_a_larger_connection() {
        let mut breaker = Breaker::default();
        let now = Instant::now();
        breaker.connected(now);
        assert_eq!(
            breaker.failed(
                &decode(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(300_000)),
                now
            ),
            Remedy::ReadLarger(300_000)
        );
    }

    #[test]
    fn the_same_decode_error_soon_after_connecting_discards_the_session_on_the_third() {
        let mut breaker = Breaker::default();
        let start = Instant::now();
        let junk = || decode(rumqttc::mqttbytes::Error::TopicNotUtf8);
        for round in 0..STRIKES {
            let at = start + Duration::from_secs(u64::from(round));
            breaker.connected(at);
            let expected = if round + 1 == STRIKES {
                Remedy::DiscardSession
            } else {
                Remedy::None
            };
            assert_eq!(
                breaker.failed(&junk(), at + Duration::from_millis(50)),
                expected
            );
        }
        // Counting starts again after a discard.
        breaker.connected(start);
        assert_eq!(breaker.failed(&junk(), start), Remedy::None);
        // Too large to read even once: discarded too, after as many.
        let huge = || {
            decode(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(
                LARGEST_READ_ONCE + 1,
            ))
        };
        breaker.connected(start);
        assert_eq!(breaker.failed(&huge(), start), Remedy::None);
        breaker.connected(start);
        assert_eq!(breaker.failed(&huge(), start), Remedy::None);
        breaker.connected(start);
        assert_eq!(breaker.failed(&huge(), start), Remedy::DiscardSession);
    }

    #[test]
    fn network_failures_and_late_or_different_errors_never_discard() {
        let mut breaker = Breaker::default();
        let start = Instant::now();
        let junk = || decode(rumqttc::mqttbytes::Error::TopicNotUtf8);
        // Connections cut by the broker right after connecting (another client took the id):
        // not a message's fault.
        for _ in 0..10 {
            breaker.connected(start);
            let aborted = ConnectionError::MqttState(StateError::ConnectionAborted);
            assert_eq!(breaker.failed(&aborted, start), Remedy::None);
            breaker.connected(start);
            let reset = decode(rumqttc::mqttbytes::Error::Io(
                std::io::ErrorKind::ConnectionReset.into(),
            ));
            assert_eq!(breaker.failed(&reset, start), Remedy::None);
        }
        // Decode errors that come late, or differ, are not a loop.
        for round in 0..10u64 {
            breaker.connected(start);
            let late = start + SOON + Duration::from_secs(round);
            assert_eq!(breaker.failed(&junk(), late), Remedy::None);
        }
        for round in 0..10 {
            breaker.connected(start);
            let error = if round % 2 == 0 {
                junk()
            } else {
                decode(rumqttc::mqttbytes::Error::MalformedPacket)
            };
            assert_eq!(breaker.failed(&error, start), Remedy::None);
        }
        // A failure in between to connect at all (broker restarting) does not reset the count.
        breaker.connected(start);
        assert_eq!(breaker.failed(&junk(), start), Remedy::None);
        let refused =
            ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(breaker.failed(&refused, start), Remedy::None);
        breaker.connected(start);
        assert_eq!(breaker.failed(&junk(), start), Remedy::None);
        breaker.connected(start);
        assert_eq!(breaker.failed(&junk(), start), Remedy::DiscardSession);
    }
}
