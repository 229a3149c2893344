//! `MatchingEngine`: a limit order book per symbol with price-time
//! priority. An incoming order trades against the best opposite prices
//! first, and within a price against the oldest resting order first, at
//! the resting order's price; what is left rests on the book. Order ids
//! come from a counter, so every replica assigns the same ones. Orders of
//! the same account may trade with each other (no self-trade prevention).
//!
//! # Encoding
//!
//! One tag byte, then the fields, little-endian; `symbol` is a `u32`
//! length then the bytes; a list is a `u32` count then the elements; an
//! `Option<T>` is a byte 0/1 then `T`; `side` is 0 = buy, 1 = sell.
//!
//! ```text
//! MatchCommand
//!   1 Limit     symbol, account:u64, side:u8, price:u64, qty:u64
//!   2 Cancel    account:u64, order_id:u64
//! MatchQuery
//!   1 Top       symbol
//!   2 Depth     symbol, levels:u32
//! MatchReply
//!   1 Placed    order_id:u64, fills:List<Fill>, resting:u64
//!   2 Cancelled order_id:u64, remaining:u64
//!   3 NotFound  order_id:u64
//!   4 Top       best_bid:Option<Level>, best_ask:Option<Level>
//!   5 Depth     bids:List<Level>, asks:List<Level>   (best first)
//!   255 Error   message (UTF-8)
//! Fill          maker_order_id:u64, maker_account:u64, price:u64, qty:u64
//! Level         price:u64, qty:u64, orders:u64
//! ```
//!
//! Snapshot: magic `MTC1`, next order id `u64`, book count `u32`, then per
//! book in symbol order: symbol, then bids and asks, each a `u32` count of
//! orders in priority order, each order `id, account, price, qty` (`u64`).

use crate::codec::{DecodeError, Reader, Writer};
use bytes::Bytes;
use keel_core::{ClientId, Context, Service};
use std::collections::{BTreeMap, VecDeque};

/// Longest symbol, in bytes.
pub const MAX_SYMBOL_LEN: usize = 64;
/// Most price levels per side a depth query returns.
pub const MAX_DEPTH_LEVELS: u32 = 1000;

const SNAPSHOT_MAGIC: [u8; 4] = *b"MTC1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Buy,
    Sell,
}

impl Side {
    fn to_u8(self) -> u8 {
        match self {
            Side::Buy => 0,
            Side::Sell => 1,
        }
    }
    fn from_u8(b: u8) -> Result<Side, DecodeError> {
        match b {
            0 => Ok(Side::Buy),
            1 => Ok(Side::Sell),
            found => Err(DecodeError::UnknownTag {
                what: "side",
                found,
                expected: "0 (buy) or 1 (sell)",
            }),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchCommand {
    /// A limit order: buy at most at / sell at least at `price`.
    Limit {
        symbol: Bytes,
        account: u64,
        side: Side,
        price: u64,
        qty: u64,
    },
    /// Cancel what is left of an order of `account`.
    Cancel { account: u64, order_id: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchQuery {
    Top { symbol: Bytes },
    Depth { symbol: Bytes, levels: u32 },
}

/// One trade of an incoming order against a resting one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    pub maker_order_id: u64,
    pub maker_account: u64,
    pub price: u64,
    pub qty: u64,
}

/// The resting quantity at one price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub price: u64,
    pub qty: u64,
    pub orders: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MatchReply {
    /// `resting`: quantity left on the book (0 if fully filled).
    Placed {
        order_id: u64,
        fills: Vec<Fill>,
        resting: u64,
    },
    Cancelled {
        order_id: u64,
        remaining: u64,
    },
    /// No open order with this id for this account.
    NotFound {
        order_id: u64,
    },
    Top {
        best_bid: Option<Level>,
        best_ask: Option<Level>,
    },
    Depth {
        bids: Vec<Level>,
        asks: Vec<Level>,
    },
    Error {
        message: String,
    },
}

fn check_symbol(symbol: &[u8]) -> Result<(), DecodeError> {
    if symbol.is_empty() || symbol.len() > MAX_SYMBOL_LEN {
        return Err(DecodeError::Invalid(format!(
            "symbol of {} bytes, expected 1 to {MAX_SYMBOL_LEN}",
            symbol.len()
        )));
    }
    Ok(())
}

impl MatchCommand {
    pub fn encode(&self) -> Bytes {
        let mut w;
        match self {
            MatchCommand::Limit {
                symbol,
                account,
                side,
                price,
                qty,
            } => {
                w = Writer::new(1);
                w.bytes(symbol)
                    .u64(*account)
                    .u8(side.to_u8())
                    .u64(*price)
                    .u64(*qty);
            }
            MatchCommand::Cancel { account, order_id } => {
                w = Writer::new(2);
                w.u64(*account).u64(*order_id);
            }
        }
        w.finish()
    }

    /// Decodes and validates (symbol length, price and qty > 0).
    pub fn decode(data: &[u8]) -> Result<MatchCommand, DecodeError> {
        let mut r = Reader::new(data, "matching command");
        let cmd = match r.tag()? {
            1 => MatchCommand::Limit {
                symbol: r.bytes()?,
                account: r.u64()?,
                side: Side::from_u8(r.u8()?)?,
                price: r.u64()?,
                qty: r.u64()?,
            },
            2 => MatchCommand::Cancel {
                account: r.u64()?,
                order_id: r.u64()?,
            },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "matching command",
                    found,
                    expected: "1 or 2",
                })
            }
        };
        r.finish()?;
        if let MatchCommand::Limit {
            symbol, price, qty, ..
        } = &cmd
        {
            check_symbol(symbol)?;
            if *price == 0 || *qty == 0 {
                return Err(DecodeError::Invalid(format!(
                    "price {price} and qty {qty}, expected both > 0"
                )));
            }
        }
        Ok(cmd)
    }
}

impl MatchQuery {
    pub fn encode(&self) -> Bytes {
        let mut w;
        match self {
            MatchQuery::Top { symbol } => {
                w = Writer::new(1);
                w.bytes(symbol);
            }
            MatchQuery::Depth { symbol, levels } => {
                w = Writer::new(2);
                w.bytes(symbol).u32(*levels);
            }
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<MatchQuery, DecodeError> {
        let mut r = Reader::new(data, "matching query");
        let q = match r.tag()? {
            1 => MatchQuery::Top { symbol: r.bytes()? },
            2 => MatchQuery::Depth {
                symbol: r.bytes()?,
                levels: r.u32()?,
            },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "matching query",
                    found,
                    expected: "1 or 2",
                })
            }
        };
        r.finish()?;
        Ok(q)
    }
}

fn encode_level(w: &mut Writer, l: &Level) {
    w.u64(l.price).u64(l.qty).u64(l.orders);
}

fn decode_level(r: &mut Reader<'_>) -> Result<Level, DecodeError> {
    Ok(Level {
        price: r.u64()?,
        qty: r.u64()?,
        orders: r.u64()?,
    })
}

fn encode_opt_level(w: &mut Writer, l: &Option<Level>) {
    match l {
        Some(l) => {
            w.u8(1);
            encode_level(w, l);
        }
        None => {
            w.u8(0);
        }
    }
}

fn decode_opt_level(r: &mut Reader<'_>) -> Result<Option<Level>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(decode_level(r)?)),
        found => Err(DecodeError::UnknownTag {
            what: "option",
            found,
            expected: "0 or 1",
        }),
    }
}

fn encode_levels(w: &mut Writer, ls: &[Level]) {
    w.count(ls.len());
    for l in ls {
        encode_level(w, l);
    }
}

fn decode_levels(r: &mut Reader<'_>) -> Result<Vec<Level>, DecodeError> {
    let n = r.count(24)?;
    let mut ls = Vec::with_capacity(n);
    for _ in 0..n {
        ls.push(decode_level(r)?);
    }
    Ok(ls)
}

impl MatchReply {
    pub fn encode(&self) -> Bytes {
        let mut w;
        match self {
            MatchReply::Placed {
                order_id,
                fills,
                resting,
            } => {
                w = Writer::new(1);
                w.u64(*order_id).count(fills.len());
                for f in fills {
                    w.u64(f.maker_order_id)
                        .u64(f.maker_account)
                        .u64(f.price)
                        .u64(f.qty);
                }
                w.u64(*resting);
            }
            MatchReply::Cancelled {
                order_id,
                remaining,
            } => {
                w = Writer::new(2);
                w.u64(*order_id).u64(*remaining);
            }
            MatchReply::NotFound { order_id } => {
                w = Writer::new(3);
                w.u64(*order_id);
            }
            MatchReply::Top { best_bid, best_ask } => {
                w = Writer::new(4);
                encode_opt_level(&mut w, best_bid);
                encode_opt_level(&mut w, best_ask);
            }
            MatchReply::Depth { bids, asks } => {
                w = Writer::new(5);
                encode_levels(&mut w, bids);
                encode_levels(&mut w, asks);
            }
            MatchReply::Error { message } => {
                w = Writer::new(255);
                w.bytes(message.as_bytes());
            }
        }
        w.finish()
    }

    pub fn decode(data: &[u8]) -> Result<MatchReply, DecodeError> {
        let mut r = Reader::new(data, "matching reply");
        let reply = match r.tag()? {
            1 => {
                let order_id = r.u64()?;
                let n = r.count(32)?;
                let mut fills = Vec::with_capacity(n);
                for _ in 0..n {
                    fills.push(Fill {
                        maker_order_id: r.u64()?,
                        maker_account: r.u64()?,
                        price: r.u64()?,
                        qty: r.u64()?,
                    });
                }
                MatchReply::Placed {
                    order_id,
                    fills,
                    resting: r.u64()?,
                }
            }
            2 => MatchReply::Cancelled {
                order_id: r.u64()?,
                remaining: r.u64()?,
            },
            3 => MatchReply::NotFound { order_id: r.u64()? },
            4 => MatchReply::Top {
                best_bid: decode_opt_level(&mut r)?,
                best_ask: decode_opt_level(&mut r)?,
            },
            5 => MatchReply::Depth {
                bids: decode_levels(&mut r)?,
                asks: decode_levels(&mut r)?,
            },
            255 => MatchReply::Error {
                message: String::from_utf8(r.bytes()?.to_vec()).map_err(|_| {
                    DecodeError::Invalid("matching error message is not UTF-8".into())
                })?,
            },
            found => {
                return Err(DecodeError::UnknownTag {
                    what: "matching reply",
                    found,
                    expected: "1..=5 or 255",
                })
            }
        };
        r.finish()?;
        Ok(reply)
    }
}

/// An order on the book.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Resting {
    id: u64,
    account: u64,
    qty: u64,
}

/// Price levels of one side; each level is FIFO (time priority).
type Ladder = BTreeMap<u64, VecDeque<Resting>>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Book {
    bids: Ladder,
    asks: Ladder,
}

impl Book {
    fn is_empty(&self) -> bool {
        self.bids.is_empty() && self.asks.is_empty()
    }
    fn ladder(&mut self, side: Side) -> &mut Ladder {
        match side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        }
    }
}

fn level(price: u64, orders: &VecDeque<Resting>) -> Level {
    Level {
        price,
        qty: orders.iter().fold(0u64, |a, o| a.saturating_add(o.qty)),
        orders: orders.len() as u64,
    }
}

/// Where an open order rests, for cancels.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Locator {
    symbol: Bytes,
    side: Side,
    price: u64,
}

/// The replicated order books.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchingEngine {
    books: BTreeMap<Bytes, Book>,
    open: BTreeMap<u64, Locator>,
    next_order_id: u64,
}

impl Default for MatchingEngine {
    fn default() -> Self {
        MatchingEngine {
            books: BTreeMap::new(),
            open: BTreeMap::new(),
            next_order_id: 1,
        }
    }
}

impl MatchingEngine {
    pub fn new() -> MatchingEngine {
        MatchingEngine::default()
    }

    /// Number of orders resting on all books.
    pub fn open_orders(&self) -> usize {
        self.open.len()
    }

    /// Id the next order will get.
    pub fn next_order_id(&self) -> u64 {
        self.next_order_id
    }

    /// Best bid and best ask of `symbol`.
    pub fn top(&self, symbol: &[u8]) -> (Option<Level>, Option<Level>) {
        match self.books.get(symbol) {
            None => (None, None),
            Some(b) => (
                b.bids.iter().next_back().map(|(p, o)| level(*p, o)),
                b.asks.iter().next().map(|(p, o)| level(*p, o)),
            ),
        }
    }

    /// Up to `levels` price levels per side, best first.
    pub fn depth(&self, symbol: &[u8], levels: u32) -> (Vec<Level>, Vec<Level>) {
        let n = levels.min(MAX_DEPTH_LEVELS) as usize;
        match self.books.get(symbol) {
            None => (Vec::new(), Vec::new()),
            Some(b) => (
                b.bids
                    .iter()
                    .rev()
                    .take(n)
                    .map(|(p, o)| level(*p, o))
                    .collect(),
                b.asks.iter().take(n).map(|(p, o)| level(*p, o)).collect(),
            ),
        }
    }

    /// Applies one decoded command.
    pub fn apply(&mut self, cmd: MatchCommand) -> MatchReply {
        match cmd {
            MatchCommand::Limit {
                symbol,
                account,
                side,
                price,
                qty,
            } => self.limit(symbol, account, side, price, qty),
            MatchCommand::Cancel { account, order_id } => self.cancel(account, order_id),
        }
    }

    fn limit(
        &mut self,
        symbol: Bytes,
        account: u64,
        side: Side,
        price: u64,
        qty: u64,
    ) -> MatchReply {
        let order_id = self.next_order_id;
        let Some(next) = order_id.checked_add(1) else {
            return MatchReply::Error {
                message: "order ids exhausted".into(),
            };
        };
        self.next_order_id = next;
        let book = self.books.entry(symbol.clone()).or_default();
        let (opposite, crosses): (&mut Ladder, fn(u64, u64) -> bool) = match side {
            Side::Buy => (&mut book.asks, |level, limit| level <= limit),
            Side::Sell => (&mut book.bids, |level, limit| level >= limit),
        };
        let mut left = qty;
        let mut fills = Vec::new();
        while left > 0 {
            let best = match side {
                Side::Buy => opposite.first_entry(),
                Side::Sell => opposite.last_entry(),
            };
            let Some(mut entry) = best else { break };
            let level_price = *entry.key();
            if !crosses(level_price, price) {
                break;
            }
            let queue = entry.get_mut();
            while left > 0 {
                let Some(maker) = queue.front_mut() else {
                    break;
                };
                let traded = left.min(maker.qty);
                fills.push(Fill {
                    maker_order_id: maker.id,
                    maker_account: maker.account,
                    price: level_price,
                    qty: traded,
                });
                left -= traded;
                maker.qty -= traded;
                if maker.qty == 0 {
                    let id = maker.id;
                    queue.pop_front();
                    self.open.remove(&id);
                }
            }
            if queue.is_empty() {
                entry.remove();
            }
        }
        if left > 0 {
            book.ladder(side)
                .entry(price)
                .or_default()
                .push_back(Resting {
                    id: order_id,
                    account,
                    qty: left,
                });
            self.open.insert(
                order_id,
                Locator {
                    symbol: symbol.clone(),
                    side,
                    price,
                },
            );
        }
        if book.is_empty() {
            self.books.remove(&symbol);
        }
        MatchReply::Placed {
            order_id,
            fills,
            resting: left,
        }
    }

    fn cancel(&mut self, account: u64, order_id: u64) -> MatchReply {
        let not_found = MatchReply::NotFound { order_id };
        let Some(loc) = self.open.get(&order_id).cloned() else {
            return not_found;
        };
        let Some(book) = self.books.get_mut(&loc.symbol) else {
            return not_found;
        };
        let ladder = book.ladder(loc.side);
        let Some(queue) = ladder.get_mut(&loc.price) else {
            return not_found;
        };
        let Some(i) = queue.iter().position(|o| o.id == order_id) else {
            return not_found;
        };
        if queue[i].account != account {
            return not_found;
        }
        let remaining = queue.remove(i).map_or(0, |o| o.qty);
        if queue.is_empty() {
            ladder.remove(&loc.price);
        }
        if book.is_empty() {
            self.books.remove(&loc.symbol);
        }
        self.open.remove(&order_id);
        MatchReply::Cancelled {
            order_id,
            remaining,
        }
    }

    fn decode_snapshot(data: &[u8]) -> Result<MatchingEngine, DecodeError> {
        let mut r = Reader::new(data, "matching snapshot");
        r.magic(&SNAPSHOT_MAGIC)?;
        let mut e = MatchingEngine {
            next_order_id: r.u64()?,
            ..MatchingEngine::default()
        };
        let books = r.count(4 + 8)?;
        for _ in 0..books {
            let symbol = r.bytes()?;
            check_symbol(&symbol)?;
            let mut book = Book::default();
            for side in [Side::Buy, Side::Sell] {
                let n = r.count(32)?;
                for _ in 0..n {
                    let (id, account, price, qty) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                    if id == 0 || id >= e.next_order_id || price == 0 || qty == 0 {
                        return Err(DecodeError::Invalid(format!(
                            "order {id} at price {price} qty {qty}: expected id 1 to {}, \
                             price and qty > 0",
                            e.next_order_id.saturating_sub(1)
                        )));
                    }
                    let loc = Locator {
                        symbol: symbol.clone(),
                        side,
                        price,
                    };
                    if e.open.insert(id, loc).is_some() {
                        return Err(DecodeError::Invalid(format!("order {id} listed twice")));
                    }
                    book.ladder(side)
                        .entry(price)
                        .or_default()
                        .push_back(Resting { id, account, qty });
                }
            }
            if let (Some(bid), Some(ask)) = (book.bids.keys().next_back(), book.asks.keys().next())
            {
                if bid >= ask {
                    return Err(DecodeError::Invalid(format!(
                        "book is crossed: bid {bid} >= ask {ask}"
                    )));
                }
            }
            if book.is_empty() {
                continue;
            }
            if e.books.insert(symbol, book).is_some() {
                return Err(DecodeError::Invalid("symbol listed twice".into()));
            }
        }
        r.finish()?;
        Ok(e)
    }
}

impl Service for MatchingEngine {
    fn restore(&mut self, snapshot: Option<&[u8]>) -> Result<(), String> {
        *self = match snapshot {
            None => MatchingEngine::new(),
            Some(data) => MatchingEngine::decode_snapshot(data).map_err(|e| e.to_string())?,
        };
        Ok(())
    }

    fn snapshot(&self, out: &mut Vec<u8>) {
        let mut w = Writer::onto(std::mem::take(out));
        w.raw_bytes(&SNAPSHOT_MAGIC)
            .u64(self.next_order_id)
            .count(self.books.len());
        for (symbol, book) in &self.books {
            w.bytes(symbol);
            for ladder in [
                book.bids.iter().rev().collect::<Vec<_>>(),
                book.asks.iter().collect(),
            ] {
                w.count(ladder.iter().map(|(_, q)| q.len()).sum());
                for (price, queue) in ladder {
                    for o in queue {
                        w.u64(o.id).u64(o.account).u64(*price).u64(o.qty);
                    }
                }
            }
        }
        *out = w.into_vec();
    }

    fn on_message(&mut self, _ctx: &mut Context<'_>, _client: ClientId, data: &[u8]) -> Bytes {
        match MatchCommand::decode(data) {
            Ok(cmd) => self.apply(cmd).encode(),
            Err(e) => MatchReply::Error {
                message: e.to_string(),
            }
            .encode(),
        }
    }

    fn query(&self, data: &[u8]) -> Bytes {
        let reply = match MatchQuery::decode(data) {
            Ok(MatchQuery::Top { symbol }) => {
                let (best_bid, best_ask) = self.top(&symbol);
                MatchReply::Top { best_bid, best_ask }
            }
            Ok(MatchQuery::Depth { symbol, levels }) => {
                let (bids, asks) = self.depth(&symbol, levels);
                MatchReply::Depth { bids, asks }
            }
            Err(e) => MatchReply::Error {
                message: e.to_string(),
            },
        };
        reply.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;
    use proptest::prelude::*;

    fn limit(side: Side, price: u64, qty: u64) -> MatchCommand {
        MatchCommand::Limit {
            symbol: Bytes::from_static(b"XYZ"),
            account: price * 10 + qty,
            side,
            price,
            qty,
        }
    }

    fn send(h: &mut Harness<MatchingEngine>, c: MatchCommand) -> MatchReply {
        MatchReply::decode(&h.raw(c.encode())).unwrap()
    }

    fn fills(r: &MatchReply) -> Vec<(u64, u64, u64)> {
        match r {
            MatchReply::Placed { fills, .. } => fills
                .iter()
                .map(|f| (f.maker_order_id, f.price, f.qty))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    fn lvl(price: u64, qty: u64, orders: u64) -> Level {
        Level { price, qty, orders }
    }

    #[test]
    fn price_time_priority_and_partial_fills() {
        let mut h = Harness::new(MatchingEngine::new());
        // Asks: 101 x5 (id1), 100 x3 (id2), 100 x4 (id3), 102 x1 (id4).
        for (p, q) in [(101, 5), (100, 3), (100, 4), (102, 1)] {
            let r = send(&mut h, limit(Side::Sell, p, q));
            assert!(matches!(r, MatchReply::Placed { resting, .. } if resting == q));
        }
        send(&mut h, limit(Side::Buy, 98, 2)); // id5 rests
        assert_eq!(
            h.svc().top(b"XYZ"),
            (Some(lvl(98, 2, 1)), Some(lvl(100, 7, 2)))
        );
        // Buy 10 at 101: takes 100 (id2 then id3), then 3 of id1 at 101.
        let r = send(&mut h, limit(Side::Buy, 101, 10));
        assert_eq!(fills(&r), vec![(2, 100, 3), (3, 100, 4), (1, 101, 3)]);
        assert!(matches!(
            r,
            MatchReply::Placed {
                order_id: 6,
                resting: 0,
                ..
            }
        ));
        assert_eq!(
            h.svc().depth(b"XYZ", 10),
            (vec![lvl(98, 2, 1)], vec![lvl(101, 2, 1), lvl(102, 1, 1)])
        );
        // Sell 5 at 90: hits the bid at 98, rests 3 at 90 — now the best ask.
        let r = send(&mut h, limit(Side::Sell, 90, 5));
        assert_eq!(fills(&r), vec![(5, 98, 2)]);
        assert!(matches!(r, MatchReply::Placed { resting: 3, .. }));
        assert_eq!(h.svc().top(b"XYZ"), (None, Some(lvl(90, 3, 1))));
        // A buy below every ask just rests.
        let r = send(&mut h, limit(Side::Buy, 89, 1));
        assert_eq!(fills(&r), vec![]);
        assert_eq!(h.svc().open_orders(), 4);
    }

    #[test]
    fn symbols_are_separate_books() {
        let mut h = Harness::new(MatchingEngine::new());
        send(&mut h, limit(Side::Sell, 100, 1));
        let r = send(
            &mut h,
            MatchCommand::Limit {
                symbol: Bytes::from_static(b"ABC"),
                account: 1,
                side: Side::Buy,
                price: 200,
                qty: 1,
            },
        );
        assert_eq!(fills(&r), vec![]);
        assert_eq!(h.svc().top(b"ABC"), (Some(lvl(200, 1, 1)), None));
        assert_eq!(h.svc().top(b"XYZ"), (None, Some(lvl(100, 1, 1))));
        assert_eq!(h.svc().top(b"NONE"), (None, None));
    }

    #[test]
    fn cancel() {
        let mut h = Harness::new(MatchingEngine::new());
        send(&mut h, limit(Side::Sell, 100, 3)); // id1, account 1003
        send(&mut h, limit(Side::Sell, 100, 4)); // id2, account 1004
        assert_eq!(
            send(
                &mut h,
                MatchCommand::Cancel {
                    account: 999,
                    order_id: 1
                }
            ),
            MatchReply::NotFound { order_id: 1 }
        );
        let r = send(&mut h, limit(Side::Buy, 100, 1));
        assert_eq!(fills(&r), vec![(1, 100, 1)]);
        assert_eq!(
            send(
                &mut h,
                MatchCommand::Cancel {
                    account: 1003,
                    order_id: 1
                }
            ),
            MatchReply::Cancelled {
                order_id: 1,
                remaining: 2
            }
        );
        assert_eq!(
            send(
                &mut h,
                MatchCommand::Cancel {
                    account: 1003,
                    order_id: 1
                }
            ),
            MatchReply::NotFound { order_id: 1 }
        );
        // A fully filled order can no longer be cancelled.
        assert!(matches!(
            send(&mut h, limit(Side::Buy, 100, 4)),
            MatchReply::Placed { resting: 0, .. }
        ));
        assert_eq!(
            send(
                &mut h,
                MatchCommand::Cancel {
                    account: 1004,
                    order_id: 2
                }
            ),
            MatchReply::NotFound { order_id: 2 }
        );
        assert_eq!(h.svc().open_orders(), 0);
        assert!(h.svc().books.is_empty());
    }

    #[test]
    fn invalid_commands_and_queries() {
        let mut h = Harness::new(MatchingEngine::new());
        send(&mut h, limit(Side::Sell, 100, 3));
        let before = h.svc().clone();
        for c in [
            limit(Side::Buy, 0, 1),
            limit(Side::Buy, 1, 0),
            MatchCommand::Limit {
                symbol: Bytes::new(),
                account: 1,
                side: Side::Buy,
                price: 1,
                qty: 1,
            },
        ] {
            let r = send(&mut h, c);
            assert!(matches!(r, MatchReply::Error { .. }), "{r:?}");
        }
        let mut bad_side = limit(Side::Buy, 1, 1).encode().to_vec();
        bad_side[1 + 4 + 3 + 8] = 2;
        for data in [vec![], vec![3], vec![2, 0, 0], bad_side] {
            let r = MatchReply::decode(&h.raw(Bytes::from(data))).unwrap();
            assert!(matches!(r, MatchReply::Error { .. }), "{r:?}");
        }
        assert_eq!(h.svc(), &before);
        let q = MatchQuery::Depth {
            symbol: Bytes::from_static(b"XYZ"),
            levels: 5,
        };
        assert_eq!(
            MatchReply::decode(&h.host.query(&q.encode())).unwrap(),
            MatchReply::Depth {
                bids: vec![],
                asks: vec![lvl(100, 3, 1)]
            }
        );
        assert!(matches!(
            MatchReply::decode(&h.host.query(&[1, 0])).unwrap(),
            MatchReply::Error { .. }
        ));
    }

    fn arb_command() -> impl Strategy<Value = MatchCommand> {
        let symbol = prop::sample::select(vec![Bytes::from_static(b"A"), Bytes::from_static(b"B")]);
        prop_oneof![
            4 => (symbol, 0u64..3, any::<bool>(), 95u64..105, 1u64..6).prop_map(
                |(symbol, account, buy, price, qty)| MatchCommand::Limit {
                    symbol,
                    account,
                    side: if buy { Side::Buy } else { Side::Sell },
                    price,
                    qty,
                }
            ),
            1 => (0u64..3, 0u64..40)
                .prop_map(|(account, order_id)| MatchCommand::Cancel { account, order_id }),
        ]
    }

    fn run(cmds: &[MatchCommand]) -> (Harness<MatchingEngine>, Vec<MatchReply>) {
        let mut h = Harness::new(MatchingEngine::new());
        let replies = cmds.iter().map(|c| send(&mut h, c.clone())).collect();
        (h, replies)
    }

    proptest! {
        #[test]
        fn deterministic_conserving_and_snapshot_round_trip(
            cmds in prop::collection::vec(arb_command(), 0..60),
        ) {
            let (a, replies) = run(&cmds);
            let (b, replies_b) = run(&cmds);
            prop_assert_eq!(&replies, &replies_b);
            prop_assert_eq!(a.svc().snapshot_vec(), b.svc().snapshot_vec());

            // Quantity is conserved: placed = filled twice (taker + maker)
            // + cancelled + resting.
            let mut placed = 0u64;
            let mut filled = 0u64;
            let mut cancelled = 0u64;
            for (c, r) in cmds.iter().zip(&replies) {
                match (c, r) {
                    (MatchCommand::Limit { qty, .. }, MatchReply::Placed { fills, .. }) => {
                        placed += qty;
                        filled += fills.iter().map(|f| f.qty).sum::<u64>();
                    }
                    (_, MatchReply::Cancelled { remaining, .. }) => cancelled += remaining,
                    _ => {}
                }
            }
            let resting: u64 = [b"A", b"B"]
                .iter()
                .map(|s| {
                    let (bids, asks) = a.svc().depth(&s[..], MAX_DEPTH_LEVELS);
                    bids.iter().chain(&asks).map(|l| l.qty).sum::<u64>()
                })
                .sum();
            prop_assert_eq!(placed, 2 * filled + cancelled + resting);
            // Books never stay crossed.
            for s in [&b"A"[..], b"B"] {
                if let (Some(bid), Some(ask)) = a.svc().top(s) {
                    prop_assert!(bid.price < ask.price);
                }
            }

            let mut r = MatchingEngine::new();
            r.restore(Some(&a.svc().snapshot_vec())).unwrap();
            prop_assert_eq!(&r, a.svc());
            for s in [&b"A"[..], b"B"] {
                let q = MatchQuery::Depth { symbol: Bytes::copy_from_slice(s), levels: 100 };
                prop_assert_eq!(r.query(&q.encode()), a.host.query(&q.encode()));
            }
            // The restored engine continues identically.
            let mut ra = a.restored(MatchingEngine::new());
            let mut a = a;
            for c in cmds.iter().take(10) {
                prop_assert_eq!(send(&mut ra, c.clone()), send(&mut a, c.clone()));
            }
            prop_assert_eq!(ra.svc(), a.svc());
        }

        #[test]
        fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..128)) {
            let _ = MatchCommand::decode(&data);
            let _ = MatchQuery::decode(&data);
            let _ = MatchReply::decode(&data);
            let mut s = MatchingEngine::new();
            let _ = s.restore(Some(&data));
            let mut m = b"MTC1".to_vec();
            m.extend_from_slice(&data);
            let _ = s.restore(Some(&m));
            prop_assert!(MatchReply::decode(&s.query(&data)).is_ok());
        }

        #[test]
        fn mutated_snapshots_never_panic(
            cmds in prop::collection::vec(arb_command(), 0..20),
            flip in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let (a, replies) = run(&cmds);
            let mut snap = a.svc().snapshot_vec();
            let i = flip.index(snap.len());
            snap[i] = byte;
            let mut s = MatchingEngine::new();
            let _ = s.restore(Some(&snap));
            for r in replies {
                let mut enc = r.encode().to_vec();
                let i = flip.index(enc.len());
                enc[i] = byte;
                let _ = MatchReply::decode(&enc);
                let _ = MatchReply::decode(&enc[..i]);
            }
        }

        #[test]
        fn malformed_changes_nothing(
            cmds in prop::collection::vec(arb_command(), 0..10),
            data in prop::collection::vec(any::<u8>(), 0..48),
        ) {
            let (mut h, _) = run(&cmds);
            let before = h.svc().clone();
            let reply = MatchReply::decode(&h.raw(Bytes::from(data.clone()))).unwrap();
            if MatchCommand::decode(&data).is_err() {
                prop_assert!(matches!(reply, MatchReply::Error { .. }), "{:?}", reply);
                prop_assert_eq!(h.svc(), &before);
            }
        }
    }
}
