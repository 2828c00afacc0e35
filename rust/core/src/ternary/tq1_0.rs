//! GGUF TQ1_0 (type id 34): 1.6875 bits per weight, base-3 packing.
//!
//! Block of 256 weights, 54 bytes:
//!
//! | bytes  | field | meaning                                                              |
//! |--------|-------|----------------------------------------------------------------------|
//! | 0..32  | `qs0` | 5 codes per byte: element `32·i + j` is base-3 digit `i` of byte `j` |
//! | 32..48 | `qs1` | 5 codes per byte: element `160 + 16·i + j` (j < 16)                  |
//! | 48..52 | `qh`  | 4 codes per byte: element `240 + 4·i + j` (j < 4)                    |
//! | 52..54 | `d`   | fp16 scale; weight = `(code − 1) · d`                                |
//!
//! Digit 0 is the most significant. A byte holding the base-3 number `q` (< 243) is stored as
//! `ceil(q · 256 / 243)`, so digit `i` is recovered with one multiply and a shift:
//! `code = ((byte · 3^i mod 256) · 3) >> 8` — the form ggml's SIMD kernels use.

use super::tq2_0::check_trits;
use super::{check_block_multiple, roundf_away, QK_K};
use crate::{shape_err, Result};
use half::f16;

pub const QS_BYTES: usize = 48;
pub const QH_BYTES: usize = 4;
pub const BLOCK_BYTES: usize = QS_BYTES + QH_BYTES + 2;
const _: () = assert!(BLOCK_BYTES == 54);

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// (byte, digit) of element `e` (0..256) of a block.
#[inline(always)]
pub const fn element_position(e: usize) -> (usize, usize) {
    if e < 160 {
        (e % 32, e / 32)
    } else if e < 240 {
        (32 + (e - 160) % 16, (e - 160) / 16)
    } else {
        (48 + (e - 240) % 4, (e - 240) / 4)
    }
}

fn pack_codes(codes: impl Fn(usize) -> u8, q: &mut [u8]) {
    let mut acc = [0u16; QS_BYTES + QH_BYTES];
    for e in 0..QK_K {
        // Digit i weighs 3^(4-i); the 4-digit qh bytes use 81, 27, 9, 3 (a fifth digit 0).
        let (byte, digit) = element_position(e);
        acc[byte] += codes(e) as u16 * POW3[4 - digit] as u16;
    }
    for (o, &a) in q.iter_mut().zip(acc.iter()) {
        *o = (a * 256).div_ceil(243) as u8;
    }
}

/// Quantize exactly as `gguf.quants.quantize(x, TQ1_0)` (per-block absmax, half away from zero).
pub fn quantize(x: &[f32]) -> Result<Vec<u8>> {
    check_block_multiple(x.len(), "TQ1_0 quantize")?;
    let mut out = vec![0u8; x.len() / QK_K * BLOCK_BYTES];
    for (blk, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let d = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        pack_codes(
            |e| (roundf_away(blk[e] * id) as i8 + 1) as u8,
            &mut ob[..QS_BYTES + QH_BYTES],
        );
        ob[QS_BYTES + QH_BYTES..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    Ok(out)
}

/// Pack trits with a per-tensor scale (every block carries `d = fp16(scale)`); see
/// [`super::tq2_0::pack`] for the one difference from gguf (all-zero blocks).
pub fn pack(trits: &[i8], scale: f32) -> Result<Vec<u8>> {
    check_block_multiple(trits.len(), "TQ1_0 pack")?;
    check_trits(trits)?;
    let d = f16::from_f32(scale).to_le_bytes();
    let mut out = vec![0u8; trits.len() / QK_K * BLOCK_BYTES];
    for (blk, ob) in trits
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        pack_codes(|e| (blk[e] + 1) as u8, &mut ob[..QS_BYTES + QH_BYTES]);
        ob[QS_BYTES + QH_BYTES..].copy_from_slice(&d);
    }
    Ok(out)
}

#[inline(always)]
fn code_at(blk: &[u8], e: usize) -> u8 {
    let (byte, digit) = element_position(e);
    let v = blk[byte].wrapping_mul(POW3[digit]);
    ((v as u16 * 3) >> 8) as u8
}

/// Trits and per-block scales of TQ1_0 data.
pub fn unpack(data: &[u8]) -> Result<(Vec<i8>, Vec<f32>)> {
    let nb = check_len(data)?;
    let mut trits = vec![0i8; nb * QK_K];
    let mut ds = Vec::with_capacity(nb);
    for (blk, ob) in data
        .chunks_exact(BLOCK_BYTES)
        .zip(trits.chunks_exact_mut(QK_K))
    {
        for (e, o) in ob.iter_mut().enumerate() {
            *o = code_at(blk, e) as i8 - 1;
        }
        ds.push(block_d(blk));
    }
    Ok((trits, ds))
}

/// Dequantize exactly as `gguf.quants.dequantize(data, TQ1_0)`.
pub fn dequantize(data: &[u8]) -> Result<Vec<f32>> {
    let (trits, ds) = unpack(data)?;
    Ok(trits
        .chunks_exact(QK_K)
        .zip(ds)
        .flat_map(|(blk, d)| blk.iter().map(move |&t| t as f32 * d))
        .collect())
}

#[inline]
pub fn block_d(blk: &[u8]) -> f32 {
    f16::from_le_bytes([blk[BLOCK_BYTES - 2], blk[BLOCK_BYTES - 1]]).to_f32()
}

fn check_len(data: &[u8]) -> Result<usize> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
        return Err(shape_err!(
            "TQ1_0 data length {} is not a positive multiple of the block size {BLOCK_BYTES}",
            data.len()
        ));
    }
    Ok(data.len() / BLOCK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_patterns() {
        // Every code in every position, several blocks.
        let t: Vec<i8> = (0..5 * QK_K)
            .map(|i| ((i * 7 + i / 3) % 3) as i8 - 1)
            .collect();
        let p = pack(&t, 0.5).unwrap();
        assert_eq!(p.len(), 5 * BLOCK_BYTES);
        let (back, ds) = unpack(&p).unwrap();
        assert_eq!(back, t);
        assert!(ds.iter().all(|&d| d == 0.5));
    }

    #[test]
    fn every_byte_value_decodes() {
        // All 243 five-trit numbers survive the ceil(q·256/243) encoding.
        for q in 0u16..243 {
            let b = (q * 256).div_ceil(243) as u8;
            let mut rest = q;
            for digit in (0..5).rev() {
                let want = (rest % 3) as u8;
                rest /= 3;
                let got = ((b.wrapping_mul(POW3[digit]) as u16 * 3) >> 8) as u8;
                assert_eq!(got, want, "q={q} digit={digit}");
            }
        }
    }

    #[test]
    fn pack_equals_quantize_of_scaled_trits() {
        let t: Vec<i8> = (0..2 * QK_K)
            .map(|i| ((i * 13 + 5) % 3) as i8 - 1)
            .collect();
        let x: Vec<f32> = t.iter().map(|&v| v as f32 * 0.02).collect();
        assert_eq!(pack(&t, 0.02).unwrap(), quantize(&x).unwrap());
    }
}
