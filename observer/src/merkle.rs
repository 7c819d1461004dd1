//! The cost of a hash-based (Merkle-tree) module check, estimated from a measured signature
//! check of the same module. Such a check still hashes the whole module (the measured `digest`
//! phase) and then one 64-byte node (two SHA-256 children) per tree level up to the root built
//! into the kernel. SHA-256 works in 64-byte blocks, so a node (two blocks with padding) costs
//! what two blocks of the module cost in that same digest.

/// Tree height for `leaves` modules: ceil(log2(leaves)).
pub fn levels(leaves: u64) -> u32 {
    if leaves <= 1 {
        0
    } else {
        64 - (leaves - 1).leading_zeros()
    }
}

/// What hashing one tree node costs, from a digest of `hashed_bytes` that took `digest_ns`.
pub fn per_node_ns(digest_ns: u64, hashed_bytes: u64) -> Option<f64> {
    let blocks = hashed_bytes.div_ceil(64);
    (blocks > 0).then(|| 2.0 * digest_ns as f64 / blocks as f64)
}

/// The estimated check: the module's digest plus one node hash per level.
pub fn estimate_ns(digest_ns: f64, per_node_ns: f64, levels: u32) -> f64 {
    digest_ns + f64::from(levels) * per_node_ns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_the_tree_height() {
        assert_eq!(levels(1), 0);
        assert_eq!(levels(2), 1);
        assert_eq!(levels(4096), 12);
        assert_eq!(levels(4256), 13);
    }

    #[test]
    fn digest_plus_node_hashes() {
        // 6400 bytes: 100 blocks of 64; digest 1000 ns: 10 ns a block, 20 ns a node.
        let node = per_node_ns(1000, 6400).unwrap();
        assert_eq!(node, 20.0);
        assert_eq!(estimate_ns(1000.0, node, 13), 1260.0);
        assert_eq!(per_node_ns(1000, 0), None);
    }
}
