//! A small deterministic generator (SplitMix64) for sampling and synthetic weights: the same
//! seed always gives the same stream, on every platform.

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` token ids in `0..n_vocab`: the fixed pseudo-random prompt benchmarks use (llama-bench
    /// also times random tokens), the same for every engine given the same seed.
    pub fn tokens(&mut self, n: usize, n_vocab: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % n_vocab.max(1) as u64) as u32).collect()
    }

    /// Approximately normal with mean 0 and standard deviation `std` (sum of four uniforms).
    pub fn next_normal(&mut self, std: f32) -> f32 {
        let s: f64 = (0..4).map(|_| self.next_f64()).sum::<f64>() - 2.0;
        (s * (3.0f64).sqrt()) as f32 * std
    }
}
