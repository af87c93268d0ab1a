//! Packet loads and stores at any alignment, one instruction each. Frames give no alignment guarantee
//! (an IPv4 address sits at offset 26 of the frame), so `read_unaligned` compiles to a load
//! per byte with shifts and ors to join them: IPv6's two addresses alone took 32 loads and
//! 56 ALU instructions. The verifier accepts a misaligned access to *packet* memory where
//! the CPU has efficient unaligned access (x86-64, arm64, s390x, ppc64); it refuses one
//! from the stack, which is why LLVM's `allows-misaligned-mem-access` (every access,
//! stack included) is not used instead.
//!
//! The offset is a constant of the instruction, so `base + OFF` costs no register.
//! Loads are `pure, readonly`: the compiler may merge or drop one like any other read, but
//! never moves one across a helper call or a store (stores are plain `asm!`, which may
//! touch any memory as far as the compiler knows).
use core::arch::asm;

/// One load of a `$ty` from `base + OFF` (`$bpf`: its size as BPF assembly names it).
macro_rules! load_at {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $bpf:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name<const OFF: i16>(base: *const u8) -> $ty {
            let v: u64;
            // SAFETY: the caller's bounds check; a packet load has no other effect.
            unsafe {
                asm!(concat!("{v} = *(", $bpf, " *)({p} + {off})"), p = in(reg) base, off = const OFF,
                     v = lateout(reg) v, options(pure, readonly, nostack, preserves_flags));
            }
            v as $ty
        }
    };
}

load_at!(
    /// The 2 bytes at `base + OFF`, as they are in the frame (network order stays).
    ///
    /// # Safety
    /// `base + OFF .. base + OFF + 2` is packet data the verifier has seen checked.
    u16_at, u16, "u16"
);
load_at!(
    /// The 4 bytes at `base + OFF`, as they are in the frame.
    ///
    /// # Safety
    /// As [`u16_at`], for 4 bytes.
    u32_at, u32, "u32"
);

/// The 16 bytes at `base + OFF` as four words (an IPv6 address, `Ipv6Words`).
///
/// # Safety
/// As [`u16_at`], for 16 bytes.
#[inline(always)]
pub unsafe fn words_at<const OFF: i16>(base: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: the caller's bounds check covers the 16 bytes; packet loads have no other
    // effect.
    unsafe {
        asm!("{a} = *(u32 *)({p} + {o0})",
             "{b} = *(u32 *)({p} + {o1})",
             "{c} = *(u32 *)({p} + {o2})",
             "{d} = *(u32 *)({p} + {o3})",
             p = in(reg) base, o0 = const OFF, o1 = const OFF + 4, o2 = const OFF + 8, o3 = const OFF + 12,
             a = out(reg) a, b = out(reg) b, c = out(reg) c, d = out(reg) d,
             options(pure, readonly, nostack, preserves_flags));
    }
    [a as u32, b as u32, c as u32, d as u32]
}

/// One store of a `$ty` at `base + OFF`.
macro_rules! store_at {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $bpf:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name<const OFF: i16>(base: *mut u8, v: $ty) {
            // SAFETY: the caller's bounds check; the store writes those bytes only.
            unsafe {
                asm!(concat!("*(", $bpf, " *)({p} + {off}) = {v}"), p = in(reg) base, off = const OFF,
                     v = in(reg) v as u64, options(nostack, preserves_flags));
            }
        }
    };
}

store_at!(
    /// Store the 2 bytes `v` (as they go in the frame) at `base + OFF`.
    ///
    /// # Safety
    /// `base + OFF .. base + OFF + 2` is writable packet data the verifier has seen checked.
    set_u16, u16, "u16"
);
store_at!(
    /// Store the 4 bytes `v` at `base + OFF`.
    ///
    /// # Safety
    /// As [`set_u16`], for 4 bytes.
    set_u32, u32, "u32"
);

/// Store four words (an IPv6 address) at `base + OFF`.
///
/// # Safety
/// As [`set_u16`], for 16 bytes.
#[inline(always)]
pub unsafe fn set_words<const OFF: i16>(base: *mut u8, w: [u32; 4]) {
    // SAFETY: the caller's bounds check covers the 16 bytes; the stores write them only.
    unsafe {
        asm!("*(u32 *)({p} + {o0}) = {a}",
             "*(u32 *)({p} + {o1}) = {b}",
             "*(u32 *)({p} + {o2}) = {c}",
             "*(u32 *)({p} + {o3}) = {d}",
             p = in(reg) base, o0 = const OFF, o1 = const OFF + 4, o2 = const OFF + 8, o3 = const OFF + 12,
             a = in(reg) w[0] as u64, b = in(reg) w[1] as u64, c = in(reg) w[2] as u64, d = in(reg) w[3] as u64,
             options(nostack, preserves_flags));
    }
}

/// `v`, with nothing the compiler can know about it (it passes through an `asm!` move to
/// itself), so that no bounds check is optimised away on the strength of where `v` came
/// from.
#[inline(always)]
pub fn opaque(mut v: usize) -> usize {
    // SAFETY: a register moved to itself: no memory access.
    unsafe { asm!("{0} = {0}", inout(reg) v, options(pure, nomem, nostack, preserves_flags)) };
    v
}
