//! GGUF TQ2_0 (type id 35): 2.0625 bits per weight.
//!
//! Block of 256 weights, 66 bytes:
//!
//! | bytes  | field | meaning                                                        |
//! |--------|-------|----------------------------------------------------------------|
//! | 0..64  | `qs`  | 2-bit codes `trit + 1` ∈ {0, 1, 2}, four per byte              |
//! | 64..66 | `d`   | fp16 scale, little endian; weight = `(code − 1) · d`           |
//!
//! Element `e` lives in byte `32·(e/128) + e%32` at bit shift `2·((e%128)/32)`: each 32-byte
//! half of `qs` holds 128 consecutive weights as four bit planes of 32. That makes a plain
//! 32-byte load + shift + mask yield 32 *consecutive* codes, which is why the SIMD kernels in
//! [`crate::kernels`] run directly on this layout (with `d` stripped, see [`qs_rows`]).

use super::{check_block_multiple, roundf_away, QK_K};
use crate::{shape_err, Result};
use half::f16;

/// Bytes of packed codes per block.
pub const QS_BYTES: usize = QK_K / 4;
/// Bytes per block: `qs` + fp16 `d`.
pub const BLOCK_BYTES: usize = QS_BYTES + 2;
const _: () = assert!(BLOCK_BYTES == 66);

/// Byte index within `qs` and bit shift of element `e` (0..256) of a block.
#[inline(always)]
pub const fn element_position(e: usize) -> (usize, u32) {
    (32 * (e / 128) + e % 32, 2 * ((e % 128) / 32) as u32)
}

fn pack_codes(codes: impl Fn(usize) -> u8, qs: &mut [u8]) {
    qs.fill(0);
    for e in 0..QK_K {
        let (byte, shift) = element_position(e);
        qs[byte] |= codes(e) << shift;
    }
}

/// Quantize f32 values exactly as `gguf.quants.quantize(x, TQ2_0)`: per block `d = max|x|`,
/// `code = roundf(x · (1/d)) + 1` (half away from zero), `d` stored as fp16.
pub fn quantize(x: &[f32]) -> Result<Vec<u8>> {
    check_block_multiple(x.len(), "TQ2_0 quantize")?;
    let mut out = vec![0u8; x.len() / QK_K * BLOCK_BYTES];
    for (blk, ob) in x.chunks_exact(QK_K).zip(out.chunks_exact_mut(BLOCK_BYTES)) {
        let d = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        pack_codes(
            |e| (roundf_away(blk[e] * id) as i8 + 1) as u8,
            &mut ob[..QS_BYTES],
        );
        ob[QS_BYTES..].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    }
    Ok(out)
}

/// Pack trits with one per-tensor scale: every block carries `d = fp16(scale)`.
///
/// Byte-identical to `gguf.quants.quantize(trits * scale, TQ2_0)` except for blocks whose trits
/// are all zero, where gguf writes `d = 0` and we keep `d = scale` (both dequantize to zeros;
/// keeping the scale lets a loader recover it from any block).
pub fn pack(trits: &[i8], scale: f32) -> Result<Vec<u8>> {
    check_block_multiple(trits.len(), "TQ2_0 pack")?;
    check_trits(trits)?;
    let d = f16::from_f32(scale).to_le_bytes();
    let mut out = vec![0u8; trits.len() / QK_K * BLOCK_BYTES];
    for (blk, ob) in trits
        .chunks_exact(QK_K)
        .zip(out.chunks_exact_mut(BLOCK_BYTES))
    {
        pack_codes(|e| (blk[e] + 1) as u8, &mut ob[..QS_BYTES]);
        ob[QS_BYTES..].copy_from_slice(&d);
    }
    Ok(out)
}

/// Trits and the per-block scales `d` of TQ2_0 data. Code 3 is never written by a ternary
/// quantizer, so meeting one means the data is corrupt or not TQ2_0: it is rejected.
pub fn unpack(data: &[u8]) -> Result<(Vec<i8>, Vec<f32>)> {
    let nb = check_len(data)?;
    let mut trits = vec![0i8; nb * QK_K];
    let mut ds = Vec::with_capacity(nb);
    for (b, blk) in data.chunks_exact(BLOCK_BYTES).enumerate() {
        for e in 0..QK_K {
            let (byte, shift) = element_position(e);
            let code = (blk[byte] >> shift) & 3;
            if code == 3 {
                return Err(crate::Error::Value(format!(
                    "TQ2_0 block {b} holds code 3 at element {e}; the data is corrupt or not TQ2_0"
                )));
            }
            trits[b * QK_K + e] = code as i8 - 1;
        }
        ds.push(block_d(blk));
    }
    Ok((trits, ds))
}

/// Dequantize exactly as `gguf.quants.dequantize(data, TQ2_0)`: `(code − 1) · d` (code 3 → 2·d).
pub fn dequantize(data: &[u8]) -> Result<Vec<f32>> {
    let nb = check_len(data)?;
    let mut out = vec![0f32; nb * QK_K];
    for (blk, ob) in data
        .chunks_exact(BLOCK_BYTES)
        .zip(out.chunks_exact_mut(QK_K))
    {
        let d = block_d(blk);
        for (e, o) in ob.iter_mut().enumerate() {
            let (byte, shift) = element_position(e);
            *o = (((blk[byte] >> shift) & 3) as f32 - 1.0) * d;
        }
    }
    Ok(out)
}

/// Strip the `d` field from `rows` rows of TQ2_0 data: the kernels' weight layout,
/// `rows × cols/4` bytes, each row its blocks' `qs` back to back.
pub fn qs_rows(data: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    check_block_multiple(cols, "TQ2_0 rows")?;
    let nb = check_len(data)?;
    if nb * QK_K != rows * cols {
        return Err(shape_err!(
            "TQ2_0 data holds {} weights but rows × cols = {} × {} = {}",
            nb * QK_K,
            rows,
            cols,
            rows * cols
        ));
    }
    let mut out = Vec::with_capacity(rows * cols / 4);
    for blk in data.chunks_exact(BLOCK_BYTES) {
        out.extend_from_slice(&blk[..QS_BYTES]);
    }
    Ok(out)
}

/// The fp16 scale of one block, as f32.
#[inline]
pub fn block_d(blk: &[u8]) -> f32 {
    f16::from_le_bytes([blk[QS_BYTES], blk[QS_BYTES + 1]]).to_f32()
}

fn check_len(data: &[u8]) -> Result<usize> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
        return Err(shape_err!(
            "TQ2_0 data length {} is not a positive multiple of the block size {BLOCK_BYTES}",
            data.len()
        ));
    }
    Ok(data.len() / BLOCK_BYTES)
}

pub(crate) fn check_trits(trits: &[i8]) -> Result<()> {
    if let Some(i) = trits.iter().position(|t| !(-1..=1).contains(t)) {
        return Err(crate::Error::Value(format!(
            "trit {} at index {i} is outside {{-1, 0, 1}}",
            trits[i]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trits(n: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn pack_unpack_roundtrip() {
        let t = trits(3 * QK_K, 7);
        let p = pack(&t, 0.125).unwrap();
        assert_eq!(p.len(), 3 * BLOCK_BYTES);
        let (back, ds) = unpack(&p).unwrap();
        assert_eq!(back, t);
        assert_eq!(ds, vec![0.125; 3]);
    }

    #[test]
    fn pack_equals_quantize_of_scaled_trits() {
        let t = trits(4 * QK_K, 11);
        let s = 0.0371f32;
        let x: Vec<f32> = t.iter().map(|&v| v as f32 * s).collect();
        assert_eq!(pack(&t, s).unwrap(), quantize(&x).unwrap());
    }

    #[test]
    fn layout_matches_spec() {
        let mut t = vec![0i8; QK_K];
        t[130] = 1; // byte 32 + 2, shift 0
        t[37] = -1; // byte 5, shift 2
        let p = pack(&t, 1.0).unwrap();
        assert_eq!(p[34] & 3, 2);
        assert_eq!((p[5] >> 2) & 3, 0);
        assert_eq!(p[0], 0b0101_0101);
    }

    #[test]
    fn rejects_bad_sizes_and_codes() {
        assert!(pack(&[0; 100], 1.0).is_err());
        assert!(pack(&[2; 256], 1.0).is_err());
        assert!(unpack(&[0; 65]).is_err());
        assert!(unpack(&[0xff; 66]).is_err());
        assert!(qs_rows(&[0x55; 66], 2, 256).is_err());
    }
}
