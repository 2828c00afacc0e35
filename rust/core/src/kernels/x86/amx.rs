//! AMX-INT8 ternary × int8 kernel (`gemm_tq2_0_i8_amx`) for prefill and batched decode.
//!
//! `tdpbssd` multiplies a 16 × 64 int8 tile by a 64 × 16 int8 tile into 16 × 16 int32
//! accumulators: 16 384 multiply-adds per instruction (≈1 000 per cycle on Sapphire Rapids, vs
//! ≈64 for the `avx512_vnni` kernel). Ternary weights are unpacked to int8 trits (`code − 1`, so
//! no `Σx` correction is needed) just before use, 32 rows at a time into an L1-resident buffer;
//! each unpacked block then meets every activation row of the call.
//!
//! * **A** (weights, `tmm4`, `tmm5`): 16 weight rows × 64 trits each, row stride `cols`. Unpacking
//!   is 4 × (shift, mask, subtract) per 64 packed bytes, which leaves each 64-byte group in *bit
//!   plane* order (`x[32k..32k+32]` then `x[128+32k..128+32k+32]` for plane `k` of a 256-block,
//!   as in the `avx512_vnni` kernel); [`prepare`] permutes the activations the same way.
//! * **B** (activations, `tmm6`, `tmm7`): `tdpbssd` reads B in the "VNNI" layout, row `kk` holding
//!   4 consecutive values for each of 16 activation rows: `B[kk][4j + q] = x[j][4kk + q]`.
//!   [`prepare`] writes every 64-column chunk of every 16-row activation tile that way (1 KiB
//!   each), padding the activation rows with zeros to an even number of tiles.
//! * **C** (`tmm0..tmm3`): a 2 × 2 block of 16 × 16 accumulators (32 weight rows × 32 activation
//!   rows), so each A and B load serves two `tdpbssd`. Results go through a 1 KiB buffer into
//!   `out[r·n + i]`, the layout every kernel writes.
//!
//! Fewer than [`MIN_ACTS`] activation rows (decode) take the `avx512_vnni` kernel: a tile of 16
//! activation rows would be mostly padding. So `amx` is `avx512_vnni` plus this path.
//!
//! The tile state (8 KiB per thread) must be granted by Linux once per process
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`); [`available`] asks once and, when
//! the CPU, the OS (XCR0) or the kernel says no, the `amx` kernel is simply unavailable and the
//! default falls back to `avx512_vnni`. Every call loads its tile configuration and releases the
//! tiles at the end, so no AMX state outlives a call. The AMX intrinsics and
//! `is_x86_feature_detected!("amx-int8")` are unstable in Rust 1.95: detection uses `cpuid` and
//! `xgetbv`, the instructions inline `asm!`.
//!
//! Overflow: each product is at most `2 · 128` in magnitude (code 3 decodes to trit 2, as in the
//! scalar oracle), so an int32 accumulator holds any row below 8 million columns; `tdpbssd` does
//! not saturate (it wraps, like the scalar oracle's i32 arithmetic would).

use super::super::{PreparedActs, TernaryView};
use crate::ternary::QK_K;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Activation rows from which a call uses the tiles (below: the `avx512_vnni` kernel).
pub const MIN_ACTS: usize = 16;

/// Weight rows per unpacked block (two A tiles).
const ROWS: usize = 32;

/// Columns per tile step (the K of one `tdpbssd`: 64 int8).
const KSTEP: usize = 64;

/// Whether this process can run AMX-INT8: the CPU has AMX-TILE and AMX-INT8, the OS enabled
/// the tile state in XCR0, and Linux granted this process the tile data permission. Asked once.
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_has_amx_int8() && request_tile_permission())
}

fn cpu_has_amx_int8() -> bool {
    // AVX-512 (F, BW, VNNI) and GFNI too: fewer than MIN_ACTS rows run `avx512_vnni::rows_gfni`.
    if !(is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("gfni")
        && is_x86_feature_detected!("xsave"))
    {
        return false;
    }
    if __cpuid(0).eax < 7 {
        return false;
    }
    let l7 = __cpuid_count(7, 0);
    let (tile, int8) = (l7.edx >> 24 & 1 == 1, l7.edx >> 25 & 1 == 1);
    // OSXSAVE (CPUID.1:ECX bit 27) makes `xgetbv` legal; XCR0 bits 17 (XTILECFG) and 18
    // (XTILEDATA) say the OS saves the tile state.
    if !(tile && int8 && __cpuid(1).ecx >> 27 & 1 == 1) {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: `xgetbv` with ECX = 0 reads XCR0; legal because CPUID reported OSXSAVE above. It
    // touches no memory.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack));
    }
    lo >> 17 & 3 == 3
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux ≥ 5.16 refuses AMX instructions
/// (SIGILL) to processes that did not ask. Returns whether it was granted.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: a raw `arch_prctl` system call with two integer arguments; it reads and writes no
    // memory of ours. `syscall` clobbers rcx and r11, declared below.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The palette-1 tile configuration: all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    const fn all_16x64() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // colsb (u16, little-endian)
            c[48 + t] = 16; // rows
            t += 1;
        }
        Self(c)
    }
}

static CONFIG: TileConfig = TileConfig::all_16x64();

/// Activation tiles (of 16 rows) that [`prepare`] lays out for `n` rows: an even number.
fn act_tiles(n: usize) -> usize {
    n.div_ceil(2 * 16) * 2
}

/// For `n ≥ MIN_ACTS`: the activations in B-tile layout (see the module docs), tile-major then
/// chunk-major, zero-padded to [`act_tiles`] tiles. Otherwise the `avx512_vnni` preparation.
pub fn prepare(acts: &mut PreparedActs) {
    if acts.n < MIN_ACTS {
        return super::avx512_vnni::prepare(acts);
    }
    let (n, cols) = (acts.n, acts.cols);
    let chunks = cols / KSTEP;
    // In 4-byte groups, B[kk][j] = xp[j][kk]: a 16 × 16 transpose of groups per chunk and tile,
    // where xp is the row in plane order (chunk 4·blk + k of 256-block blk is x[32k..32k+32]
    // then x[128+32k..128+32k+32]).
    let mut b = vec![0i8; act_tiles(n) * chunks * 1024];
    let mut xp = vec![0i8; cols];
    for (i, row) in acts.x.chunks_exact(cols).enumerate() {
        let (t, j) = (i / 16, i % 16);
        for (src, dst) in row.chunks_exact(QK_K).zip(xp.chunks_exact_mut(QK_K)) {
            for k in 0..4 {
                dst[64 * k..64 * k + 32].copy_from_slice(&src[32 * k..32 * k + 32]);
                dst[64 * k + 32..64 * k + 64].copy_from_slice(&src[128 + 32 * k..160 + 32 * k]);
            }
        }
        for (ch, chunk) in xp.chunks_exact(KSTEP).enumerate() {
            let tile = &mut b[(t * chunks + ch) * 1024..(t * chunks + ch + 1) * 1024];
            for (kk, g) in chunk.chunks_exact(4).enumerate() {
                tile[kk * 64 + 4 * j..kk * 64 + 4 * j + 4].copy_from_slice(g);
            }
        }
    }
    acts.sums = Vec::new();
    acts.extra = b;
}

thread_local! {
    /// Per-thread unpacked weights: [`ROWS`] rows × `cols` trits.
    static WBUF: std::cell::RefCell<Vec<i8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The kernel (AMX for `n ≥ MIN_ACTS`, else `avx512_vnni`'s GFNI variant).
///
/// # Safety
/// [`available`] must have returned true (CPU features and tile permission); `acts` must have
/// been prepared by [`prepare`] for `w.cols` columns; rows `r0 .. r0 + out.len()/n` exist.
pub unsafe fn rows(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    if acts.n < MIN_ACTS {
        // SAFETY: `available` implies the features of `rows_gfni`; `prepare` delegated too.
        return unsafe { super::avx512_vnni::rows_gfni(w, r0, acts, out) };
    }
    // SAFETY: forwarded contract; AVX-512 BW is implied by `available`.
    unsafe { rows_tiles(w, r0, acts, out) }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rows_tiles(w: &TernaryView, r0: usize, acts: &PreparedActs, out: &mut [i32]) {
    let (n, cols) = (acts.n, w.cols);
    let nrows = out.len() / n;
    let chunks = cols / KSTEP;
    let tiles = act_tiles(n);
    assert!(w.qs.len() == w.rows * (cols / 4) && cols.is_multiple_of(QK_K));
    assert!(r0 + nrows <= w.rows && acts.cols == cols && out.len() == nrows * n);
    assert!(acts.extra.len() == tiles * chunks * 1024);
    WBUF.with(|buf| {
        let mut wb = buf.borrow_mut();
        if wb.len() < ROWS * cols {
            wb.resize(ROWS * cols, 0);
        }
        let wp = wb.as_mut_ptr();
        let bp = acts.extra.as_ptr();
        let mut cbuf = [0i32; 4 * 256];
        // SAFETY: `available` was checked by the caller, so the tile instructions are legal and
        // permitted; CONFIG is a valid palette-1 configuration (8 tiles of 16 × 64 bytes).
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
        let mut r = 0;
        while r < nrows {
            let rr = ROWS.min(nrows - r);
            // SAFETY: rows r0+r .. r0+r+rr exist (asserted above); wb holds ROWS × cols.
            unsafe { unpack(w, r0 + r, rr, wp) };
            for t in (0..tiles).step_by(2) {
                let b0 = bp.wrapping_add(t * chunks * 1024);
                let b1 = bp.wrapping_add((t + 1) * chunks * 1024);
                // SAFETY: tile instructions are permitted (see above). A loads read 16 rows ×
                // 64 bytes at stride `cols` from rows 0..16 and 16..32 of `wb` (ROWS × cols
                // bytes); B loads read 1 KiB chunks of tiles t and t+1 < `tiles` of `extra`
                // (asserted length). No Rust-visible register or memory is written.
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                    // The second activation tile is padding only (an odd number of tiles, e.g. a
                    // batch of 16): half the work, C tiles 0 and 2 (1 and 3 stay zero, unused).
                    let pad = 16 * (t + 1) >= n;
                    for ch in (0..chunks).filter(|_| pad) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]",
                            "tileloadd tmm5, [{a1} + {s}*1]",
                            "tileloadd tmm6, [{b0} + {s64}*1]",
                            "tdpbssd tmm0, tmm4, tmm6",
                            "tdpbssd tmm2, tmm5, tmm6",
                            a0 = in(reg) wp.add(ch * KSTEP),
                            a1 = in(reg) wp.add(16 * cols + ch * KSTEP),
                            b0 = in(reg) b0.add(ch * 1024),
                            s = in(reg) cols,
                            s64 = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                    for ch in (0..chunks).filter(|_| !pad) {
                        asm!(
                            "tileloadd tmm4, [{a0} + {s}*1]",
                            "tileloadd tmm5, [{a1} + {s}*1]",
                            "tileloadd tmm6, [{b0} + {s64}*1]",
                            "tileloadd tmm7, [{b1} + {s64}*1]",
                            "tdpbssd tmm0, tmm4, tmm6",
                            "tdpbssd tmm1, tmm4, tmm7",
                            "tdpbssd tmm2, tmm5, tmm6",
                            "tdpbssd tmm3, tmm5, tmm7",
                            a0 = in(reg) wp.add(ch * KSTEP),
                            a1 = in(reg) wp.add(16 * cols + ch * KSTEP),
                            b0 = in(reg) b0.add(ch * 1024),
                            b1 = in(reg) b1.add(ch * 1024),
                            s = in(reg) cols,
                            s64 = in(reg) 64usize,
                            options(nostack, readonly),
                        );
                    }
                    let c = cbuf.as_mut_ptr();
                    asm!(
                        "tilestored [{c0} + {s}*1], tmm0",
                        "tilestored [{c1} + {s}*1], tmm1",
                        "tilestored [{c2} + {s}*1], tmm2",
                        "tilestored [{c3} + {s}*1], tmm3",
                        c0 = in(reg) c,
                        c1 = in(reg) c.add(256),
                        c2 = in(reg) c.add(512),
                        c3 = in(reg) c.add(768),
                        s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                // cbuf[q·256 + dr·16 + j]: weight row r + 16·(q / 2) + dr, activation row
                // 16·(t + q % 2) + j.
                for q in 0..4 {
                    let i0 = 16 * (t + q % 2);
                    if i0 >= n {
                        continue;
                    }
                    let ni = 16.min(n - i0);
                    for dr in 0..16 {
                        let row = r + 16 * (q / 2) + dr;
                        if row >= r + rr {
                            break;
                        }
                        let src = &cbuf[q * 256 + dr * 16..q * 256 + dr * 16 + ni];
                        out[row * n + i0..row * n + i0 + ni].copy_from_slice(src);
                    }
                }
            }
            r += rr;
        }
        // SAFETY: releases the tile state loaded above (no memory access).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// Unpack weight rows `r .. r + rr` of `w` into `dst` (row stride `w.cols`) as int8 trits in
/// bit-plane order: per 64 packed bytes, plane `k` is `((byte >> 2k) & 3) − 1`.
///
/// # Safety
/// AVX-512 F/BW present; rows `r .. r + rr` exist in `w`; `dst` holds `rr × w.cols` bytes.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack(w: &TernaryView, r: usize, rr: usize, dst: *mut i8) {
    let rb = w.cols / 4;
    let three = _mm512_set1_epi8(3);
    let one = _mm512_set1_epi8(1);
    for dr in 0..rr {
        let src = w.row(r + dr);
        for (b, blk) in src.chunks_exact(64).enumerate() {
            // SAFETY: `blk` is 64 bytes; the four 64-byte stores land in row dr of `dst`, at
            // 256·b + 64k < cols (b < cols / 256).
            unsafe {
                let v = _mm512_loadu_si512(blk.as_ptr() as *const _);
                let d = dst.add(dr * w.cols + 256 * b);
                // A 16-bit shift moves bits of the neighbouring byte only above bit 1, which the
                // mask clears.
                let p0 = _mm512_sub_epi8(_mm512_and_si512(v, three), one);
                let p1 = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<2>(v), three), one);
                let p2 = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<4>(v), three), one);
                let p3 = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16::<6>(v), three), one);
                _mm512_storeu_si512(d as *mut _, p0);
                _mm512_storeu_si512(d.add(64) as *mut _, p1);
                _mm512_storeu_si512(d.add(128) as *mut _, p2);
                _mm512_storeu_si512(d.add(192) as *mut _, p3);
            }
        }
        debug_assert_eq!(src.len(), rb);
    }
}
