//! One batching rule for every backend: writes split into consecutive batches bounded by the
//! backend's limits, in order, and a write too large for any batch refused before anything is
//! sent.

use crate::desired::SpecError;

/// One write a backend batches: its size as the backend counts it, and a name for errors.
pub(super) trait Write {
    /// The bytes it adds to a request.
    fn bytes(&self) -> usize;

    /// The key (or id) it writes, to name it when it is too large.
    fn key(&self) -> String;

    /// Whether it deletes (for the counts of a report).
    fn deletes(&self) -> bool;
}

/// A backend's bounds on one write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Limits {
    /// The most writes in one request (at least one is always allowed).
    pub(super) ops: usize,
    /// The most bytes of writes in one request; a write larger than this goes alone.
    pub(super) bytes: usize,
    /// The most bytes of one write: a larger one is refused as [`SpecError::TooLarge`], `None`
    /// when the registry itself is left to judge a write that goes alone.
    pub(super) op_bytes: Option<usize>,
}

/// Splits `ops` into consecutive batches of at most `limits.ops` writes and `limits.bytes`
/// bytes (a write larger than that alone is a batch of its own), keeping their order.
///
/// # Errors
/// [`SpecError::TooLarge`] naming the first write over `limits.op_bytes`, before any batch.
pub(super) fn batches<W: Write>(ops: &[W], limits: Limits) -> Result<Vec<&[W]>, SpecError> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, op) in ops.iter().enumerate() {
        let size = op.bytes();
        if limits.op_bytes.is_some_and(|max| size > max) {
            return Err(SpecError::TooLarge {
                key: op.key(),
                bytes: size,
            });
        }
        let full = i - start >= limits.ops.max(1) || (i > start && bytes + size > limits.bytes);
        if full {
            out.push(&ops[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < ops.len() {
        out.push(&ops[start..]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Put(&'static str, usize);

    impl Write for Put {
        fn bytes(&self) -> usize {
            self.1
        }
        fn key(&self) -> String {
            self.0.to_owned()
        }
        fn deletes(&self) -> bool {
            false
        }
    }

    fn limits(ops: usize, bytes: usize, op_bytes: Option<usize>) -> Limits {
        Limits {
            ops,
            bytes,
            op_bytes,
        }
    }

    fn sizes(batches: Vec<&[Put]>) -> Vec<usize> {
        batches.iter().map(|b| b.len()).collect()
    }

    #[test]
    fn batches_are_bounded_by_ops_and_by_bytes_in_order() {
        let ops: Vec<Put> = (0..5).map(|_| Put("k", 400)).collect();
        assert_eq!(
            sizes(batches(&ops, limits(2, 10_000, None)).unwrap()),
            [2, 2, 1]
        );
        assert_eq!(
            sizes(batches(&ops, limits(128, 1000, None)).unwrap()),
            [2, 2, 1]
        );
        assert!(
            batches::<Put>(&[], limits(128, 1000, None))
                .unwrap()
                .is_empty()
        );
        let flat: Vec<&Put> = batches(&ops, limits(2, 1000, None))
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(flat, ops.iter().collect::<Vec<_>>());
    }

    #[test]
    fn an_oversized_write_goes_alone_unless_the_backend_bounds_one_write() {
        let big = [Put("a", 10), Put("b", 5000), Put("c", 10)];
        assert_eq!(
            sizes(batches(&big, limits(128, 1000, None)).unwrap()),
            [1, 1, 1]
        );
        let refused = batches(&big, limits(128, 1000, Some(1000))).unwrap_err();
        assert!(
            matches!(&refused, SpecError::TooLarge { key, bytes: 5000 } if key == "b"),
            "{refused}"
        );
    }
}
