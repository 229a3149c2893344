//! Splits a body of JSON objects that arrives in pieces (a gateway stream's
//! requests) into whole objects, looking at each byte once however the
//! body is cut: a client sending a large request a few bytes at a time
//! costs no more than one sending it at once.
//!
//! It only finds where each top-level object ends (strings, escapes and
//! nesting tracked across pieces); checking that an object is valid JSON
//! is the JSON parser's job, given each object once.

use std::ops::Range;

/// What comes next in the body.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// A whole object: its bytes in `Objects::bytes`.
    Object(Range<usize>),
    /// A top-level `null` (the empty request, as etcd's gateway reads it).
    Null,
    /// Nothing whole yet: more of the body is needed.
    More,
    /// Something that is not an object starts here (at `Objects::rest`).
    NotObject,
}

/// The unfinished part of a body of JSON objects, and how far it has been
/// scanned.
#[derive(Debug, Default)]
pub struct Objects {
    buf: Vec<u8>,
    /// The first byte not yet handed out.
    start: usize,
    /// The next byte to scan.
    pos: usize,
    /// How deep the scan is in `{`/`[` (0: between objects).
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl Objects {
    /// Adds the body's next piece. What has been handed out is dropped.
    pub fn push(&mut self, piece: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.pos -= self.start;
            self.start = 0;
            // Give back what a large request took, once it is handed out
            // (a watch stream lives long).
            if self.buf.capacity() > 64 * 1024 && self.buf.capacity() > 4 * self.buf.len() {
                self.buf.shrink_to(self.buf.len().max(piece.len()) * 2);
            }
        }
        self.buf.extend_from_slice(piece);
    }

    /// The next object, or what stands in its way.
    pub fn next_piece(&mut self) -> Piece {
        while let Some(&b) = self.buf.get(self.pos) {
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\n' | b'\r' => {
                        self.pos += 1;
                        self.start = self.pos;
                        continue;
                    }
                    b'{' => {}
                    _ => {
                        let rest = &self.buf[self.pos..];
                        if rest.starts_with(b"null") {
                            self.pos += 4;
                            self.start = self.pos;
                            return Piece::Null;
                        }
                        if b"null".starts_with(rest) {
                            return Piece::More;
                        }
                        return Piece::NotObject;
                    }
                }
            }
            self.pos += 1;
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        let object = self.start..self.pos;
                        self.start = self.pos;
                        return Piece::Object(object);
                    }
                }
                _ => {}
            }
        }
        Piece::More
    }

    /// The bytes an `Object` range refers to (valid until the next `push`).
    pub fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// What is held and not handed out: the unfinished object, or what
    /// stands where an object should.
    pub fn rest(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece of a body cut into `cuts`, as strings ("null", "?" for
    /// not an object), until the body ends or is not objects; and the rest.
    fn split(cuts: &[&[u8]]) -> (Vec<String>, Vec<u8>) {
        let mut objects = Objects::default();
        let mut out = Vec::new();
        let mut stopped = false;
        for cut in cuts {
            objects.push(cut);
            while !stopped {
                match objects.next_piece() {
                    Piece::Object(r) => {
                        out.push(String::from_utf8_lossy(objects.bytes(r)).into_owned())
                    }
                    Piece::Null => out.push("null".into()),
                    Piece::More => break,
                    Piece::NotObject => {
                        out.push("?".into());
                        stopped = true;
                    }
                }
            }
        }
        (out, objects.rest().to_vec())
    }

    #[test]
    fn objects_are_found_however_the_body_is_cut() {
        let body = br#" {"a":"}{\"}","b":[{"c":1}]}
            null{"d":"\\"}  {}"#;
        let want = [
            r#"{"a":"}{\"}","b":[{"c":1}]}"#,
            "null",
            r#"{"d":"\\"}"#,
            "{}",
        ];
        for size in 1..body.len() {
            let cuts: Vec<&[u8]> = body.chunks(size).collect();
            let (got, rest) = split(&cuts);
            assert_eq!(got, want, "cut every {size} bytes");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn what_is_not_an_object_is_said() {
        assert_eq!(
            split(&[b"{} 5"]),
            (vec!["{}".into(), "?".into()], b"5".to_vec())
        );
        assert_eq!(split(&[b"nul", b"x"]).0, ["?"]);
        // An unfinished `null` or object waits for more.
        assert_eq!(split(&[b"nu"]), (vec![], b"nu".to_vec()));
        assert_eq!(split(&[b"{\"a", b"\":"]), (vec![], b"{\"a\":".to_vec()));
    }

    #[test]
    fn a_body_in_tiny_pieces_is_scanned_once() {
        // 1 MiB of string in one-byte pieces, with `}` all through it: each
        // byte is looked at once, and handed-out bytes are not kept.
        let mut objects = Objects::default();
        objects.push(b"{\"key\":\"");
        for i in 0..(1 << 20) {
            objects.push(if i % 2 == 0 { b"}" } else { b"{" });
            assert_eq!(objects.next_piece(), Piece::More);
        }
        objects.push(b"\"}");
        let Piece::Object(r) = objects.next_piece() else {
            panic!("no object");
        };
        assert_eq!(r.len(), (1 << 20) + 10);
        objects.push(b" ");
        assert_eq!(objects.next_piece(), Piece::More);
        assert!(objects.rest().is_empty());
        assert!(
            objects.buf.capacity() <= 64 * 1024,
            "the memory is given back"
        );
    }

    /// Any JSON value, strings with any characters (escaped as needed).
    fn json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".*".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn objects_come_out_as_they_went_in(
            objects in proptest::collection::vec(
                proptest::collection::btree_map(".*", json(), 0..4), 0..5),
            size in 1usize..16,
        ) {
            let objects: Vec<serde_json::Value> = objects
                .into_iter()
                .map(|m| serde_json::Value::Object(m.into_iter().collect()))
                .collect();
            let body: Vec<u8> = objects
                .iter()
                .flat_map(|o| format!("{o}\n ").into_bytes())
                .collect();
            let cuts: Vec<&[u8]> = body.chunks(size).collect();
            let (got, rest) = split(&cuts);
            let got: Vec<serde_json::Value> =
                got.iter().map(|o| serde_json::from_str(o).unwrap()).collect();
            proptest::prop_assert_eq!(got, objects);
            proptest::prop_assert!(rest.is_empty());
        }

        #[test]
        fn splitting_never_panics(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            size in 1usize..40,
        ) {
            let cuts: Vec<&[u8]> = body.chunks(size).collect();
            let _ = split(&cuts);
        }

        #[test]
        fn cutting_does_not_change_the_objects(
            body in r#"([{}\[\]":,a \\\n\x01é5]|null){0,80}"#,
            size in 1usize..20,
        ) {
            let whole = split(&[body.as_bytes()]);
            let cuts: Vec<&[u8]> = body.as_bytes().chunks(size).collect();
            proptest::prop_assert_eq!(split(&cuts), whole);
        }
    }
}
