//! A validating JSON scanner: accepts exactly what serde_json accepts for a
//! `Value` (UTF-8, paired surrogate escapes, finite numbers, nesting below
//! 128) and hands out the raw text of an object's members, without building
//! a tree or copying a byte.
//!
//! It reports only where it stopped; the caller asks serde_json for the
//! error's offset and wording, so that errors stay those of serde_json.

/// serde_json's recursion limit: the 128th opening bracket is refused.
const MAX_DEPTH: u32 = 127;

/// The kind of a JSON value, told from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Boolean,
    /// A number.
    Number,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

impl Kind {
    /// The kind of the valid JSON value `raw` (no leading whitespace).
    pub fn of(raw: &str) -> Kind {
        match raw.as_bytes().first() {
            Some(b'n') => Kind::Null,
            Some(b't' | b'f') => Kind::Boolean,
            Some(b'"') => Kind::String,
            Some(b'[') => Kind::Array,
            Some(b'{') => Kind::Object,
            _ => Kind::Number,
        }
    }

    /// The kind as error details name it ("a string", "null").
    pub fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// One member of the top-level object, as written in the payload.
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The key with its quotes, escapes as sent.
    pub key: &'a str,
    /// True if the key has an escape.
    pub key_escaped: bool,
    /// The value, from its first byte to its last.
    pub value: &'a str,
    /// True if the value has no whitespace between its tokens.
    pub compact: bool,
}

impl Member<'_> {
    /// True if the key, decoded, is `name` (which needs no escaping).
    pub fn key_is(&self, name: &str) -> bool {
        if self.key_escaped {
            serde_json::from_str::<String>(self.key).is_ok_and(|key| key == name)
        } else {
            &self.key[1..self.key.len() - 1] == name
        }
    }
}

/// Where the scanner found the payload not to be JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Byte offset at which the scanner stopped.
    pub offset: usize,
    /// What it found wrong, briefly.
    pub reason: &'static str,
}

/// Scans the JSON text `payload` (one value, whitespace around it allowed),
/// calling `on_member` for each member of the top-level value if that is an
/// object, in document order (duplicates included). Returns the top-level
/// value's kind.
pub fn scan<'a>(payload: &'a [u8], on_member: impl FnMut(Member<'a>)) -> Result<Kind, Fault> {
    let text = std::str::from_utf8(payload).map_err(|e| Fault {
        offset: e.valid_up_to(),
        reason: "invalid UTF-8",
    })?;
    let mut scanner = Scanner {
        text,
        bytes: payload,
        pos: 0,
        depth: 0,
        skipped: 0,
    };
    let kind = match scanner.whitespace() {
        Some(b'{') => {
            scanner.object(on_member)?;
            Kind::Object
        }
        _ => scanner.value()?,
    };
    match scanner.whitespace() {
        None => Ok(kind),
        Some(_) => Err(scanner.fault("trailing characters")),
    }
}

/// Appends `text` as a JSON string: copied between quotes when it needs no
/// escape, else escaped as serde_json does.
pub fn push_string(out: &mut Vec<u8>, text: &str) {
    if plain_run_end(text.as_bytes(), 0) == text.len() {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string to a Vec cannot fail.
        let _ = serde_json::to_writer(out, text);
    }
}

/// Appends the valid JSON value `raw` to `out` without whitespace between
/// tokens; `compact` says it has none, so it is copied whole.
pub fn push_compact(out: &mut Vec<u8>, raw: &str, compact: bool) {
    if compact {
        out.extend_from_slice(raw.as_bytes());
        return;
    }
    let (mut in_string, mut escaped) = (false, false);
    for &b in raw.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            in_string = b == b'"';
            out.push(b);
        }
    }
}

/// The first index from `pos` on of a byte that ends a run of plain string
/// bytes (`"`, `\\` or a control character), or `bytes.len()`. Eight bytes
/// at a time: a byte is flagged where `b ^ q` is zero for a quote or a
/// backslash, or where `b - 0x20` borrows; the lowest flag is exact.
fn plain_run_end(bytes: &[u8], mut pos: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    while let Some(chunk) = bytes.get(pos..pos + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let flags = zero(w ^ (ONES * b'"' as u64))
            | zero(w ^ (ONES * b'\\' as u64))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS);
        if flags != 0 {
            return pos + (flags.trailing_zeros() / 8) as usize;
        }
        pos += 8;
    }
    while let Some(&b) = bytes.get(pos) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        pos += 1;
    }
    pos
}

struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: u32,
    /// Whitespace bytes skipped so far, to tell whether a value is compact.
    skipped: usize,
}

impl<'a> Scanner<'a> {
    fn fault(&self, reason: &'static str) -> Fault {
        Fault {
            offset: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    /// Skips whitespace; the byte after it, if any.
    fn whitespace(&mut self) -> Option<u8> {
        while let Some(b) = self.peek() {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.pos += 1;
            self.skipped += 1;
        }
        None
    }

    fn value(&mut self) -> Result<Kind, Fault> {
        match self.whitespace() {
            None => Err(self.fault("EOF while parsing a value")),
            Some(b'{') => {
                self.object(|_| {})?;
                Ok(Kind::Object)
            }
            Some(b'[') => {
                self.array()?;
                Ok(Kind::Array)
            }
            Some(b'"') => {
                self.string()?;
                Ok(Kind::String)
            }
            Some(b'n') => self.ident("null", Kind::Null),
            Some(b't') => self.ident("true", Kind::Boolean),
            Some(b'f') => self.ident("false", Kind::Boolean),
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
                Ok(Kind::Number)
            }
            Some(_) => Err(self.fault("expected value")),
        }
    }

    fn ident(&mut self, word: &str, kind: Kind) -> Result<Kind, Fault> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(self.fault("expected ident"))
        }
    }

    /// Enters an array or object at `self.pos`.
    fn open(&mut self) -> Result<(), Fault> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.fault("recursion limit exceeded"));
        }
        self.pos += 1;
        Ok(())
    }

    /// Leaves an array or object at its closing bracket at `self.pos`.
    fn close(&mut self) {
        self.depth -= 1;
        self.pos += 1;
    }

    fn array(&mut self) -> Result<(), Fault> {
        self.open()?;
        if self.whitespace() == Some(b']') {
            self.close();
            return Ok(());
        }
        loop {
            self.value()?;
            match self.whitespace() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.close();
                    return Ok(());
                }
                _ => return Err(self.fault("expected `,` or `]`")),
            }
        }
    }

    fn object(&mut self, mut on_member: impl FnMut(Member<'a>)) -> Result<(), Fault> {
        self.open()?;
        if self.whitespace() == Some(b'}') {
            self.close();
            return Ok(());
        }
        loop {
            if self.whitespace() != Some(b'"') {
                return Err(self.fault("key must be a string"));
            }
            let key_start = self.pos;
            let key_escaped = self.string()?;
            let key = &self.text[key_start..self.pos];
            if self.whitespace() != Some(b':') {
                return Err(self.fault("expected `:`"));
            }
            self.pos += 1;
            self.whitespace();
            let (start, skipped) = (self.pos, self.skipped);
            self.value()?;
            on_member(Member {
                key,
                key_escaped,
                value: &self.text[start..self.pos],
                compact: self.skipped == skipped,
            });
            match self.whitespace() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.close();
                    return Ok(());
                }
                _ => return Err(self.fault("expected `,` or `}`")),
            }
        }
    }

    /// A string whose opening quote is at `self.pos`; true if it has an
    /// escape.
    fn string(&mut self) -> Result<bool, Fault> {
        self.pos += 1;
        let mut escaped = false;
        loop {
            self.pos = plain_run_end(self.bytes, self.pos);
            match self.peek() {
                None => return Err(self.fault("EOF while parsing a string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    escaped = true;
                    self.escape()?;
                }
                Some(_) => return Err(self.fault("control character in a string")),
            }
        }
    }

    /// An escape whose backslash is at `self.pos`; a `\u` escape of a
    /// surrogate must be a leading one followed by a trailing one.
    fn escape(&mut self) -> Result<(), Fault> {
        self.pos += 1;
        match self.peek() {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.pos += 1;
                Ok(())
            }
            Some(b'u') => {
                self.pos += 1;
                match self.hex4()? {
                    0xD800..=0xDBFF => {
                        if !self.bytes[self.pos..].starts_with(b"\\u") {
                            return Err(self.fault("lone leading surrogate"));
                        }
                        self.pos += 2;
                        match self.hex4()? {
                            0xDC00..=0xDFFF => Ok(()),
                            _ => Err(self.fault("lone leading surrogate")),
                        }
                    }
                    0xDC00..=0xDFFF => Err(self.fault("lone trailing surrogate")),
                    _ => Ok(()),
                }
            }
            _ => Err(self.fault("invalid escape")),
        }
    }

    fn hex4(&mut self) -> Result<u16, Fault> {
        let digits = self
            .bytes
            .get(self.pos..self.pos + 4)
            .ok_or_else(|| self.fault("EOF in a \\u escape"))?;
        let mut n = 0u16;
        for &d in digits {
            let v = (d as char)
                .to_digit(16)
                .ok_or_else(|| self.fault("invalid \\u escape"))?;
            n = n << 4 | v as u16;
        }
        self.pos += 4;
        Ok(n)
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// A number: serde_json's grammar, and finite as an f64 (it refuses
    /// `1e400`, and integers of more than 309 digits).
    fn number(&mut self) -> Result<(), Fault> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        let integer_digits = match self.peek() {
            Some(b'0') => {
                self.pos += 1;
                1
            }
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.fault("invalid number")),
        };
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return Err(self.fault("invalid number"));
            }
        }
        let mut exponent = false;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            exponent = true;
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return Err(self.fault("invalid number"));
            }
        }
        if exponent || integer_digits > 308 {
            let finite = self.text[start..self.pos]
                .parse::<f64>()
                .is_ok_and(f64::is_finite);
            if !finite {
                return Err(self.fault("number out of range"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(text: &[u8]) -> bool {
        scan(text, |_| {}).is_ok()
    }

    fn serde_accepts(text: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(text).is_ok()
    }

    const DOCUMENTS: &[&str] = &[
        r#"{"eventType":"t","eventData":{"a":[1,-2.5e-3,true,false,null,"x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"],"b":{}}}"#,
        "{ \"a\" : [ 0 , -0 , 0.5 , 1E+2 , 1e-2 ] , \"b\" : { \"c\" : [ ] } }",
        r#"[1,"2",{"3":[4]}]"#,
        r#""\u0041\uD834\uDD1E""#,
        "123456789012345678901234567890",
        "1.7976931348623157e308",
        "-0.0e-99999999999999999999",
        "null",
    ];

    #[test]
    fn agrees_with_serde_json_on_documents_and_every_one_byte_change() {
        let replacements = b"{}[]\",:\\ \t\n0123456789eE.+-tfnulrsaxd\x01\x7f";
        let mut checked = 0;
        for doc in DOCUMENTS {
            assert!(accepts(doc.as_bytes()), "{doc}");
            let bytes = doc.as_bytes();
            for i in 0..=bytes.len() {
                for &r in replacements {
                    for text in [
                        [&bytes[..i], &[r], bytes.get(i + 1..).unwrap_or(&[])].concat(),
                        [&bytes[..i], &[r], &bytes[i..]].concat(),
                        [&bytes[..i], bytes.get(i + 1..).unwrap_or(&[])].concat(),
                    ] {
                        assert_eq!(
                            accepts(&text),
                            serde_accepts(&text),
                            "{}",
                            String::from_utf8_lossy(&text)
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked}");
    }

    #[test]
    fn agrees_with_serde_json_on_edges() {
        for text in [
            "",
            " ",
            "{",
            "}",
            "[",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "--1",
            "+1",
            "1e400",
            "-1e400",
            "1e308",
            "10e308",
            "1.7976931348623159e308",
            "0e99999",
            "tru",
            "nul",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "\"\\ud800\\n\"",
            "\"\\ud800\\udbff\"",
            "\"\\u12\"",
            "\"\\x\"",
            "\"a",
            "\"\t\"",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{1:2}",
            "[1 2]",
            "{} {}",
            "[] x",
            "\u{feff}{}",
        ] {
            assert_eq!(
                accepts(text.as_bytes()),
                serde_accepts(text.as_bytes()),
                "{text:?}"
            );
        }
        let big = "9".repeat(309);
        assert_eq!(accepts(big.as_bytes()), serde_accepts(big.as_bytes()));
        let bigger = "9".repeat(310);
        assert_eq!(accepts(bigger.as_bytes()), serde_accepts(bigger.as_bytes()));
        assert!(!accepts(b"\"\xff\""));
    }

    #[test]
    fn nesting_stops_at_serde_jsons_limit() {
        for depth in [126, 127, 128, 129] {
            let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            assert_eq!(accepts(text.as_bytes()), depth <= 127, "{depth}");
            assert_eq!(serde_accepts(text.as_bytes()), depth <= 127, "{depth}");
        }
    }

    #[test]
    fn members_in_document_order_with_duplicates_and_raw_text() {
        let mut seen = Vec::new();
        let kind = scan(
            br#" { "a" : 1 , "b":{ "x": [1, 2] },"a":"\u0041", "c":[]} "#,
            |m| seen.push((m.key, m.value, m.compact)),
        )
        .unwrap();
        assert_eq!(kind, Kind::Object);
        assert_eq!(
            seen,
            [
                ("\"a\"", "1", true),
                ("\"b\"", "{ \"x\": [1, 2] }", false),
                ("\"a\"", "\"\\u0041\"", true),
                ("\"c\"", "[]", true),
            ]
        );
        assert_eq!(scan(b" [1] ", |_| panic!()).unwrap(), Kind::Array);
    }

    #[test]
    fn keys_are_compared_decoded() {
        let mut keys = Vec::new();
        scan(br#"{"event\u0054ype":1,"eventType":2,"e":3}"#, |m| {
            keys.push(m.key_is("eventType"))
        })
        .unwrap();
        assert_eq!(keys, [true, true, false]);
    }

    #[test]
    fn plain_runs_end_at_the_first_quote_backslash_or_control_byte() {
        let naive = |bytes: &[u8], pos: usize| {
            (pos..bytes.len())
                .find(|&i| matches!(bytes[i], b'"' | b'\\' | 0..=0x1f))
                .unwrap_or(bytes.len())
        };
        for len in 0..20 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f, b' ', 0x7f, 0x80, 0xff, 0x21, 0x5d] {
                    let mut bytes = vec![b'a'; len];
                    if at < len {
                        bytes[at] = special;
                    }
                    bytes.extend_from_slice(b"\"tail");
                    for start in [0, at.min(3)] {
                        assert_eq!(
                            plain_run_end(&bytes, start),
                            naive(&bytes, start),
                            "{bytes:?} from {start}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn strings_are_escaped_only_where_needed() {
        let mut out = Vec::new();
        push_string(&mut out, "plain é 🙂");
        push_string(&mut out, "q\"b\\c\u{1}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""plain é 🙂""q\"b\\c\u0001""#
        );
    }

    #[test]
    fn compact_copy_drops_only_whitespace_between_tokens() {
        let mut out = Vec::new();
        push_compact(
            &mut out,
            "{ \"a b\" : [ 1 ,\n\t\"\\\" x \" ] ,\r\n \"c\":{} }",
            false,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a b":[1,"\" x "],"c":{}}"#
        );
    }
}
