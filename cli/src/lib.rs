//! `walrus-cli`: a blocking client for the walrus wire protocol and the command-line parsing the
//! binary uses. Depends on `walrus-core` only (for the codec), never on `walrus-node`.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use walrus_core::wire::{
    encode_command, parse_command, parse_reply, put_frame, take_frame, Command, Reply,
    FRAME_LEN_MAX_DEFAULT,
};

/// Largest reply accepted (replies to `STATE`/`METRICS` can be larger than requests).
pub const REPLY_LEN_MAX: usize = 16 << 20;

/// A connection to one node.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects, with a bounded wait, to `addr` (`host:port`).
    pub fn connect(addr: &str, timeout: Duration) -> io::Result<Client> {
        let mut last = io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        );
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    return Ok(Client {
                        stream,
                        buf: Vec::new(),
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Sends one request body and waits for its reply.
    pub fn request(&mut self, body: &[u8]) -> io::Result<Reply> {
        if body.len() > FRAME_LEN_MAX_DEFAULT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "request over the 1 MiB frame limit",
            ));
        }
        let mut frame = Vec::with_capacity(body.len() + 4);
        put_frame(&mut frame, body);
        self.stream.write_all(&frame)?;
        loop {
            match take_frame(&self.buf, REPLY_LEN_MAX) {
                Ok(Some((reply, used))) => {
                    let r = parse_reply(reply);
                    self.buf.drain(..used);
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
            let mut chunk = [0u8; 64 << 10];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the node closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Turns a REPL line or one-shot arguments into a request body. Words are split like a shell
/// (`PUT logs "hello world"`); the verb is case-insensitive; for `PUT`, every word after the
/// topic is the payload, joined by single spaces.
pub fn words_to_request(words: &[String]) -> Result<Vec<u8>, String> {
    let Some(verb) = words.first() else {
        return Err("empty command".into());
    };
    let verb = verb.to_ascii_uppercase();
    let body = match verb.as_str() {
        "PUT" => {
            if words.len() < 3 {
                return Err("usage: PUT <topic> <payload>".into());
            }
            let payload = words[2..].join(" ");
            encode_command(&Command::Put(&words[1], payload.as_bytes()))
        }
        _ => words
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 0 { verb.clone() } else { w.clone() })
            .collect::<Vec<_>>()
            .join(" ")
            .into_bytes(),
    };
    parse_command(&body).map_err(|e| e.to_string())?;
    Ok(body)
}

/// Splits a REPL line like a shell; `None` on unbalanced quotes.
pub fn split_line(line: &str) -> Option<Vec<String>> {
    shlex::split(line)
}

/// Text for `help`.
pub const HELP: &str = "\
commands:
  REGISTER <topic>          create a topic
  PUT <topic> <payload>     append one entry (quote payloads with spaces: PUT logs \"a b\")
  PUTD <level> <topic> <payload>
                            append one entry acknowledged at a durability level:
                            quorum-fsync, quorum-memory, leader-fsync or none
  GET <topic>               read the next entry at the topic's shared cursor
  STATE <topic>             the topic's segments as JSON
  METRICS                   node and Raft metrics as JSON
  help                      this text
  exit                      leave";

/// Renders a reply for people.
pub fn render(reply: &Reply) -> String {
    match reply {
        Reply::Ok(None) => "OK".into(),
        Reply::Ok(Some(p)) => format!("OK {}", String::from_utf8_lossy(p)),
        Reply::Empty => "EMPTY".into(),
        Reply::Err(r) => format!("ERR {r}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        split_line(s).unwrap()
    }

    #[test]
    fn quoting_follows_upstream() {
        assert_eq!(
            words_to_request(&w(r#"PUT logs "hello world""#)).unwrap(),
            b"PUT logs hello world"
        );
        assert_eq!(
            words_to_request(&w("put logs a b")).unwrap(),
            b"PUT logs a b"
        );
        assert_eq!(words_to_request(&w("get logs")).unwrap(), b"GET logs");
        assert_eq!(
            words_to_request(&w(r#"putd quorum-memory logs "a b""#)).unwrap(),
            b"PUTD quorum-memory logs a b"
        );
        assert!(words_to_request(&w("PUTD fast logs x")).is_err());
        assert_eq!(words_to_request(&w("metrics")).unwrap(), b"METRICS");
        assert!(words_to_request(&w("PUT logs")).is_err());
        assert!(words_to_request(&w("GET bad/topic")).is_err());
        assert!(words_to_request(&w("FROB x")).is_err());
        assert!(split_line(r#"PUT logs "unbalanced"#).is_none());
    }

    #[test]
    fn a_node_that_is_down_is_a_clear_error() {
        // Bind a free loopback port, then close it: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Client::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(2))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
    }
}
