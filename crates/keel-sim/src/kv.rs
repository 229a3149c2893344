//! The simulator's workload service: a tiny key-value register store with
//! put, get and compare-and-swap over u64 keys and values, plus a log timer
//! per key so that timers in the log are exercised under faults. Each
//! leader's term start pushes every pending timer to at least
//! `KEY_TIMER_DELAY` from then, as the KV store renews its leases, so term
//! starts and rescheduled timers are exercised too. Commands and replies
//! have a fixed little-endian encoding; decoding never panics.

use crate::linearizability::{KvInput, KvOutput};
use bytes::Bytes;
use keel_core::{ClientId, Context, Nanos, Service};
use std::collections::BTreeMap;

/// How long after a key's last write its timer fires (log time).
pub const KEY_TIMER_DELAY: Nanos = 50_000_000;

/// Encodes a command or query for the service.
pub fn encode(input: &KvInput) -> Bytes {
    let mut b = Vec::with_capacity(26);
    match input {
        KvInput::Put { key, value } => {
            b.push(1);
            b.extend_from_slice(&key.to_le_bytes());
            b.extend_from_slice(&value.to_le_bytes());
        }
        KvInput::Get { key } => {
            b.push(2);
            b.extend_from_slice(&key.to_le_bytes());
        }
        KvInput::Cas { key, expected, new } => {
            b.push(3);
            b.extend_from_slice(&key.to_le_bytes());
            b.push(u8::from(expected.is_some()));
            b.extend_from_slice(&expected.unwrap_or(0).to_le_bytes());
            b.extend_from_slice(&new.to_le_bytes());
        }
    }
    Bytes::from(b)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Decodes what `encode` produced; None for anything malformed.
pub fn decode(b: &[u8]) -> Option<KvInput> {
    match *b.first()? {
        1 if b.len() == 17 => Some(KvInput::Put {
            key: u64_at(b, 1)?,
            value: u64_at(b, 9)?,
        }),
        2 if b.len() == 9 => Some(KvInput::Get { key: u64_at(b, 1)? }),
        3 if b.len() == 26 => Some(KvInput::Cas {
            key: u64_at(b, 1)?,
            expected: (b[9] == 1).then_some(u64_at(b, 10)?),
            new: u64_at(b, 18)?,
        }),
        _ => None,
    }
}

/// Encodes a reply.
pub fn encode_output(out: &KvOutput) -> Bytes {
    let mut b = Vec::with_capacity(10);
    match out {
        KvOutput::PutOk => b.push(1),
        KvOutput::Get(v) => {
            b.push(2);
            b.push(u8::from(v.is_some()));
            b.extend_from_slice(&v.unwrap_or(0).to_le_bytes());
        }
        KvOutput::Cas(ok) => {
            b.push(3);
            b.push(u8::from(*ok));
        }
    }
    Bytes::from(b)
}

pub fn decode_output(b: &[u8]) -> Option<KvOutput> {
    match *b.first()? {
        1 if b.len() == 1 => Some(KvOutput::PutOk),
        2 if b.len() == 10 => Some(KvOutput::Get((b[1] == 1).then_some(u64_at(b, 2)?))),
        3 if b.len() == 2 => Some(KvOutput::Cas(b[1] == 1)),
        _ => None,
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvService {
    data: BTreeMap<u64, u64>,
    /// Deadline of each key's pending timer, as the service scheduled it.
    timer_deadlines: BTreeMap<u64, Nanos>,
    /// How many timers fired, and how many fired before their deadline
    /// (must stay 0).
    pub timers_fired: u64,
    pub timers_early: u64,
    /// Term starts applied (`on_term_start`).
    pub term_starts: u64,
    /// Acts as a binary from before term starts were marked would: it
    /// ignores them (`SimConfig::stale_binary`). Not state.
    pub ignores_term_starts: bool,
}

impl KvService {
    /// The replicated state, for comparing replicas: the snapshot's bytes.
    pub fn state(&self) -> Vec<u8> {
        let mut b = Vec::new();
        self.snapshot(&mut b);
        b
    }

    pub fn get(&self, key: u64) -> Option<u64> {
        self.data.get(&key).copied()
    }
    fn execute(&mut self, input: &KvInput) -> KvOutput {
        match *input {
            KvInput::Put { key, value } => {
                self.data.insert(key, value);
                KvOutput::PutOk
            }
            KvInput::Get { key } => KvOutput::Get(self.get(key)),
            KvInput::Cas { key, expected, new } => {
                if self.get(key) == expected {
                    self.data.insert(key, new);
                    KvOutput::Cas(true)
                } else {
                    KvOutput::Cas(false)
                }
            }
        }
    }
}

impl Service for KvService {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        *self = KvService {
            ignores_term_starts: self.ignores_term_starts,
            ..KvService::default()
        };
        let Some(b) = snapshot else {
            return Ok(());
        };
        let word = |i: usize| u64_at(b, i * 8).ok_or_else(|| "truncated kv snapshot".to_string());
        let (n, m) = (word(0)?, word(1)?);
        self.timers_fired = word(2)?;
        self.timers_early = word(3)?;
        self.term_starts = word(4)?;
        let expected_len = n
            .checked_add(m)
            .and_then(|x| x.checked_mul(16))
            .and_then(|x| x.checked_add(40))
            .ok_or("kv snapshot counts overflow")?;
        if b.len() as u64 != expected_len {
            return Err(format!(
                "kv snapshot is {} bytes, expected {expected_len}",
                b.len()
            ));
        }
        let mut i = 5;
        for _ in 0..n {
            self.data.insert(word(i)?, word(i + 1)?);
            i += 2;
        }
        for _ in 0..m {
            self.timer_deadlines.insert(word(i)?, word(i + 1)?);
            i += 2;
        }
        Ok(())
    }

    fn snapshot(&self, b: &mut Vec<u8>) {
        b.reserve(40 + 16 * (self.data.len() + self.timer_deadlines.len()));
        for w in [
            self.data.len() as u64,
            self.timer_deadlines.len() as u64,
            self.timers_fired,
            self.timers_early,
            self.term_starts,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        for (k, v) in self.data.iter().chain(self.timer_deadlines.iter()) {
            b.extend_from_slice(&k.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        let Some(input) = decode(data) else {
            return Bytes::from_static(b"\xffbad command");
        };
        let out = self.execute(&input);
        if let KvInput::Put { key, .. } | KvInput::Cas { key, .. } = input {
            let deadline = ctx.time() + KEY_TIMER_DELAY;
            self.timer_deadlines.insert(key, deadline);
            ctx.schedule_timer(key, deadline);
        }
        encode_output(&out)
    }

    fn query(&self, data: &[u8]) -> Bytes {
        match decode(data) {
            Some(KvInput::Get { key }) => encode_output(&KvOutput::Get(self.get(key))),
            _ => Bytes::from_static(b"\xffbad query"),
        }
    }

    fn on_term_start(&mut self, ctx: &mut Context<'_>) {
        if self.ignores_term_starts {
            return;
        }
        self.term_starts += 1;
        let floor = ctx.time() + KEY_TIMER_DELAY;
        for (&key, deadline) in self.timer_deadlines.iter_mut() {
            if *deadline < floor {
                *deadline = floor;
                ctx.schedule_timer(key, floor);
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, id: u64) {
        self.timers_fired += 1;
        if let Some(d) = self.timer_deadlines.remove(&id) {
            if ctx.time() < d {
                self.timers_early += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&b);
            let _ = decode_output(&b);
            let mut s = KvService::default();
            let _ = s.restore(Some(&b));
        }

        #[test]
        fn roundtrip(key in any::<u64>(), v in any::<u64>(), e in proptest::option::of(any::<u64>())) {
            for input in [KvInput::Put { key, value: v }, KvInput::Get { key }, KvInput::Cas { key, expected: e, new: v }] {
                prop_assert_eq!(decode(&encode(&input)), Some(input));
            }
            for out in [KvOutput::PutOk, KvOutput::Get(e), KvOutput::Cas(v % 2 == 0)] {
                prop_assert_eq!(decode_output(&encode_output(&out)), Some(out));
            }
        }
    }
}
