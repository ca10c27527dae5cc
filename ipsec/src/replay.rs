//! Anti-replay window of an inbound SA, with extended (64-bit) sequence numbers.
//!
//! RFC 4303 section 3.4.3 and Appendix A: a bitmap of the last `size` sequence numbers below
//! and including the highest one authenticated so far ("the top"). Only the low 32 bits of a
//! sequence number travel in the ESP header; [`ReplayWindow::check`] infers the high 32 bits
//! from the window's position (Appendix A2.2), so a window straddling a 2^32 boundary works.
//!
//! The check is split from the update, as RFC 4303 requires: [`ReplayWindow::check`] runs
//! before the (expensive) integrity check and changes nothing; [`ReplayWindow::accept`] runs
//! only after the packet authenticated.
//!
//! The bitmap is a ring of `u64` words indexed by sequence number modulo its bit length
//! (RFC 6479), so sliding the window clears bits instead of shifting the whole bitmap.

use crate::EspDrop;

/// Smallest accepted window, in packets (RFC 4303 section 3.4.3: at least 32).
pub const MIN_WINDOW: u32 = 32;
/// Largest accepted window, in packets.
pub const MAX_WINDOW: u32 = 65536;

/// Anti-replay window of one inbound SA (RFC 4303 Appendix A, ESN case).
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Window size W in packets.
    size: u64,
    /// Highest sequence number accepted; 0 before the first packet.
    top: u64,
    /// Ring bitmap: bit `seq % (64 * bits.len())` is set when `seq` (inside the window) was
    /// accepted.
    bits: Vec<u64>,
}

impl ReplayWindow {
    /// A window of `size` packets, clamped to [`MIN_WINDOW`]..=[`MAX_WINDOW`]. Nothing has
    /// been received yet: every sequence number from 1 up is acceptable.
    pub fn new(size: u32) -> Self {
        let size = size.clamp(MIN_WINDOW, MAX_WINDOW);
        ReplayWindow {
            size: u64::from(size),
            top: 0,
            bits: vec![0; size.div_ceil(64) as usize],
        }
    }

    /// Window size in packets.
    pub fn size(&self) -> u32 {
        // `size` came from a u32 in `new`.
        self.size as u32
    }

    /// Highest sequence number accepted so far (0 if none).
    pub fn top(&self) -> u64 {
        self.top
    }

    /// Infers the full 64-bit sequence number of a packet carrying `seq_lo` and checks it
    /// against the window, without changing the window. Returns the inferred number, or
    /// [`EspDrop::Replay`] when it was already accepted, lies left of the window, is 0 (never
    /// sent: numbering starts at 1), or would need a high half beyond 2^32 - 1.
    ///
    /// The inferred number always lies in `[bottom, bottom + 2^32)` (RFC 4303 A2.2): a low
    /// half that is left of the window when the window sits inside one 2^32 subspace is read
    /// as belonging to the next subspace. Such a packet is then rejected by the ICV check
    /// (its AAD carries the wrong high half), not here: with 32 bits on the wire an old
    /// packet and one 2^32 ahead look the same. `Replay` for "left of the window" therefore
    /// only happens where the inference leaves no other reading (high half overflow).
    pub fn check(&self, seq_lo: u32) -> Result<u64, EspDrop> {
        let seq = self.infer(seq_lo).ok_or(EspDrop::Replay)?;
        if seq == 0 {
            return Err(EspDrop::Replay);
        }
        if seq > self.top {
            return Ok(seq);
        }
        if self.top - seq >= self.size {
            return Err(EspDrop::Replay);
        }
        let (word, bit) = self.slot(seq);
        if self.bits[word] & bit != 0 {
            return Err(EspDrop::Replay);
        }
        Ok(seq)
    }

    /// Records `seq` (a number [`check`](Self::check) returned, for a packet that then
    /// authenticated): slides the window forward if `seq` is beyond its top, and marks `seq`
    /// as seen. A number left of the window is ignored.
    pub fn accept(&mut self, seq: u64) {
        if seq > self.top {
            self.advance(seq);
        } else if self.top - seq >= self.size {
            return;
        }
        let (word, bit) = self.slot(seq);
        self.bits[word] |= bit;
    }

    /// Moves the top to `new_top` (> top), clearing the ring bits of every number passed
    /// over: they held numbers that are now out of the window.
    fn advance(&mut self, new_top: u64) {
        let ring = self.ring_bits();
        let diff = new_top - self.top;
        if diff >= ring {
            self.bits.fill(0);
        } else {
            let mut seq = self.top + 1;
            while seq <= new_top {
                let (word, bit) = self.slot(seq);
                if seq.is_multiple_of(64) && new_top - seq >= 63 {
                    self.bits[word] = 0;
                    seq += 64;
                } else {
                    self.bits[word] &= !bit;
                    seq += 1;
                }
            }
        }
        self.top = new_top;
    }

    fn ring_bits(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    fn slot(&self, seq: u64) -> (usize, u64) {
        let index = seq % self.ring_bits();
        ((index / 64) as usize, 1u64 << (index % 64))
    }

    /// RFC 4303 Appendix A2.2: the high half of the sequence number of a packet carrying
    /// `seq_lo`, relative to the window's top `Th:Tl` and size W. `None` when the high half
    /// would overflow 32 bits.
    fn infer(&self, seq_lo: u32) -> Option<u64> {
        let th = (self.top >> 32) as u32;
        let tl = self.top as u32;
        // W <= 65536 fits in u32.
        let w = self.size as u32;
        // Tl - W + 1, modulo 2^32: the low half of the window's bottom.
        let bottom = tl.wrapping_sub(w).wrapping_add(1);
        let seq_hi = if tl >= w - 1 {
            // Case A: the window lies within one 2^32 subspace. A number below the bottom
            // belongs to the next subspace.
            if seq_lo >= bottom {
                th
            } else {
                th.checked_add(1)?
            }
        } else if seq_lo >= bottom {
            // Case B: the window spans two subspaces, and `seq_lo` is in the upper part of
            // the previous one. Below subspace 0 there is none: with Th = 0 such a number
            // can only be a jump ahead within subspace 0.
            th.saturating_sub(1)
        } else {
            th
        };
        Some(u64::from(seq_hi) << 32 | u64::from(seq_lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u32 = 2048;

    fn accept_if_new(w: &mut ReplayWindow, seq: u64) -> bool {
        match w.check(seq as u32) {
            Ok(inferred) => {
                assert_eq!(inferred, seq, "inferred high half");
                w.accept(inferred);
                true
            }
            Err(e) => {
                assert_eq!(e, EspDrop::Replay);
                false
            }
        }
    }

    #[test]
    fn zero_is_never_accepted() {
        let w = ReplayWindow::new(W);
        assert_eq!(w.check(0), Err(EspDrop::Replay));
    }

    #[test]
    fn first_packets_and_duplicates() {
        let mut w = ReplayWindow::new(W);
        assert!(accept_if_new(&mut w, 1));
        assert!(!accept_if_new(&mut w, 1));
        assert!(accept_if_new(&mut w, 3));
        assert!(accept_if_new(&mut w, 2));
        assert!(!accept_if_new(&mut w, 2));
        assert_eq!(w.top(), 3);
    }

    #[test]
    fn left_edge_of_window() {
        let mut w = ReplayWindow::new(64);
        w.accept(1000);
        // The window holds 937..=1000.
        assert_eq!(w.check(937), Ok(937));
        // Left of the window: with only the low half on the wire this reads as the next 2^32
        // subspace (RFC 4303 A2.2), never as 936; the ICV check then fails.
        assert_eq!(w.check(936), Ok((1 << 32) + 936));
        w.accept(1001);
        assert_eq!(w.check(937), Ok((1 << 32) + 937));
        assert_eq!(w.check(938), Ok(938));
    }

    #[test]
    fn jump_far_ahead_clears_the_ring() {
        let mut w = ReplayWindow::new(64);
        for s in 1..=64 {
            w.accept(s);
        }
        // 128 is in the same ring slot as 64; it must not look seen.
        assert_eq!(w.check(128), Ok(128));
        w.accept(10_000);
        for s in 10_000 - 63..10_000 {
            assert_eq!(w.check(s as u32), Ok(s));
        }
    }

    #[test]
    fn fresh_window_accepts_a_jump_to_the_top_of_subspace_zero() {
        let w = ReplayWindow::new(W);
        assert_eq!(w.check(u32::MAX - 5), Ok(u64::from(u32::MAX - 5)));
    }

    #[test]
    fn infers_the_next_subspace() {
        let mut w = ReplayWindow::new(W);
        let top = (1u64 << 32) - 10;
        w.accept(top);
        // Low half 3 is below the window's bottom: it is 2^32 + 3.
        assert_eq!(w.check(3), Ok((1 << 32) + 3));
        w.accept((1 << 32) + 3);
        // Now the window spans two subspaces: 2^32 - 100 is still inside, and still new.
        assert_eq!(w.check(u32::MAX - 99), Ok((1 << 32) - 100));
        // Already seen.
        assert_eq!(w.check(u32::MAX - 9), Err(EspDrop::Replay));
        assert_eq!(w.check(3), Err(EspDrop::Replay));
        // Left of the window, in the previous subspace: read as the current subspace, far
        // ahead, never as 2^32 - 3001.
        assert_eq!(
            w.check(u32::MAX - 3000),
            Ok((1 << 32) + u64::from(u32::MAX - 3000))
        );
    }

    #[test]
    fn high_half_overflow_is_refused() {
        let mut w = ReplayWindow::new(W);
        w.accept(u64::MAX - 1);
        assert_eq!(w.check(u32::MAX), Ok(u64::MAX));
        assert_eq!(w.check(5), Err(EspDrop::Replay));
    }

    #[test]
    fn sizes_are_clamped_and_rounded_to_words() {
        assert_eq!(ReplayWindow::new(1).size(), MIN_WINDOW);
        assert_eq!(ReplayWindow::new(1 << 20).size(), MAX_WINDOW);
        let mut w = ReplayWindow::new(100);
        w.accept(1000);
        assert_eq!(w.check(901), Ok(901));
        assert_eq!(w.check(900), Ok((1 << 32) + 900));
    }

    /// Window sizes to test, including ones that are not multiples of 64.
    fn window() -> impl Strategy<Value = u32> {
        prop_oneof![Just(32u32), Just(64), Just(100), Just(2048), 32u32..4096]
    }

    proptest! {
        /// Any order, with duplicates, of numbers that all fit in one window: each is accepted
        /// exactly once.
        #[test]
        fn permutation_within_window_accepts_each_once(
            size in window(),
            base in prop_oneof![Just(0u64), Just((1u64 << 32) - 300), 0u64..(1 << 40)],
            picks in prop::collection::vec(any::<prop::sample::Index>(), 1..300),
            order in any::<prop::sample::Index>(),
        ) {
            let size_u = u64::from(size);
            let nums: Vec<u64> = picks.iter().map(|i| base + 1 + i.index(size as usize) as u64).collect();
            // Interleave a second copy of every number at a shuffled position.
            let mut stream = nums.clone();
            let mut dup = nums.clone();
            let k = order.index(dup.len());
            dup.rotate_left(k);
            stream.extend(dup);
            let mut w = ReplayWindow::new(size);
            w.accept(base);
            let mut accepted = std::collections::BTreeSet::new();
            for &s in &stream {
                let fresh = !accepted.contains(&s);
                let ok = accept_if_new(&mut w, s);
                prop_assert_eq!(ok, fresh, "seq {} fresh {}", s, fresh);
                accepted.insert(s);
                prop_assert!(w.top() - s < size_u);
            }
            let distinct: std::collections::BTreeSet<u64> = nums.into_iter().collect();
            prop_assert_eq!(accepted, distinct);
        }

        /// After the top reaches T, nothing at or below T - W is accepted, whether seen or not.
        #[test]
        fn nothing_left_of_window(
            size in window(),
            top in prop_oneof![(1u64 << 32) - 5000..(1u64 << 32) + 5000, 5000u64..(1 << 48)],
            back in 0u64..100_000,
        ) {
            let mut w = ReplayWindow::new(size);
            w.accept(top);
            let s = top.saturating_sub(u64::from(size)).saturating_sub(back);
            prop_assert_eq!(w.check(s as u32).ok().filter(|&v| v == s), None);
        }

        /// A stream that crosses 2^32 in order, with reordering inside the window and
        /// replays: the high half is always inferred right.
        #[test]
        fn crossing_the_2_32_boundary(
            size in window(),
            start_back in 1u64..3000,
            steps in prop::collection::vec(1u64..40, 1..400),
            jitter in prop::collection::vec(0u64..31, 1..400),
        ) {
            let mut w = ReplayWindow::new(size);
            let mut next = (1u64 << 32) - start_back;
            w.accept(next);
            for (i, step) in steps.iter().enumerate() {
                next += step;
                // A late packet inside the window (maybe already seen), then the new one.
                let late = next.saturating_sub(jitter[i % jitter.len()]);
                let before = w.check(late as u32);
                if let Ok(v) = before {
                    prop_assert_eq!(v, late);
                    w.accept(v);
                    prop_assert_eq!(w.check(late as u32), Err(EspDrop::Replay));
                }
                if late != next {
                    prop_assert_eq!(w.check(next as u32), Ok(next));
                    w.accept(next);
                }
                prop_assert_eq!(w.check(next as u32), Err(EspDrop::Replay));
            }
        }
    }
}
