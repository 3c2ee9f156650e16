//! DNS-over-TCP framing (RFC 7766 / RFC 1035 4.2.2), sans-IO.
//!
//! Every message is preceded by its length as a big-endian `u16`. A connection carries any
//! number of messages in both directions; [`FrameDecoder`] hands each one out as soon as its
//! last byte is in, so the shard can answer out of order. Frames whose length is below 12
//! (the DNS header; this includes 0) or above the configured maximum are not delivered: they
//! end the connection's input and the framing error is counted — nothing useful, not even the
//! ID of an answer, can be made of them, and RFC 7766 lets a server close such a connection.
//! (The connection code answers what came before such a frame, then closes.)
//! [`OutBuf`] holds length-prefixed output up to a byte limit.
//!
//! Memory: both buffers start empty and grow on demand, the input to the largest frame seen
//! (at most 2 + the maximum message), the output to its limit, never beyond; a connection's
//! buffers are kept for the next connection in its slot, shrunk back to
//! [`INITIAL_INPUT`] / [`KEEP_OUTPUT`] bytes when they grew larger ([`FrameDecoder::release`],
//! [`OutBuf::release`]). Serving ordinary queries allocates nothing once a slot is warm.

/// The length of a DNS header: no frame shorter than this is delivered.
pub const MIN_MESSAGE: usize = 12;

/// Initial size of a connection's input buffer; it grows to the largest frame seen.
pub const INITIAL_INPUT: usize = 4096;

/// Output capacity a connection slot keeps across connections (more is given back on close).
pub const KEEP_OUTPUT: usize = 16 * 1024;

/// A frame length that is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than a DNS header (including 0).
    #[error("TCP frame of {0} bytes is shorter than a DNS header")]
    TooShort(usize),
    /// Longer than the configured maximum.
    #[error("TCP frame of {0} bytes is longer than the maximum")]
    TooLong(usize),
}

/// Reassembles length-prefixed DNS messages from a byte stream.
///
/// Use: write received bytes into [`spare`](Self::spare), [`commit`](Self::commit) how many,
/// then take messages with [`next_frame`](Self::next_frame) until it returns `Ok(None)`.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_message: usize,
}

impl FrameDecoder {
    /// A decoder accepting messages of `MIN_MESSAGE..=max_message` bytes (`max_message` is
    /// capped at 65535). Allocates nothing until first used.
    pub fn new(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_message: max_message.min(65535),
        }
    }

    /// Forgets all buffered bytes (keeps the allocation), for reuse on a new connection.
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Like [`reset`](Self::reset), and gives back the buffer if a large frame grew it past
    /// [`INITIAL_INPUT`] (one allocation at the next use, only after large frames).
    pub fn release(&mut self) {
        self.reset();
        if self.buf.capacity() > INITIAL_INPUT {
            self.buf = Vec::new();
        }
    }

    /// Bytes of memory held by the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Bytes received and not yet taken as messages.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The length the frame at the front announces, once its prefix is in.
    fn announced(&self) -> Option<usize> {
        let b = self.buf.get(self.start..self.start + 2)?;
        (self.buffered() >= 2).then(|| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// Room to receive into. Empty only when complete messages are waiting to be taken.
    /// Grows the buffer (up to 2 + max message) when the frame at the front needs it.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = match self.announced() {
            Some(len) if len <= self.max_message => 2 + len,
            _ => 2,
        };
        if self.buf.len() - self.start < need || self.end == self.buf.len() {
            // Move the partial frame to the front, then make sure it fits.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let want = need.max(INITIAL_INPUT.min(2 + self.max_message));
            if self.buf.len() < want {
                // Exactly what is needed: the capacity never exceeds 2 + max message.
                self.buf.reserve_exact(want - self.buf.len());
                self.buf.resize(want, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written at the start of [`spare`](Self::spare).
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The next complete message (without its prefix), `Ok(None)` if it is not all in yet,
    /// or the framing error that makes the stream unusable.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let Some(len) = self.announced() else {
            return Ok(None);
        };
        if len < MIN_MESSAGE {
            return Err(FrameError::TooShort(len));
        }
        if len > self.max_message {
            return Err(FrameError::TooLong(len));
        }
        if self.buffered() < 2 + len {
            return Ok(None);
        }
        let at = self.start + 2;
        self.start = at + len;
        Ok(Some(&self.buf[at..at + len]))
    }
}

/// Why a message could not be queued on an [`OutBuf`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OutError {
    /// The buffer would go over its limit (the peer is not reading).
    #[error("output buffer full")]
    Overflow,
    /// The message cannot be framed (over 65535 bytes).
    #[error("message too long for TCP framing")]
    TooLong,
}

/// Length-prefixed output waiting to be written, bounded in bytes.
#[derive(Debug)]
pub struct OutBuf {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl OutBuf {
    /// An empty buffer that holds at most `limit` unsent bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            limit,
        }
    }

    /// Appends `msg` with its length prefix.
    pub fn push_frame(&mut self, msg: &[u8]) -> Result<(), OutError> {
        let len = u16::try_from(msg.len()).map_err(|_| OutError::TooLong)?;
        if self.pending().len() + 2 + msg.len() > self.limit {
            return Err(OutError::Overflow);
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 0 && self.buf.len() + 2 + msg.len() > self.buf.capacity() {
            // Reclaim the written part before growing.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let need = self.buf.len() + 2 + msg.len();
        if need > self.buf.capacity() {
            // Grow by doubling, but never past the limit (what is pending never exceeds it).
            let target = need.max(self.buf.capacity() * 2).min(self.limit.max(need));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(msg);
        Ok(())
    }

    /// The bytes still to write.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Records that the first `n` pending bytes were written.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// Drops everything pending (keeps the allocation).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
    }

    /// Like [`clear`](Self::clear), and gives back the buffer if it grew past
    /// [`KEEP_OUTPUT`].
    pub fn release(&mut self) {
        self.clear();
        if self.buf.capacity() > KEEP_OUTPUT {
            self.buf = Vec::new();
        }
    }

    /// Bytes of memory held by the buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut v = (len as u16).to_be_bytes().to_vec();
        v.extend(std::iter::repeat_n(fill, len));
        v
    }

    /// Feeds `input` in chunks of `chunk` bytes; returns the messages and the first error.
    fn decode(input: &[u8], chunk: usize, max: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut d = FrameDecoder::new(max);
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            loop {
                match d.next_frame() {
                    Ok(Some(m)) => out.push(m.to_vec()),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
            if rest.is_empty() {
                return (out, None);
            }
            let spare = d.spare();
            assert!(!spare.is_empty());
            let n = chunk.min(rest.len()).min(spare.len());
            spare[..n].copy_from_slice(&rest[..n]);
            d.commit(n);
            rest = &rest[n..];
        }
    }

    #[test]
    fn decodes_pipelined_and_split_frames() {
        let mut input = Vec::new();
        for (len, fill) in [(12, 1), (300, 2), (65535, 3), (12, 4), (5000, 5)] {
            input.extend(frame(len, fill));
        }
        for chunk in [1, 2, 3, 7, 512, 4096, 70000] {
            let (msgs, err) = decode(&input, chunk, 65535);
            assert_eq!(err, None, "chunk {chunk}");
            let lens: Vec<_> = msgs.iter().map(|m| (m.len(), m[0])).collect();
            assert_eq!(
                lens,
                [(12, 1), (300, 2), (65535, 3), (12, 4), (5000, 5)],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        for (len, max, want) in [
            (0, 65535, FrameError::TooShort(0)),
            (11, 65535, FrameError::TooShort(11)),
            (513, 512, FrameError::TooLong(513)),
        ] {
            let mut input = frame(20, 9);
            input.extend(frame(len, 0));
            let (msgs, err) = decode(&input, 5, max);
            assert_eq!(msgs.len(), 1);
            assert_eq!(err, Some(want));
        }
    }

    #[test]
    fn incomplete_frame_waits() {
        let mut input = frame(100, 1);
        input.truncate(60);
        let (msgs, err) = decode(&input, 60, 65535);
        assert!(msgs.is_empty());
        assert_eq!(err, None);
    }

    #[test]
    fn spare_is_empty_only_with_complete_frames_waiting() {
        let mut d = FrameDecoder::new(65535);
        let f = frame(12, 7);
        let mut filled = 0;
        // Fill the buffer with complete frames without taking them.
        loop {
            let spare = d.spare();
            if spare.is_empty() {
                break;
            }
            let n = spare.len().min(f.len());
            spare[..n].copy_from_slice(&f[..n]);
            d.commit(n);
            filled += n;
            assert!(filled < 1 << 20);
        }
        assert!(d.next_frame().unwrap().is_some());
        assert!(!d.spare().is_empty());
    }

    #[test]
    fn out_buf_bounds_and_drains() {
        let mut o = OutBuf::new(100);
        o.push_frame(&[1; 40]).unwrap();
        o.push_frame(&[2; 40]).unwrap();
        assert_eq!(o.push_frame(&[3; 40]), Err(OutError::Overflow));
        assert_eq!(o.pending().len(), 84);
        assert_eq!(&o.pending()[..2], &[0, 40]);
        o.consume(50);
        o.push_frame(&[4; 40]).unwrap();
        assert_eq!(o.pending().len(), 34 + 42);
        o.consume(76);
        assert!(o.is_empty());
        assert_eq!(
            OutBuf::new(1 << 20).push_frame(&vec![0; 70000]),
            Err(OutError::TooLong)
        );
    }
}
