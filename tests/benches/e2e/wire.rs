//! Just enough MQTT 3.1.1 over a blocking socket to generate load cheaply: CONNECT, QoS 1
//! PUBLISH, PUBACK, SUBSCRIBE. A full client (rumqttc) spends more CPU per message than the
//! host under test, and the load generator shares the machine's two cores with it.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;

/// PUBLISH with QoS 1 (no DUP, no RETAIN).
const PUBLISH_QOS1: u8 = 0x32;
/// Packet types, in the high nibble of the first byte.
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const SUBACK: u8 = 9;

/// Connects a clean session with keep-alive off and waits for a successful CONNACK.
pub fn connect(port: u16, client_id: &str) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02, 0, 0]); // level 4, clean session, keep-alive 0
    put_str(&mut body, client_id);
    let mut packet = vec![0x10];
    put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    stream.write_all(&packet)?;
    let (header, body) = PacketReader::new(&stream).next()?;
    if header >> 4 != CONNACK || body.get(1) != Some(&0) {
        return Err(io::Error::other(format!(
            "the broker refused the connection (CONNACK {body:?})"
        )));
    }
    Ok(stream)
}

/// Subscribes `stream` to `filters` at QoS 1 and waits for the SUBACK.
pub fn subscribe(stream: &mut TcpStream, filters: &[&str]) -> io::Result<()> {
    let mut body = vec![0, 1];
    for filter in filters {
        put_str(&mut body, filter);
        body.push(1);
    }
    let mut packet = vec![0x82];
    put_remaining_length(&mut packet, body.len());
    packet.extend_from_slice(&body);
    stream.write_all(&packet)?;
    let (header, body) = PacketReader::new(&*stream).next()?;
    if header >> 4 != SUBACK || body[2..].iter().any(|&code| code > 1) {
        return Err(io::Error::other(format!("subscription refused: {body:?}")));
    }
    Ok(())
}

/// Appends a QoS 1 PUBLISH of `payload` to `topic` with packet id `packet_id`.
pub fn put_publish(out: &mut Vec<u8>, topic: &str, packet_id: u16, payload: &[u8]) {
    out.push(PUBLISH_QOS1);
    put_remaining_length(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends a PUBACK for `packet_id`.
pub fn put_puback(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[PUBACK << 4, 2]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

/// What one incoming packet is, as far as the load generator cares.
pub enum Incoming {
    /// A PUBACK.
    PubAck,
    /// A PUBLISH, with its packet id if its QoS asks for an acknowledgement.
    Publish {
        /// Packet id to acknowledge.
        packet_id: Option<u16>,
    },
    /// Anything else.
    Other,
}

/// Reads whole packets from a socket through a buffer.
pub struct PacketReader<R: Read> {
    reader: BufReader<R>,
}

impl<R: Read> PacketReader<R> {
    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            reader: BufReader::with_capacity(256 * 1024, inner),
        }
    }

    /// True when a whole packet may be waiting in the buffer without a read.
    pub fn has_buffered(&self) -> bool {
        !self.reader.buffer().is_empty()
    }

    /// The next packet: its first byte and its body.
    pub fn next(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut header = [0u8; 1];
        self.reader.read_exact(&mut header)?;
        let mut length = 0usize;
        for shift in (0..28).step_by(7) {
            let mut byte = [0u8; 1];
            self.reader.read_exact(&mut byte)?;
            length |= usize::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        Ok((header[0], body))
    }

    /// The next packet, classified.
    pub fn next_incoming(&mut self) -> io::Result<Incoming> {
        let (header, body) = self.next()?;
        Ok(match header >> 4 {
            PUBACK => Incoming::PubAck,
            PUBLISH => {
                let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
                let packet_id =
                    ((header >> 1) & 3 > 0).then(|| u16::from_be_bytes([body[at], body[at + 1]]));
                Incoming::Publish { packet_id }
            }
            _ => Incoming::Other,
        })
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    let len = u16::try_from(text.len()).expect("MQTT strings are under 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}
