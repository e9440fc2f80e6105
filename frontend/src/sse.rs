//! Server-Sent Events, parsed from the bytes of a fetch body stream. `EventSource` cannot POST,
//! so the steer page reads `POST /generate` with `stream: true` itself and feeds each chunk here.
//! Chunks may split an event, a line or a UTF-8 character anywhere: bytes are buffered until an
//! event's blank line arrives.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event: String,
    pub data: String,
}

#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Feed a chunk; returns the events it completes, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let block: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            if let Some(e) = parse_block(&String::from_utf8_lossy(&block)) {
                out.push(e);
            }
        }
        out
    }
}

/// Where the first event ends: the index of its blank line and the separator's length.
fn find_blank_line(b: &[u8]) -> Option<(usize, usize)> {
    (0..b.len()).find_map(|i| {
        if b[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else if b[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else {
            None
        }
    })
}

fn parse_block(block: &str) -> Option<Event> {
    let (mut event, mut data) = (String::from("message"), Vec::new());
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v))).unwrap_or((line, ""));
        match field {
            "event" => event = value.to_owned(),
            "data" => data.push(value),
            _ => {}
        }
    }
    (!data.is_empty()).then(|| Event { event, data: data.join("\n") })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = "event: token\ndata: {\"variant\":\"normal\",\"text\":\"Paris ü\"}\n\n: keep-alive\n\nevent: done\ndata: {\"a\":1}\n\n";

    #[test]
    fn whole_stream() {
        let ev = Parser::default().push(STREAM.as_bytes());
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0], Event { event: "token".into(), data: "{\"variant\":\"normal\",\"text\":\"Paris ü\"}".into() });
        assert_eq!(ev[1].event, "done");
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let whole = Parser::default().push(STREAM.as_bytes());
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            let mut p = Parser::default();
            let mut got = p.push(&bytes[..cut]);
            got.extend(p.push(&bytes[cut..]));
            assert_eq!(got, whole, "split at {cut}");
        }
        // One byte at a time, including inside the two-byte "ü".
        let mut p = Parser::default();
        let got: Vec<Event> = bytes.iter().flat_map(|b| p.push(std::slice::from_ref(b))).collect();
        assert_eq!(got, whole);
    }

    #[test]
    fn crlf_multiline_data_and_default_event() {
        let ev = Parser::default().push(b"data: a\r\ndata: b\r\n\r\nevent: x\n\n");
        assert_eq!(ev, vec![Event { event: "message".into(), data: "a\nb".into() }]);
    }
}
