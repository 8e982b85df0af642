//! Rendezvous (highest random weight) hashing: which node of a set owns a digest. Every node
//! computes the same owner from the same set, and a node joining or leaving moves only the
//! digests it wins or held (about 1/N of them).

use crate::Digest;

/// The item of `items` that owns `digest`: the highest weight of (its id, the digest); ties (of
/// 64-bit weights) go to the smaller id. `None` when `items` is empty.
pub fn owner<'a, T>(items: &'a [T], id: impl Fn(&T) -> &str, digest: &Digest) -> Option<&'a T> {
    items.iter().max_by(|a, b| {
        let (ia, ib) = (id(a), id(b));
        weight(ia, digest).cmp(&weight(ib, digest)).then_with(|| ib.cmp(ia))
    })
}

/// The first 8 bytes, big-endian, of SHA-256(`id` 0x00 the digest's hex).
pub fn weight(id: &str, digest: &Digest) -> u64 {
    let mut key = Vec::with_capacity(id.len() + 1 + 64);
    key.extend_from_slice(id.as_bytes());
    key.push(0);
    key.extend_from_slice(digest.hex().as_bytes());
    u64::from_str_radix(&Digest::of(&key).hex()[..16], 16).expect("a digest's hex")
}
