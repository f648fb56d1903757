//! Splits a streamed request body into its items' texts, one at a time, with memory bounded
//! by the largest item: a JSON array (`[item, item, …]`) by a small scanner that tracks
//! strings and nesting, or NDJSON (one item per line). It checks the framing only; each
//! item's text is parsed by the caller, which reports its syntax errors at the item.

/// The framing of a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// One JSON array of items.
    Array,
    /// One item per line; blank lines are skipped.
    Ndjson,
}

/// Where an item sits in the body: its 0-based index in an array, or its 1-based line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum At {
    /// `/3`.
    Index(usize),
    /// `line 4`.
    Line(usize),
}

impl At {
    /// The `where` of an error about this item, with `rest` (a JSON Pointer inside the item)
    /// appended in an array (`/3/id`); NDJSON names the line only.
    pub fn pointer(self, rest: &str) -> String {
        match self {
            At::Index(i) => format!("/{i}{rest}"),
            At::Line(n) => format!("line {n}"),
        }
    }
}

/// Why a body could not be split.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum SplitError {
    /// One item is longer than the limit.
    #[error("item {} is over {limit} bytes", at.pointer(""))]
    TooLarge {
        /// The item.
        at: At,
        /// The limit.
        limit: usize,
    },
    /// The array's framing is broken (`pointer`: where, `""` for the whole body).
    #[error("{message}")]
    Framing {
        /// Where.
        pointer: String,
        /// What is wrong.
        message: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the array's `[`.
    Open,
    /// After `[` (`first`) or a `,`: an item or (first only) `]` comes next.
    Expect { first: bool },
    /// Inside an item.
    Item,
    /// After the closing `]`: only whitespace may follow.
    Closed,
}

/// The splitter: feed it chunks with [`Splitter::push`], then call [`Splitter::finish`].
#[derive(Debug)]
pub(super) struct Splitter {
    framing: Framing,
    limit: usize,
    /// The current item's bytes so far.
    item: Vec<u8>,
    /// Items emitted (array), or the current line (NDJSON, 1-based).
    count: usize,
    phase: Phase,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim(mut bytes: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = bytes {
        if !is_space(*first) {
            break;
        }
        bytes = rest;
    }
    while let [rest @ .., last] = bytes {
        if !is_space(*last) {
            break;
        }
        bytes = rest;
    }
    bytes
}

impl Splitter {
    /// A splitter for `framing` whose items may each be at most `limit` bytes.
    pub fn new(framing: Framing, limit: usize) -> Self {
        Splitter {
            framing,
            limit,
            item: Vec::new(),
            count: match framing {
                Framing::Array => 0,
                Framing::Ndjson => 1,
            },
            phase: Phase::Open,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }

    /// Feeds `chunk`, calling `emit` with each complete item (its text trimmed); stops at
    /// the first error, `emit`'s included.
    pub fn push<E: From<SplitError>>(
        &mut self,
        chunk: &[u8],
        emit: &mut impl FnMut(At, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self.framing {
            Framing::Ndjson => self.push_lines(chunk, emit),
            Framing::Array => self.push_array(chunk, emit),
        }
    }

    /// Ends the body: emits the last NDJSON line, checks that an array was closed.
    pub fn finish<E: From<SplitError>>(
        &mut self,
        emit: &mut impl FnMut(At, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        match self.framing {
            Framing::Ndjson => self.line(emit),
            Framing::Array => match self.phase {
                Phase::Closed => Ok(()),
                Phase::Open => Err(SplitError::Framing {
                    pointer: String::new(),
                    message: "expected a JSON array of items, got an empty body",
                }
                .into()),
                _ => Err(SplitError::Framing {
                    pointer: At::Index(self.count).pointer(""),
                    message: "the body ends inside the array (no closing `]`)",
                }
                .into()),
            },
        }
    }

    fn grow(&mut self, bytes: &[u8], at: At) -> Result<(), SplitError> {
        if self.item.len() + bytes.len() > self.limit {
            return Err(SplitError::TooLarge {
                at,
                limit: self.limit,
            });
        }
        self.item.extend_from_slice(bytes);
        Ok(())
    }

    fn push_lines<E: From<SplitError>>(
        &mut self,
        mut chunk: &[u8],
        emit: &mut impl FnMut(At, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            self.grow(&chunk[..end], At::Line(self.count))?;
            self.line(emit)?;
            self.count += 1;
            chunk = &chunk[end + 1..];
        }
        self.grow(chunk, At::Line(self.count))?;
        Ok(())
    }

    fn line<E: From<SplitError>>(
        &mut self,
        emit: &mut impl FnMut(At, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let text = trim(&self.item);
        if !text.is_empty() {
            emit(At::Line(self.count), text)?;
        }
        self.item.clear();
        Ok(())
    }

    fn push_array<E: From<SplitError>>(
        &mut self,
        chunk: &[u8],
        emit: &mut impl FnMut(At, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        // Bytes of `chunk` from `start` on belong to the current item, copied in one go at
        // its end or the chunk's.
        let mut start = 0;
        for (i, &b) in chunk.iter().enumerate() {
            match self.phase {
                Phase::Open | Phase::Closed if is_space(b) => {}
                Phase::Open if b == b'[' => self.phase = Phase::Expect { first: true },
                Phase::Open => {
                    return Err(SplitError::Framing {
                        pointer: String::new(),
                        message: "expected a JSON array of items",
                    }
                    .into())
                }
                Phase::Closed => {
                    return Err(SplitError::Framing {
                        pointer: String::new(),
                        message: "unexpected data after the array's closing `]`",
                    }
                    .into())
                }
                Phase::Expect { .. } if is_space(b) => {}
                Phase::Expect { first: true } if b == b']' => self.phase = Phase::Closed,
                Phase::Expect { .. } if b == b']' || b == b',' => {
                    return Err(SplitError::Framing {
                        pointer: At::Index(self.count).pointer(""),
                        message: "expected an item after `,`",
                    }
                    .into());
                }
                Phase::Expect { .. } => {
                    self.phase = Phase::Item;
                    start = i;
                    self.scan(b);
                }
                Phase::Item if self.in_string || self.depth > 0 || (b != b',' && b != b']') => {
                    self.scan(b)
                }
                Phase::Item => {
                    let at = At::Index(self.count);
                    self.grow(&chunk[start..i], at)?;
                    emit(at, trim(&self.item))?;
                    self.item.clear();
                    self.count += 1;
                    self.phase = match b {
                        b',' => Phase::Expect { first: false },
                        _ => Phase::Closed,
                    };
                }
            }
        }
        if self.phase == Phase::Item {
            self.grow(&chunk[start..], At::Index(self.count))?;
        }
        Ok(())
    }

    /// Tracks strings and nesting over one byte of an item.
    fn scan(&mut self, b: u8) {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            // Unbalanced closers make the item's text invalid JSON, which its parse reports.
            b'}' | b']' => self.depth = self.depth.saturating_sub(1),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(framing: Framing, body: &str, chunk: usize) -> Result<Vec<(At, String)>, SplitError> {
        let mut out = Vec::new();
        let mut s = Splitter::new(framing, 64);
        let mut emit = |at, bytes: &[u8]| -> Result<(), SplitError> {
            out.push((at, String::from_utf8_lossy(bytes).into_owned()));
            Ok(())
        };
        for piece in body.as_bytes().chunks(chunk) {
            s.push(piece, &mut emit)?;
        }
        s.finish(&mut emit)?;
        Ok(out)
    }

    #[test]
    fn arrays_split_into_items_whatever_the_chunking() {
        let body = r#" [ {"id":1,"s":"a,]}\"["} , {"id":2,"n":{"x":[1,2]}},3 ] "#;
        for chunk in [1, 2, 3, 7, 1000] {
            let items = split(Framing::Array, body, chunk).unwrap();
            assert_eq!(
                items,
                [
                    (At::Index(0), r#"{"id":1,"s":"a,]}\"["}"#.to_string()),
                    (At::Index(1), r#"{"id":2,"n":{"x":[1,2]}}"#.to_string()),
                    (At::Index(2), "3".to_string()),
                ],
                "chunk {chunk}"
            );
        }
        assert_eq!(split(Framing::Array, "[]", 1).unwrap(), []);
        assert_eq!(split(Framing::Array, " [ ] ", 1).unwrap(), []);
    }

    #[test]
    fn broken_arrays_say_where() {
        let err = |body| split(Framing::Array, body, 3).unwrap_err().to_string();
        let at = |body| match split(Framing::Array, body, 3).unwrap_err() {
            SplitError::Framing { pointer, .. } => pointer,
            SplitError::TooLarge { at, .. } => at.pointer(""),
        };
        assert_eq!(err(r#"{"id":1}"#), "expected a JSON array of items");
        assert_eq!(err(""), "expected a JSON array of items, got an empty body");
        assert_eq!(at(r#"[{"id":1},]"#), "/1");
        assert_eq!(at(r#"[{"id":1},{"id":2}"#), "/1");
        assert_eq!(
            err(r#"[{"id":1}] x"#),
            "unexpected data after the array's closing `]`"
        );
        let long = format!(r#"[{{"id":1}},{{"id":"{}"}}]"#, "x".repeat(64));
        assert_eq!(at(&long), "/1");
    }

    #[test]
    fn ndjson_splits_on_lines_and_skips_blank_ones() {
        let body = "{\"id\":1}\r\n\n  \n{\"id\":2}\n{\"id\":3}";
        for chunk in [1, 4, 1000] {
            let items = split(Framing::Ndjson, body, chunk).unwrap();
            assert_eq!(
                items,
                [
                    (At::Line(1), r#"{"id":1}"#.to_string()),
                    (At::Line(4), r#"{"id":2}"#.to_string()),
                    (At::Line(5), r#"{"id":3}"#.to_string()),
                ]
            );
        }
        let long = format!("{{}}\n{}\n", "x".repeat(65));
        assert_eq!(
            split(Framing::Ndjson, &long, 10).unwrap_err(),
            SplitError::TooLarge {
                at: At::Line(2),
                limit: 64
            }
        );
    }
}
