//! Holding back the last bytes of a stream (a trailer, a seal) until it ends: everything that falls
//! out of that window is body. One implementation for the object's trailer, the age stage's seal and
//! the keyless seal check.

/// The last `keep` bytes seen so far.
#[derive(Debug)]
pub(crate) struct HoldBack {
    held: Vec<u8>,
    keep: usize,
}

impl HoldBack {
    /// Holds back the last `keep` bytes.
    pub(crate) fn new(keep: usize) -> Self {
        HoldBack { held: Vec::with_capacity(2 * keep), keep }
    }

    /// Takes the next `input`; returns the body it releases, in order: bytes held before, then a
    /// part of `input`.
    pub(crate) fn push<'a>(&mut self, input: &'a [u8]) -> (Vec<u8>, &'a [u8]) {
        if input.len() >= self.keep {
            let (body, tail) = input.split_at(input.len() - self.keep);
            (std::mem::replace(&mut self.held, tail.to_vec()), body)
        } else {
            self.held.extend_from_slice(input);
            let excess = self.held.len().saturating_sub(self.keep);
            (self.held.drain(..excess).collect(), &[])
        }
    }

    /// What is held: the stream's last bytes, once it has ended (fewer if it was shorter).
    pub(crate) fn held(&self) -> &[u8] {
        &self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_bytes_are_held_and_the_rest_released_in_order() {
        let stream: Vec<u8> = (0..=255).collect();
        for piece in [1, 3, 7, 10, 64, 300] {
            let mut hold = HoldBack::new(10);
            let mut body = Vec::new();
            for chunk in stream.chunks(piece) {
                let (released, part) = hold.push(chunk);
                body.extend(released);
                body.extend_from_slice(part);
            }
            assert_eq!(body, stream[..246], "pieces of {piece}");
            assert_eq!(hold.held(), &stream[246..]);
        }
        let mut short = HoldBack::new(10);
        assert_eq!(short.push(b"abc"), (Vec::new(), &b""[..]));
        assert_eq!(short.held(), b"abc");
    }
}
