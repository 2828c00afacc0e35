//! f32 building blocks of the forward step: dot products, RMSNorm, a vectorisable `exp`,
//! softmax, SiLU, RoPE, int8 activation quantization into caller buffers, and the f32 / int8
//! matrix–vector products of the LM head.
//!
//! Every routine is written once as portable Rust (`#[inline(always)]` bodies over fixed-width
//! lanes, which LLVM vectorises) and instantiated twice: inside an AVX2+FMA
//! `#[target_feature]` wrapper chosen at run time, and as the plain-x86-64/other-arch fallback.
//! The int8 head dot uses explicit AVX2 / AVX-512 VNNI intrinsics (exact integer sums, so all
//! variants agree bit for bit).
//!
//! Accuracy: [`exp`] is a Cephes-style range reduction plus a degree-6 polynomial, ≤ 2 ulp on
//! the range softmax and SiLU use; everything else is plain IEEE f32 with a fixed summation
//! order per routine (8 or 16 partial sums), so results are deterministic for a given build
//! and CPU path.

/// Lanes of the portable accumulators (two AVX2 registers).
const L: usize = 16;

/// Whether AVX2 + FMA code paths may run (resolved once).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F: OnceLock<bool> = OnceLock::new();
        *F.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Instantiate a portable `#[inline(always)]` body as `$name`, dispatching to an AVX2+FMA build
/// of the same body when the CPU has it.
macro_rules! dispatch {
    ($(#[$m:meta])* pub fn $name:ident($($a:ident : $t:ty),*) $(-> $r:ty)? => $body:ident) => {
        $(#[$m])*
        #[inline]
        pub fn $name($($a: $t),*) $(-> $r)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? { $body($($a),*) }
                if has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked above).
                    return unsafe { avx2($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}

// ----------------------------------------------------------------------------- reductions

#[inline(always)]
pub(crate) fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for j in 0..L {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    hsum(&acc) + tail
}

#[inline(always)]
fn hsum(acc: &[f32; L]) -> f32 {
    let mut h = [0f32; 8];
    for j in 0..8 {
        h[j] = acc[j] + acc[j + 8];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

#[inline(always)]
fn sumsq_body(a: &[f32]) -> f32 {
    dot_body(a, a)
}

dispatch!(
    /// `Σ a·b` over the shorter length.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 => dot_body
);

#[inline(always)]
fn axpy_body(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

dispatch!(
    /// `y += a·x`.
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) => axpy_body
);

// ----------------------------------------------------------------------------- RMSNorm

#[inline(always)]
fn rmsnorm_body(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ms = sumsq_body(x) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * g;
    }
}

dispatch!(
    /// `out = x · rsqrt(mean(x²) + eps) · w` (one row).
    pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) => rmsnorm_body
);

#[inline(always)]
fn rmsnorm_inplace_body(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = sumsq_body(x) / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * r * g;
    }
}

dispatch!(
    /// In-place [`rmsnorm`].
    pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) => rmsnorm_inplace_body
);

// ----------------------------------------------------------------------------- exp, softmax, SiLU

/// `e^x` for f32, vectorisable: `x = n·ln2 + r`, `|r| ≤ ln2/2`, `e^r` by a degree-6 polynomial
/// (Cephes `expf` coefficients), then `2^n` by exponent-field arithmetic. Inputs below −87.3
/// give 0 and above 88.7 give +inf (NaN propagates).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.376_26);
    let n = (xc * LOG2E).round_ties_even();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let e = p * r2 + r + 1.0;
    // 2^n for n in [-126, 127]: the clamp above keeps n there.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = e * scale;
    if x < -87.336_55 {
        0.0
    } else if x > 88.376_26 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

#[inline(always)]
fn softmax_body(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp(*v - m);
        sum += *v;
    }
    let r = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= r;
    }
}

dispatch!(
    /// In-place softmax of one row.
    pub fn softmax(x: &mut [f32]) => softmax_body
);

#[inline(always)]
pub(crate) fn swiglu_body(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + exp(-*g));
        *g = s * u;
    }
}

/// `gate ← silu(gate) · up`.
#[inline]
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 and FMA are present.
            return unsafe { x86::swiglu(gate, up) };
        }
    }
    swiglu_body(gate, up)
}

#[inline(always)]
fn relu2_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        let r = v.max(0.0);
        *v = r * r;
    }
}

dispatch!(
    /// `x ← relu(x)²`.
    pub fn relu2(x: &mut [f32]) => relu2_body
);

/// AVX2 versions of the elementwise hot spots (bit-identical with the portable ones).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on 8 lanes: the same constants, operations and clamps, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.336_55);
        let hi = _mm256_set1_ps(88.376_26);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_sub_ps(xc, _mm256_mul_ps(n, _mm256_set1_ps(0.693_359_4)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.121_944_4e-4)));
        let r2 = _mm256_mul_ps(r, r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.398_199_9e-3));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.333_452e-3));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.166_579_6e-2));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.666_666_5e-1));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5e-1));
        let e = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, r2), r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        ));
        let y = _mm256_mul_ps(e, pow2);
        // below the range 0, above it +inf, NaN stays NaN (as the scalar version)
        let y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), y);
        let y = _mm256_blendv_ps(
            y,
            _mm256_set1_ps(f32::INFINITY),
            _mm256_cmp_ps(x, hi, _CMP_GT_OQ),
        );
        _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q))
    }

    /// See [`super::quantize_row`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
        // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for
        // were detected; pointers and lengths are in bounds, see its docs).
        unsafe {
            let n = x.len().min(q.len());
            let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
            let sign = _mm256_set1_ps(-0.0);
            let mut m = _mm256_setzero_ps();
            let mut c = 0;
            while c + 8 <= n {
                // max ignores NaN the same way the scalar fold does (maxps returns the second
                // operand when either is NaN).
                m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xp.add(c))), m);
                c += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), m);
            let mut amax = lanes.iter().fold(0f32, |a, &v| a.max(v));
            for &v in &x[c..n] {
                amax = amax.max(v.abs());
            }
            let amax = amax.max(crate::ternary::MIN_ACT_ABSMAX);
            let inv = 127.0 / amax;
            let vinv = _mm256_set1_ps(inv);
            let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
            let mut c = 0;
            while c + 32 <= n {
                let mut v = [_mm256_setzero_si256(); 4];
                for (k, vk) in v.iter_mut().enumerate() {
                    let y = _mm256_mul_ps(_mm256_loadu_ps(xp.add(c + 8 * k)), vinv);
                    let y = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    *vk = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(y, lo), hi));
                }
                // i32 → i16 → i8 with saturation (values already in range); packs work per 128-bit
                // lane, so fix the order with a final dword permute.
                let a = _mm256_packs_epi32(v[0], v[1]);
                let b = _mm256_packs_epi32(v[2], v[3]);
                let p = _mm256_packs_epi16(a, b);
                let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(qp.add(c) as *mut __m256i, p);
                c += 32;
            }
            for (o, &v) in q[c..n].iter_mut().zip(&x[c..n]) {
                *o = (v * inv).round_ties_even().clamp(-128.0, 127.0) as i8;
            }
            amax / 127.0
        }
    }

    /// See [`super::swiglu`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for
        // were detected; pointers and lengths are in bounds, see its docs).
        unsafe {
            let n = gate.len().min(up.len());
            let (gp, up_) = (gate.as_mut_ptr(), up.as_ptr());
            let one = _mm256_set1_ps(1.0);
            let neg = _mm256_set1_ps(-0.0);
            let mut c = 0;
            while c + 8 <= n {
                let g = _mm256_loadu_ps(gp.add(c));
                let s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, neg))));
                _mm256_storeu_ps(gp.add(c), _mm256_mul_ps(s, _mm256_loadu_ps(up_.add(c))));
                c += 8;
            }
            super::swiglu_body(&mut gate[c..n], &up[c..n]);
        }
    }
}

// ----------------------------------------------------------------------------- RoPE

/// NEOX rotary embedding of one head in place: pairs `(i, i + d/2)` rotated by the angle whose
/// cosine and sine are `cos[i]`, `sin[i]` (`d/2` values for this position).
#[inline]
pub fn rope_neox(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    let (a, b) = x.split_at_mut(h);
    for i in 0..h {
        let (x0, x1) = (a[i], b[i]);
        a[i] = x0 * cos[i] - x1 * sin[i];
        b[i] = x1 * cos[i] + x0 * sin[i];
    }
}

// ----------------------------------------------------------------------------- int8 activations

#[inline(always)]
fn quantize_row_body(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(crate::ternary::MIN_ACT_ABSMAX);
    let inv = 127.0 / amax;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round_ties_even().clamp(-128.0, 127.0) as i8;
    }
    amax / 127.0
}

/// Per-row absmax int8 quantization into `q`; returns the dequantization scale `absmax/127`.
/// Bit-identical with [`crate::ternary::quantize_acts_i8`] (same expression, same rounding).
#[inline]
pub fn quantize_row(x: &[f32], q: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: AVX2 and FMA are present.
            return unsafe { x86::quantize_row(x, q) };
        }
    }
    quantize_row_body(x, q)
}

// ----------------------------------------------------------------------------- head products

/// Rows of `w` (`rows × cols`, row-major f32) times each of `n` activation rows
/// (`x`, `n × cols`): `out[i·ld + r] = w[r] · x[i]` for `r` in `r0..r1`.
///
/// # Safety
/// `out` must be valid for writes at every `i·ld + r` (`i < n`, `r0 ≤ r < r1`), and no other
/// thread may access those elements meanwhile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn matvec_rows_f32_body(
    w: &[f32],
    cols: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        for r in r0..r1 {
            let wr = &w[r * cols..(r + 1) * cols];
            for i in 0..n {
                *out.add(i * ld + r) = dot_body(wr, &x[i * cols..(i + 1) * cols]);
            }
        }
    }
}

/// f32 `out[i·ld + r] = w[r]·x[i]` for weight rows `r0..r1` (the LM head).
///
/// # Safety
/// As [`matvec_rows_f32_body`]: `out` valid for those writes, which no other thread touches.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn matvec_rows_f32(
    w: &[f32],
    cols: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for were
    // detected; pointers and lengths are in bounds, see its docs).
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2(
                w: &[f32],
                cols: usize,
                r0: usize,
                r1: usize,
                x: &[f32],
                n: usize,
                out: *mut f32,
                ld: usize,
            ) {
                // SAFETY: the caller upholds this function's contract (the CPU features it is
                // compiled for were detected; pointers and lengths are in bounds, see its docs).
                unsafe { matvec_rows_f32_body(w, cols, r0, r1, x, n, out, ld) }
            }
            if has_avx2() {
                return avx2(w, cols, r0, r1, x, n, out, ld);
            }
        }
        matvec_rows_f32_body(w, cols, r0, r1, x, n, out, ld)
    }
}

/// Partial sums of the fp16 head's dot products: 32 lanes (two AVX-512 or four AVX2 registers),
/// each a chain of fused multiply-adds over the columns `≡ lane (mod 32)`, then reduced by the
/// fixed tree of [`reduce32`]. Every implementation (scalar, AVX2, AVX-512) follows exactly this
/// order, so all give the same bits.
const H16: usize = 32;

/// `s[i] = a[i] + a[i+16]`, then halves again (8, 4, 2, 1): the reduction of [`H16`] lanes.
#[inline(always)]
fn reduce32(a: &[f32; H16]) -> f32 {
    let mut s = [0f32; 16];
    for i in 0..16 {
        s[i] = a[i] + a[i + 16];
    }
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = s[i] + s[i + 8];
    }
    let u = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    let v = [u[0] + u[2], u[1] + u[3]];
    v[0] + v[1]
}

/// Columns past the last multiple of [`H16`], summed in order (the engine's widths never have
/// any: `n_embd` is a multiple of 256).
#[inline(always)]
fn dot_f16_tail(w: &[u16], x: &[f32]) -> f32 {
    w.iter().zip(x).fold(0f32, |a, (&b, &v)| {
        half::f16::from_bits(b).to_f32().mul_add(v, a)
    })
}

/// `Σ_c f16(w[c])·x[c]` in the order every fp16 head path uses (see [`H16`]): the scalar twin of
/// the SIMD head, equal to it bit for bit (`mul_add` is the same fused operation as `vfmadd`).
pub fn dot_f16_scalar(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let body = n / H16 * H16;
    let mut acc = [0f32; H16];
    for (wc, xc) in w[..body].chunks_exact(H16).zip(x[..body].chunks_exact(H16)) {
        for j in 0..H16 {
            acc[j] = half::f16::from_bits(wc[j]).to_f32().mul_add(xc[j], acc[j]);
        }
    }
    reduce32(&acc) + dot_f16_tail(&w[body..n], &x[body..n])
}

/// `Σ_c f16(w[c])·x[c]` for fp16 weights (raw bits) and f32 activations (one row of the fp16 LM
/// head; [`matvec_rows_f16`] is the whole head).
#[inline]
pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut out = [0f32];
    // SAFETY: one row of `n` columns, one activation row, one output element.
    unsafe { matvec_rows_f16(&w[..n], n, 0, 1, &x[..n], 1, out.as_mut_ptr(), 1) };
    out[0]
}

/// Whether AVX2 + FMA + F16C code paths may run (resolved once).
pub fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F: OnceLock<bool> = OnceLock::new();
        *F.get_or_init(|| has_avx2() && is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 fp16 head may run (AVX-512 F plus the AVX2/FMA/F16C set; resolved once).
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F: OnceLock<bool> = OnceLock::new();
        *F.get_or_init(|| has_f16c() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// fp16 weight rows `r0..r1` of `w` (`rows × cols` raw bits) times each of `n` f32 activation
/// rows (`x`, `n × cols`): `out[i·ld + r] = Σ_c f16(w[r][c])·x[i][c]`, in the lane order of
/// [`dot_f16_scalar`] on every path.
///
/// This is the fp16 LM head, the largest single read of a decode step (`vocab × C` × 2 bytes,
/// 25 MB for nano_125m) with two flops per byte: it runs at the speed lines arrive. The SIMD
/// paths therefore take 4 (AVX-512) or 2 (AVX2) weight rows at a time, so that each group is
/// read once for all `n` activation rows while it sits in L1, and prefetch [`HEAD_PREFETCH`]
/// bytes ahead (measured, 1 thread, nano_125m's head: the AVX-512 path with prefetch took half
/// the time of the previous per-row AVX2 dot product).
///
/// # Safety
/// `w` must hold rows `r0..r1` of `cols` elements and `x` `n` rows of `cols`; `out` must be valid
/// for writes at every `i·ld + r` (`i < n`, `r0 ≤ r < r1`), which no other thread touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matvec_rows_f16(
    w: &[u16],
    cols: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    n: usize,
    out: *mut f32,
    ld: usize,
) {
    assert!(r0 <= r1 && w.len() >= r1 * cols && x.len() >= n * cols);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512f() {
            // SAFETY: the features were detected; the caller upholds the bounds (checked above
            // for the inputs).
            return unsafe { x86_f16::rows_avx512(w, cols, r0, r1, x, n, out, ld) };
        }
        if has_f16c() {
            // SAFETY: as above.
            return unsafe { x86_f16::rows_avx2(w, cols, r0, r1, x, n, out, ld) };
        }
    }
    for r in r0..r1 {
        let wr = &w[r * cols..(r + 1) * cols];
        for i in 0..n {
            // SAFETY: the caller guarantees `out` is valid for this write.
            unsafe { *out.add(i * ld + r) = dot_f16_scalar(wr, &x[i * cols..(i + 1) * cols]) };
        }
    }
}

/// Bytes ahead of the rows being multiplied that the fp16 head prefetches: a little over one
/// AVX-512 group of nano_125m's rows (4 × 1,536 bytes). 1 to 3 KiB measured alike.
pub const HEAD_PREFETCH: usize = 2048;

#[cfg(target_arch = "x86_64")]
mod x86_f16 {
    use super::{dot_f16_tail, H16, HEAD_PREFETCH};
    use std::arch::x86_64::*;

    /// Prefetch `len` bytes starting [`HEAD_PREFETCH`] after `p` (a hint: never faults).
    #[inline(always)]
    unsafe fn prefetch(p: *const u16, len: usize) {
        let base = (p as *const i8).wrapping_add(HEAD_PREFETCH);
        let mut off = 0;
        while off < len {
            // SAFETY: `_mm_prefetch` reads nothing architecturally and cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off)) };
            off += 64;
        }
    }

    /// Lanes 0..16 and 16..32 reduced as [`super::reduce32`]: `s = lo + hi`, then halves.
    #[inline(always)]
    unsafe fn reduce_512(lo: __m512, hi: __m512) -> f32 {
        // SAFETY: AVX-512 F is enabled by the callers.
        unsafe {
            let s = _mm512_add_ps(lo, hi);
            let a = _mm512_castps512_ps256(s);
            let b = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s)));
            reduce_256(_mm256_add_ps(a, b))
        }
    }

    /// 8 lanes `t` reduced as the last three steps of [`super::reduce32`].
    #[inline(always)]
    unsafe fn reduce_256(t: __m256) -> f32 {
        // SAFETY: AVX is enabled by the callers.
        unsafe {
            let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
            let v = _mm_add_ps(u, _mm_movehl_ps(u, u));
            _mm_cvtss_f32(_mm_add_ss(v, _mm_shuffle_ps::<1>(v, v)))
        }
    }

    /// `G` rows from `w` (row stride `cols`) times one activation row `x`: `G` sums in lane order.
    #[inline(always)]
    unsafe fn group_512<const G: usize>(w: *const u16, cols: usize, x: *const f32) -> [f32; G] {
        // SAFETY: the caller guarantees G rows of `cols` elements at `w` and `cols` at `x`.
        unsafe {
            let body = cols / H16 * H16;
            let mut acc = [[_mm512_setzero_ps(); 2]; G];
            let mut c = 0;
            while c < body {
                let x0 = _mm512_loadu_ps(x.add(c));
                let x1 = _mm512_loadu_ps(x.add(c + 16));
                for (j, a) in acc.iter_mut().enumerate() {
                    let wj = w.add(j * cols + c);
                    let w0 = _mm512_cvtph_ps(_mm256_loadu_si256(wj as *const __m256i));
                    let w1 = _mm512_cvtph_ps(_mm256_loadu_si256(wj.add(16) as *const __m256i));
                    a[0] = _mm512_fmadd_ps(w0, x0, a[0]);
                    a[1] = _mm512_fmadd_ps(w1, x1, a[1]);
                }
                c += H16;
            }
            let mut out = [0f32; G];
            for (j, o) in out.iter_mut().enumerate() {
                let tail = std::slice::from_raw_parts(w.add(j * cols + body), cols - body);
                let xt = std::slice::from_raw_parts(x.add(body), cols - body);
                *o = reduce_512(acc[j][0], acc[j][1]) + dot_f16_tail(tail, xt);
            }
            out
        }
    }

    /// See [`super::matvec_rows_f16`]: groups of 4 rows, each read once for all `n` activations.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_avx512(
        w: &[u16],
        cols: usize,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: bounds as the caller guarantees (see `matvec_rows_f16`).
        unsafe {
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut r = r0;
            while r < r1 {
                let g = (r1 - r).min(4);
                let wr = wp.add(r * cols);
                prefetch(wr, g * cols * 2);
                for i in 0..n {
                    let xi = xp.add(i * cols);
                    let o = out.add(i * ld + r);
                    if g == 4 {
                        let s = group_512::<4>(wr, cols, xi);
                        std::ptr::copy_nonoverlapping(s.as_ptr(), o, 4);
                    } else {
                        for j in 0..g {
                            *o.add(j) = group_512::<1>(wr.add(j * cols), cols, xi)[0];
                        }
                    }
                }
                r += g;
            }
        }
    }

    /// `G` rows times one activation row with AVX2: four 8-lane accumulators per row.
    #[inline(always)]
    unsafe fn group_256<const G: usize>(w: *const u16, cols: usize, x: *const f32) -> [f32; G] {
        // SAFETY: the caller guarantees G rows of `cols` elements at `w` and `cols` at `x`.
        unsafe {
            let body = cols / H16 * H16;
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            let mut c = 0;
            while c < body {
                let xv = [
                    _mm256_loadu_ps(x.add(c)),
                    _mm256_loadu_ps(x.add(c + 8)),
                    _mm256_loadu_ps(x.add(c + 16)),
                    _mm256_loadu_ps(x.add(c + 24)),
                ];
                for (j, a) in acc.iter_mut().enumerate() {
                    let wj = w.add(j * cols + c);
                    for (k, ak) in a.iter_mut().enumerate() {
                        let wk = _mm256_cvtph_ps(_mm_loadu_si128(wj.add(8 * k) as *const __m128i));
                        *ak = _mm256_fmadd_ps(wk, xv[k], *ak);
                    }
                }
                c += H16;
            }
            let mut out = [0f32; G];
            for (j, o) in out.iter_mut().enumerate() {
                // lanes i and i+16 are registers k and k+2: s = [a0+a2, a1+a3], then halves.
                let s0 = _mm256_add_ps(acc[j][0], acc[j][2]);
                let s1 = _mm256_add_ps(acc[j][1], acc[j][3]);
                let tail = std::slice::from_raw_parts(w.add(j * cols + body), cols - body);
                let xt = std::slice::from_raw_parts(x.add(body), cols - body);
                *o = reduce_256(_mm256_add_ps(s0, s1)) + dot_f16_tail(tail, xt);
            }
            out
        }
    }

    /// See [`super::matvec_rows_f16`]: AVX2 + F16C, groups of 2 rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_avx2(
        w: &[u16],
        cols: usize,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: *mut f32,
        ld: usize,
    ) {
        // SAFETY: bounds as the caller guarantees (see `matvec_rows_f16`).
        unsafe {
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let mut r = r0;
            while r < r1 {
                let g = (r1 - r).min(2);
                let wr = wp.add(r * cols);
                prefetch(wr, g * cols * 2);
                for i in 0..n {
                    let xi = xp.add(i * cols);
                    let o = out.add(i * ld + r);
                    if g == 2 {
                        let s = group_256::<2>(wr, cols, xi);
                        std::ptr::copy_nonoverlapping(s.as_ptr(), o, 2);
                    } else {
                        *o = group_256::<1>(wr, cols, xi)[0];
                    }
                }
                r += g;
            }
        }
    }
}

/// Exact `Σ_c w[c]·x[c]` for int8 vectors (any length).
#[inline]
fn dot_i8_scalar(w: &[i8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| a as i32 * b as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86_i8 {
    use std::arch::x86_64::*;

    /// AVX2: `|x|` (u8) × `sign(w, x)` (i8) with `vpmaddubsw` (each i16 pair sum ≤ 2·128·127,
    /// no saturation), widened by `vpmaddwd`. `cols` a multiple of 32.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot_avx2(w: &[i8], x: &[i8]) -> i32 {
        // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for
        // were detected; pointers and lengths are in bounds, see its docs).
        unsafe {
            let n = w.len().min(x.len()) / 32 * 32;
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_si256();
            let mut c = 0;
            while c < n {
                let wv = _mm256_loadu_si256(w.as_ptr().add(c) as *const __m256i);
                let xv = _mm256_loadu_si256(x.as_ptr().add(c) as *const __m256i);
                let ax = _mm256_sign_epi8(xv, xv);
                let sw = _mm256_sign_epi8(wv, xv);
                let p = _mm256_maddubs_epi16(ax, sw);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
                c += 32;
            }
            let lo = _mm256_castsi256_si128(acc);
            let hi = _mm256_extracti128_si256(acc, 1);
            let s = _mm_add_epi32(lo, hi);
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s) + super::dot_i8_scalar(&w[n..], &x[n..])
        }
    }

    /// AVX-512 VNNI: the same sign trick with `vpdpbusd` (i32 accumulation, exact).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_vnni(w: &[i8], x: &[i8]) -> i32 {
        // SAFETY: the caller upholds this function's contract (the CPU features it is compiled for
        // were detected; pointers and lengths are in bounds, see its docs).
        unsafe {
            let n = w.len().min(x.len()) / 64 * 64;
            let mut acc = _mm512_setzero_si512();
            let mut c = 0;
            while c < n {
                let wv = _mm512_loadu_si512(w.as_ptr().add(c) as *const _);
                let xv = _mm512_loadu_si512(x.as_ptr().add(c) as *const _);
                let ax = _mm512_abs_epi8(xv);
                // sign(w, x): negate w where x < 0 (x == 0 gives |x| = 0, so w's value is moot).
                let neg = _mm512_movepi8_mask(xv);
                let sw = _mm512_mask_sub_epi8(wv, neg, _mm512_setzero_si512(), wv);
                acc = _mm512_dpbusd_epi32(acc, ax, sw);
                c += 64;
            }
            _mm512_reduce_add_epi32(acc) + super::dot_i8_scalar(&w[n..], &x[n..])
        }
    }
}

/// Which int8 dot product this CPU runs (resolved once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DotI8 {
    Scalar,
    Avx2,
    Vnni,
}

fn dot_i8_kind() -> DotI8 {
    use std::sync::OnceLock;
    static K: OnceLock<DotI8> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                return DotI8::Vnni;
            }
            if is_x86_feature_detected!("avx2") {
                return DotI8::Avx2;
            }
        }
        DotI8::Scalar
    })
}

/// Exact int8 dot product of values in [−127, 127]. The SIMD paths' sign trick negates `w`
/// where `x < 0`, and `−(−128)` wraps: −128 must never reach here. [`quantize_row`] (the only
/// producer of both operands) never yields it (`|x|·127/absmax ≤ 127` up to rounding, so its
/// −128 clamp is never hit); debug builds check the operands on every call.
#[inline]
pub fn dot_i8(w: &[i8], x: &[i8]) -> i32 {
    debug_assert!(
        !w.contains(&i8::MIN) && !x.contains(&i8::MIN),
        "dot_i8: -128 is outside the supported range [-127, 127]"
    );
    match dot_i8_kind() {
        // SAFETY: the features were detected by `dot_i8_kind`.
        #[cfg(target_arch = "x86_64")]
        DotI8::Vnni => unsafe { x86_i8::dot_vnni(w, x) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 was detected by `dot_i8_kind`.
        DotI8::Avx2 => unsafe { x86_i8::dot_avx2(w, x) },
        _ => dot_i8_scalar(w, x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(1000.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn dot_and_norm() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
        let w = vec![2.0f32; 77];
        let mut out = vec![0f32; 77];
        rmsnorm(&mut out, &a, &w, 1e-5);
        let ms: f64 = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 77.0;
        for (o, v) in out.iter().zip(&a) {
            let want = *v as f64 / (ms + 1e-5).sqrt() * 2.0;
            assert!((*o as f64 - want).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x: Vec<f32> = (0..33).map(|i| i as f32 * 0.3 - 4.0).collect();
        x[3] = f32::NEG_INFINITY; // masked entries
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }

    #[test]
    fn simd_elementwise_bit_identical() {
        for n in [1usize, 7, 8, 31, 32, 33, 100, 768, 3072] {
            let mut x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 613) as f32 / 37.0 - 8.0)
                .collect();
            if n > 5 {
                x[3] = 0.5 * 127.0 / 8.0; // ties at .5 after scaling are likely somewhere
                x[4] = -100.0;
            }
            let mut a = vec![0i8; n];
            let sa = quantize_row_body(&x, &mut a);
            let mut b = vec![0i8; n];
            let sb = quantize_row(&x, &mut b);
            assert_eq!((a, sa), (b, sb), "n = {n}");
            let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut g1 = x.iter().map(|v| v * 12.0).collect::<Vec<_>>();
            let mut g2 = g1.clone();
            swiglu_body(&mut g1, &up);
            swiglu(&mut g2, &up);
            assert_eq!(g1, g2, "n = {n}");
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            use std::arch::x86_64::*;
            let xs = [-1000.0f32, -88.0, -87.0, -1.5, 0.0, 2.5, 88.0, 1000.0];
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA were detected above; the pointers address 8 floats each.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), x86::exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            for (x, y) in xs.iter().zip(out) {
                assert_eq!(exp(*x).to_bits(), y.to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn quantize_row_matches_core() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 7919) % 613) as f32 / 97.0 - 3.0)
            .collect();
        let want = crate::ternary::quantize_acts_i8(&x, 300).unwrap();
        let mut q = vec![0i8; 300];
        let s = quantize_row(&x, &mut q);
        assert_eq!(q, want.values);
        assert_eq!(s, want.scales[0]);
    }

    /// Every fp16 head path (AVX-512, AVX2, scalar) gives the same bits as the scalar twin, for
    /// row groups of every remainder, several activation rows, widths with and without a tail;
    /// and the twin is close to an f64 sum.
    #[test]
    fn fp16_head_paths_bit_identical_to_scalar_twin() {
        for cols in [1usize, 15, 31, 32, 33, 64, 256, 768, 800] {
            for rows in [1usize, 2, 3, 4, 5, 7, 9] {
                for n in [1usize, 2, 3] {
                    let w: Vec<u16> = (0..rows * cols)
                        .map(|i| {
                            half::f16::from_f32(((i * 7919 % 1013) as f32 * 0.37).sin()).to_bits()
                        })
                        .collect();
                    let x: Vec<f32> = (0..n * cols)
                        .map(|i| (i as f32 * 0.11).cos() * 3.0)
                        .collect();
                    let mut want = vec![0f32; n * rows];
                    for r in 0..rows {
                        for i in 0..n {
                            let wr = &w[r * cols..(r + 1) * cols];
                            let xi = &x[i * cols..(i + 1) * cols];
                            want[i * rows + r] = dot_f16_scalar(wr, xi);
                            let f64sum: f64 = wr
                                .iter()
                                .zip(xi)
                                .map(|(&b, &v)| half::f16::from_bits(b).to_f64() * v as f64)
                                .sum();
                            let mag: f64 = wr
                                .iter()
                                .zip(xi)
                                .map(|(&b, &v)| (half::f16::from_bits(b).to_f64() * v as f64).abs())
                                .sum();
                            let err = (want[i * rows + r] as f64 - f64sum).abs();
                            assert!(err <= 4e-6 * mag + 1e-30, "{rows}x{cols}: {err} vs {mag}");
                        }
                    }
                    // A sub-range of rows, written into a wider output (ld > rows).
                    let (r0, r1, ld) = (rows / 3, rows, rows + 2);
                    let mut got = vec![f32::NAN; n * ld];
                    // SAFETY: `got` holds n rows of ld ≥ r1 elements.
                    unsafe { matvec_rows_f16(&w, cols, r0, r1, &x, n, got.as_mut_ptr(), ld) };
                    let mut paths = vec![("dispatch", got)];
                    #[cfg(target_arch = "x86_64")]
                    {
                        if has_avx512f() {
                            let mut g = vec![f32::NAN; n * ld];
                            // SAFETY: AVX-512 F detected; bounds as above.
                            unsafe {
                                x86_f16::rows_avx512(&w, cols, r0, r1, &x, n, g.as_mut_ptr(), ld)
                            };
                            paths.push(("avx512", g));
                        }
                        if has_f16c() {
                            let mut g = vec![f32::NAN; n * ld];
                            // SAFETY: AVX2/FMA/F16C detected; bounds as above.
                            unsafe {
                                x86_f16::rows_avx2(&w, cols, r0, r1, &x, n, g.as_mut_ptr(), ld)
                            };
                            paths.push(("avx2", g));
                        }
                    }
                    for (name, g) in &paths {
                        for i in 0..n {
                            for r in 0..ld {
                                let v = g[i * ld + r];
                                if (r0..r1).contains(&r) {
                                    assert_eq!(
                                        v.to_bits(),
                                        want[i * rows + r].to_bits(),
                                        "{name} {rows}x{cols} n={n} row {r} act {i}"
                                    );
                                } else {
                                    assert!(v.is_nan(), "{name} wrote outside rows {r0}..{r1}");
                                }
                            }
                        }
                    }
                    if rows == 1 && n == 1 {
                        assert_eq!(dot_f16(&w, &x).to_bits(), want[0].to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn dot_i8_all_paths_exact() {
        for n in [1usize, 31, 32, 63, 64, 65, 200, 768] {
            let w: Vec<i8> = (0..n)
                .map(|i| ((i * 37 + 11) % 255) as i32 - 127)
                .map(|v| v as i8)
                .collect();
            let x: Vec<i8> = (0..n)
                .map(|i| ((i * 53 + 5) % 255) as i32 - 127)
                .map(|v| v as i8)
                .collect();
            let want = dot_i8_scalar(&w, &x);
            assert_eq!(dot_i8(&w, &x), want, "n = {n}");
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 was detected.
                    assert_eq!(unsafe { x86_i8::dot_avx2(&w, &x) }, want);
                }
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512bw") {
                    // SAFETY: AVX-512 VNNI and BW were detected.
                    assert_eq!(unsafe { x86_i8::dot_vnni(&w, &x) }, want);
                }
            }
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "-128 is outside")]
    fn dot_i8_refuses_minus_128_in_debug_builds() {
        let w = [i8::MIN; 64];
        let x = [-1i8; 64];
        dot_i8(&w, &x);
    }
}
