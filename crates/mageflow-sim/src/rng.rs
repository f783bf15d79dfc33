//! The simulator's only source of randomness: SplitMix64, seeded from the run's seed. It is tiny,
//! fast, has no state beyond one `u64`, and is the same on every platform, so a seed means the
//! same thing everywhere. Independent streams (the plan, each append, each report) are derived
//! by hashing the seed with a stream name and an index, so that how many draws one component
//! makes never shifts the draws of another: the k-th append of a run gets the same fault
//! whatever the workers did before it.

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state advanced by a Weyl constant and mixed.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a stream name: a stable 64-bit tag (std's hashers are randomly keyed per process).
fn tag(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The `index`-th independent stream called `name` of `seed`.
    pub fn stream(seed: u64, name: &str, index: u64) -> Self {
        Self::new(mix(seed ^ mix(tag(name) ^ mix(index.wrapping_add(GOLDEN)))))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in `0..n` (`n` > 0; 0 gives 0). Multiply-shift: no modulo bias worth the name
    /// at the small ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// True with probability `permille` / 1000.
    pub fn chance(&mut self, permille: u32) -> bool {
        self.below(1000) < u64::from(permille)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn streams_are_stable_and_independent() {
        let a: Vec<u64> = (0..4)
            .map(|_| Rng::stream(7, "append", 3).next_u64())
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::stream(7, "append", 3).next_u64(),
            Rng::stream(7, "append", 4).next_u64()
        );
        assert_ne!(
            Rng::stream(7, "append", 3).next_u64(),
            Rng::stream(7, "report", 3).next_u64()
        );
        // Pinned: a seed must mean the same run on every machine and build.
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
        assert!((0..1000).all(|_| (3..=5).contains(&r.range(3, 5))));
    }
}
