//! Which samples each batch of an epoch holds: a permutation seeded by `(seed, epoch)` (or
//! the order a user's sampler gave), the shard of it that belongs to `(rank, world)`, cut into
//! batches.
use std::sync::Arc;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// Mixes integers into one well-spread seed (SplitMix64's finaliser), so that neighbouring
/// epochs or samples get unrelated random streams.
pub(crate) fn mix(parts: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// How the ranks share an epoch whose samples do not divide evenly among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Shards {
    /// Every `world`-th sample of the order from `rank` on: disjoint, together the epoch, and
    /// one sample apart in length at most. The ranks' batches at a step together make one
    /// process's batch of `world × batch_size` (`cifar-train`'s data-parallel runs).
    #[default]
    Strided,
    /// torch's `DistributedSampler`: the order padded to a multiple of `world` by repeating
    /// its first samples (or, with `drop_last`, cut to one), then every `world`-th sample from
    /// `rank` on, so that every rank has the same number of samples, and of batches.
    Even,
}

/// The order of an epoch, a function of its settings only.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Samples in the dataset.
    pub len: usize,
    /// Samples per batch.
    pub batch_size: usize,
    /// Permute each epoch (else index order).
    pub shuffle: bool,
    /// The base seed.
    pub seed: u64,
    /// Drop the last batch of a shard when it is short.
    pub drop_last: bool,
    /// This process's shard.
    pub rank: usize,
    /// Number of shards.
    pub world: usize,
    /// How an epoch that does not divide evenly is shared.
    pub shards: Shards,
    /// Every epoch's order, given (by a user's sampler) instead of drawn: `shuffle`, `rank`
    /// and `world` then play no part in it.
    pub order: Option<Arc<[usize]>>,
}

impl Sampler {
    /// `DataLoader(shuffle=True)`'s order: each epoch a new permutation of all `len` samples,
    /// one shard, the last short batch kept.
    pub fn shuffled(len: usize, batch_size: usize, seed: u64) -> Self {
        Sampler {
            len,
            batch_size,
            shuffle: true,
            seed,
            drop_last: false,
            rank: 0,
            world: 1,
            shards: Shards::Strided,
            order: None,
        }
    }

    /// This shard's sample indices for `epoch`, in order (see [`Shards`]).
    pub fn indices(&self, epoch: u64) -> Vec<usize> {
        if let Some(order) = &self.order {
            return order.to_vec();
        }
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(&[self.seed, epoch])));
        }
        if self.world == 1 {
            return order;
        }
        if self.shards == Shards::Even {
            let total = self.even_total();
            order.truncate(total);
            // DistributedSampler's padding: the order's first samples again, as often as needed.
            while order.len() < total {
                let more = (total - order.len()).min(self.len);
                order.extend_from_within(..more);
            }
        }
        order.into_iter().skip(self.rank).step_by(self.world).collect()
    }

    /// The samples all ranks take together under [`Shards::Even`].
    fn even_total(&self) -> usize {
        if self.drop_last {
            self.len / self.world * self.world
        } else {
            self.len.div_ceil(self.world) * self.world
        }
    }

    /// Samples in each epoch of this shard.
    pub fn samples_per_epoch(&self) -> usize {
        match (&self.order, self.shards) {
            (Some(order), _) => order.len(),
            (None, _) if self.world == 1 => self.len,
            (None, Shards::Strided) => self.len / self.world + usize::from(self.rank < self.len % self.world),
            (None, Shards::Even) => self.even_total() / self.world,
        }
    }

    /// Batches in each epoch of this shard.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.samples_per_epoch();
        if self.drop_last { n / self.batch_size } else { n.div_ceil(self.batch_size) }
    }

    /// `epoch`'s batches, each a list of sample indices.
    pub fn batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let idx = self.indices(epoch);
        let mut out: Vec<Vec<usize>> = idx.chunks(self.batch_size).map(<[usize]>::to_vec).collect();
        if self.drop_last && out.last().is_some_and(|b| b.len() < self.batch_size) {
            out.pop();
        }
        debug_assert_eq!(out.len(), self.batches_per_epoch());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(len: usize, rank: usize, world: usize, drop_last: bool) -> Sampler {
        Sampler { rank, world, drop_last, ..Sampler::shuffled(len, 4, 3) }
    }

    #[test]
    fn an_epoch_is_a_permutation_that_depends_on_seed_and_epoch() {
        let s = sampler(10, 0, 1, false);
        let mut e0 = s.indices(0);
        assert_ne!(e0, s.indices(1));
        assert_eq!(e0, s.indices(0));
        e0.sort();
        assert_eq!(e0, (0..10).collect::<Vec<_>>());
        assert_eq!(s.batches(0).iter().map(Vec::len).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(sampler(10, 0, 1, true).batches(0).len(), 2);
    }

    #[test]
    fn the_order_is_pinned() {
        // A fixture recorded from the first run: a change of RNG or mixing would silently change
        // every resumed run's order, so it must be deliberate.
        assert_eq!(sampler(8, 0, 1, false).indices(0), [0, 7, 5, 3, 6, 2, 1, 4]);
    }

    #[test]
    fn shard_lengths_match_batches_per_epoch() {
        for world in 1..5 {
            for rank in 0..world {
                for shards in [Shards::Strided, Shards::Even] {
                    for drop_last in [false, true] {
                        let s = Sampler { shards, ..sampler(11, rank, world, drop_last) };
                        assert_eq!(s.batches(2).len(), s.batches_per_epoch());
                        assert_eq!(s.indices(2).len(), s.samples_per_epoch());
                    }
                }
            }
        }
    }

    #[test]
    fn even_shards_pad_or_cut_as_distributed_sampler_does() {
        // 11 samples on 4 ranks: padded with the order's first sample to 12, 3 a rank; with
        // drop_last cut to 8, 2 a rank. On 30 ranks (more than samples) the order repeats.
        for (world, drop_last, each) in [(4, false, 3), (4, true, 2), (30, false, 1)] {
            let shards: Vec<Vec<usize>> = (0..world)
                .map(|rank| {
                    Sampler { shards: Shards::Even, ..sampler(11, rank, world, drop_last) }.indices(5)
                })
                .collect();
            assert!(shards.iter().all(|s| s.len() == each), "{world} {drop_last}");
            let order = sampler(11, 0, 1, false).indices(5);
            let mut flat = vec![0; world * each];
            for (rank, s) in shards.iter().enumerate() {
                for (k, &i) in s.iter().enumerate() {
                    flat[k * world + rank] = i;
                }
            }
            let want: Vec<usize> = order.iter().cycle().take(world * each).copied().collect();
            assert_eq!(flat, want);
        }
    }
}
