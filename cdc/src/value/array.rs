//! Parser for Postgres' array literal syntax (the output of `array_out`, and everything
//! `array_in` accepts that a server could send back).
//!
//! The parser is total: malformed input yields `None`, never a panic, and recursion is
//! bounded by [`MAX_NESTING`].

/// Deepest nesting of `{…}` accepted. Postgres itself stops at 6 dimensions (`MAXDIM`);
/// the margin keeps the parser lenient while bounding its recursion.
pub(super) const MAX_NESTING: usize = 64;

/// One node of a parsed array literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Node {
    /// An unquoted `NULL` (any letter case).
    Null,
    /// An element's text, with quotes removed and backslash escapes resolved.
    Text(String),
    /// A (sub-)array: `{…}`.
    List(Vec<Node>),
}

/// Postgres' `array_isspace`: the characters `array_in` skips around elements.
pub(super) fn is_array_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Parses a whole array literal, e.g. `{1,2}`, `{{"a\"b",NULL},{c,d}}` or `[0:1]={5,6}`.
///
/// `delimiter` separates elements (`,` for almost every type, `;` for `box`). Returns
/// `None` if the text is not a well-formed literal: unbalanced braces or quotes, a dangling
/// backslash, an empty unquoted element, trailing garbage, a list that mixes sub-arrays
/// with scalars, or nesting deeper than [`MAX_NESTING`].
pub(super) fn parse(text: &str, delimiter: u8) -> Option<Node> {
    let delim = char::from(delimiter);
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        delim,
    };
    p.skip_space();
    if p.peek() == Some('[') {
        p.dimensions()?;
    }
    p.skip_space();
    let node = p.list(0)?;
    p.skip_space();
    if p.pos == p.chars.len() {
        Some(node)
    } else {
        None
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    delim: char,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    fn eat(&mut self, want: char) -> Option<()> {
        (self.bump()? == want).then_some(())
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.pos += 1;
        }
    }

    /// Skips the optional dimension decoration `[lb:ub][lb:ub]…=` (or `[ub]`) before the
    /// opening brace. The bounds are validated as integers but otherwise ignored: the JSON
    /// array is always zero-based.
    fn dimensions(&mut self) -> Option<()> {
        let mut count = 0;
        while self.peek() == Some('[') {
            count += 1;
            if count > MAX_NESTING {
                return None;
            }
            self.pos += 1;
            self.skip_space();
            self.integer()?;
            self.skip_space();
            if self.peek() == Some(':') {
                self.pos += 1;
                self.skip_space();
                self.integer()?;
                self.skip_space();
            }
            self.eat(']')?;
            self.skip_space();
        }
        self.eat('=')
    }

    fn integer(&mut self) -> Option<()> {
        if matches!(self.peek(), Some('+' | '-')) {
            self.pos += 1;
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        (self.pos > start).then_some(())
    }

    /// Parses `{…}` starting at the opening brace.
    fn list(&mut self, depth: usize) -> Option<Node> {
        if depth >= MAX_NESTING {
            return None;
        }
        self.eat('{')?;
        self.skip_space();
        let mut items = Vec::new();
        if self.peek() == Some('}') {
            self.pos += 1;
            return Some(Node::List(items));
        }
        loop {
            self.skip_space();
            let item = if self.peek() == Some('{') {
                self.list(depth + 1)?
            } else {
                self.element()?
            };
            // Postgres requires every element of one list to be of the same shape.
            if let Some(first) = items.first() {
                if matches!(first, Node::List(_)) != matches!(item, Node::List(_)) {
                    return None;
                }
            }
            items.push(item);
            self.skip_space();
            match self.bump()? {
                '}' => return Some(Node::List(items)),
                c if c == self.delim => continue,
                _ => return None,
            }
        }
    }

    /// Parses one scalar element up to (not including) the next delimiter or `}`.
    fn element(&mut self) -> Option<Node> {
        let mut buf = String::new();
        // Length of `buf` up to the last character that trailing-whitespace trimming must
        // keep (anything quoted or escaped, and any non-space).
        let mut keep = 0;
        let mut in_quotes = false;
        let mut literal = false; // saw quotes or backslashes: never NULL, never empty-invalid
        loop {
            let c = self.peek()?;
            if in_quotes {
                self.pos += 1;
                match c {
                    '"' => in_quotes = false,
                    '\\' => {
                        buf.push(self.bump()?);
                    }
                    _ => buf.push(c),
                }
                keep = buf.len();
                continue;
            }
            match c {
                '"' => {
                    self.pos += 1;
                    in_quotes = true;
                    literal = true;
                    keep = buf.len();
                }
                '\\' => {
                    self.pos += 1;
                    literal = true;
                    buf.push(self.bump()?);
                    keep = buf.len();
                }
                '{' => return None,
                '}' => break,
                c if c == self.delim => break,
                c => {
                    self.pos += 1;
                    buf.push(c);
                    if !is_array_space(c) {
                        keep = buf.len();
                    }
                }
            }
        }
        buf.truncate(keep);
        if !literal {
            if buf.is_empty() {
                return None;
            }
            if buf.eq_ignore_ascii_case("NULL") {
                return Some(Node::Null);
            }
        }
        Some(Node::Text(buf))
    }
}
