//! The forward step over a batch of sessions (see the module docs of [`super`]).
//!
//! Layout: `N` = total new tokens (rows) over all sessions; the residual is `N × ns × C`
//! (`ns` = streams, 1 for `standard`). [`forward`] reads top to bottom: [`embed`], then per block
//! [`attention_sublayer`] and [`mlp_sublayer`], then [`final_norm`] and [`head`]. A sublayer is
//!
//! ```text
//! pre_sublayer   rows  : [mHC mappings, u = H_pre·x] → RMSNorm → int8 quantize
//! gemm           team  : ternary GEMM (rows of the fused matrix split over threads)
//! qk_norm_rope   rows  : QK-norm + RoPE            | mlp_act: SwiGLU|ReLU² + sub-norm + quantize
//! write_kv       serial: K, V into the session caches, then the segment table
//! attention      team  : (session, head) items split over threads
//! norm_quant_rows rows : sub-norm + quantize
//! gemm           team  : o / down
//! post_sublayer  rows  : residual: x += y, or x = H_res·x + H_postᵀ·y
//! ```
//! (the MLP sublayer skips the attention-only steps). `rows` steps are split over the team for
//! [`PAR_ROWS`] rows or more; the head splits the vocabulary over the team.

use super::attention::attend;
use super::math;
use super::{
    Fused, Head, KvPrecision, Layer, Logits, MhcParams, MlpKind, Model, Residual, Session,
};
use crate::kernels::{self, Kernel, TernaryView};
use crate::team::{self, Crew, SendPtr};
use crate::{Error, Result};
use half::f16;
use std::sync::Mutex;
use std::time::Instant;

/// Rows at or above which row-wise work is split over the team.
const PAR_ROWS: usize = 4;
/// Vocabulary rows per work item of the head (256 × 768 f32 = 768 KiB).
const HEAD_CHUNK: usize = 256;
/// Packed weight bytes per GEMM work item when several activation rows share it.
const GEMM_CHUNK_BYTES: usize = 48 << 10;
/// Activation rows per kernel call: the kernels' tiles keep this many rows' worth of int8
/// activations hot; longer prompts are fed in blocks (measured: 1.5–2× on 128-token prefill).
const ACT_BLOCK: usize = 32;
/// The same for the `amx` kernel, which unpacks each 32-row weight block to int8 once per call:
/// the more activation rows share that unpacking, the better (a 128-token prompt in one call).
const ACT_BLOCK_AMX: usize = 256;

/// Timed sections of a forward step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Embedding lookup, stream copies, final mean and norm.
    Embed,
    /// mHC mappings (projection, sigmoids, H_res) and the stream updates.
    Mhc,
    /// RMSNorms, activation functions and int8 quantization of GEMM inputs.
    Norm,
    /// Ternary GEMMs: q/k/v, o, gate/up, down.
    GemmQkv,
    GemmO,
    GemmGateUp,
    GemmDown,
    /// QK-norm, RoPE and the KV-cache writes.
    Rope,
    /// Attention over the cache.
    Attention,
    /// LM head.
    Head,
}

pub const SECTIONS: [Section; 10] = [
    Section::Embed,
    Section::Mhc,
    Section::Norm,
    Section::GemmQkv,
    Section::GemmO,
    Section::GemmGateUp,
    Section::GemmDown,
    Section::Rope,
    Section::Attention,
    Section::Head,
];

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Embed => "embed",
            Section::Mhc => "mhc",
            Section::Norm => "norm_act_quant",
            Section::GemmQkv => "gemm_qkv",
            Section::GemmO => "gemm_o",
            Section::GemmGateUp => "gemm_gate_up",
            Section::GemmDown => "gemm_down",
            Section::Rope => "qknorm_rope_cache",
            Section::Attention => "attention",
            Section::Head => "head",
        }
    }
}

/// Cumulative seconds per [`Section`], forward calls and rows processed.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub enabled: bool,
    pub seconds: [f64; 10],
    pub calls: u64,
    pub rows: u64,
    /// Wall time of whole forward calls (sections plus bookkeeping).
    pub total: f64,
}

impl Profile {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Default::default()
        }
    }

    /// `(section name, seconds)` pairs.
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        SECTIONS
            .iter()
            .map(|s| (s.name(), self.seconds[*s as usize]))
            .collect()
    }
}

/// Per-thread scratch.
#[derive(Default)]
struct ThreadScratch {
    acc: Vec<i32>,
    scores: Vec<f32>,
}

/// Where a session's rows live in this step.
#[derive(Clone, Copy)]
struct Seg {
    row0: usize,
    n: usize,
    pos0: usize,
    /// Positions per head in the cache buffers.
    cap: usize,
    k: *const u8,
    v: *const u8,
}

/// Reused buffers of the forward step; they only grow.
#[derive(Default)]
struct Workspace {
    x: Vec<f32>,
    xn: Vec<f32>,
    u: Vec<f32>,
    a: Vec<f32>,
    xq: Vec<i8>,
    xs: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    y: Vec<f32>,
    gu: Vec<f32>,
    hpre: Vec<f32>,
    hpost: Vec<f32>,
    hres: Vec<f32>,
    dyn_: Vec<f32>,
    pos: Vec<usize>,
    segs: Vec<Seg>,
    threads: Vec<ThreadScratch>,
    out_rows: Vec<usize>,
    h: Vec<f32>,
    hq: Vec<i8>,
    hs: Vec<f32>,
}

/// Grow `v` to at least `n` elements; an allocation failure is an error, not an abort (the
/// sizes follow from the caller's token counts and `max_seq`).
fn grow<T: Default + Clone>(v: &mut Vec<T>, n: usize) -> Result<()> {
    if v.len() < n {
        v.try_reserve_exact(n - v.len()).map_err(|_| {
            Error::OutOfMemory(format!(
                "engine workspace: cannot allocate {n} elements of {} bytes",
                std::mem::size_of::<T>()
            ))
        })?;
        v.resize(n, T::default());
    }
    Ok(())
}

/// A model's mutable state: its thread count, workspace and profile.
pub(crate) struct Runtime {
    /// Threads asked of the crate's team per forward step (resolved, ≥ 1).
    pub threads: usize,
    ws: Workspace,
    pub profile: Profile,
}

impl Runtime {
    pub fn new(threads: usize, profile: bool) -> Result<Self> {
        Ok(Self {
            threads: threads.max(1),
            ws: Workspace::default(),
            profile: Profile::new(profile),
        })
    }
}

/// Records the time since the previous mark into a section (when profiling).
struct Clock {
    on: bool,
    t: Instant,
}

impl Clock {
    fn mark(&mut self, p: &mut Profile, s: Section) {
        if self.on {
            let now = Instant::now();
            p.seconds[s as usize] += (now - self.t).as_secs_f64();
            self.t = now;
        }
    }
}

/// Validate every input before touching any session.
fn check(model: &Model, batch: &mut [(&mut Session, &[u32])]) -> Result<usize> {
    if batch.is_empty() {
        return Err(Error::Value("forward needs at least one session".into()));
    }
    let v = model.cfg.vocab_size;
    let mut n = 0;
    for (i, (s, toks)) in batch.iter().enumerate() {
        if s.model_id != model.id {
            return Err(Error::Value(format!(
                "session {i} belongs to another model"
            )));
        }
        if toks.is_empty() {
            return Err(Error::Value(format!("session {i}: no tokens given")));
        }
        if let Some(&t) = toks.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Value(format!(
                "session {i}: token id {t} is out of range for vocab_size {v}"
            )));
        }
        if s.pos + toks.len() > s.max_seq {
            return Err(Error::Value(format!(
                "context overflow: session {i} holds {} tokens and {} more would exceed max_seq = {}",
                s.pos,
                toks.len(),
                s.max_seq
            )));
        }
        n += toks.len();
    }
    for (s, toks) in batch.iter_mut() {
        s.reserve(toks.len())?;
    }
    Ok(n)
}

/// Run `f(r0, r1)` over rows `0..n`: inline for small `n`, else split over the team.
fn rows_par<F: Fn(usize, usize) + Sync>(team: &mut Crew, n: usize, f: F) -> Result<()> {
    if n < PAR_ROWS || team.threads() == 1 {
        f(0, n);
        return Ok(());
    }
    let chunk = n.div_ceil(4 * team.threads()).max(1);
    team.run(n, chunk, |_, lo, hi| f(lo, hi))
}

impl Workspace {
    /// Grow every buffer for a step of `n` rows over `batch` on `threads` threads.
    fn reserve(
        &mut self,
        model: &Model,
        batch: &[(&mut Session, &[u32])],
        n: usize,
        threads: usize,
    ) -> Result<()> {
        let cfg = &model.cfg;
        let (c, ns) = (cfg.n_embd, cfg.streams());
        let qkv_rows = c + 2 * cfg.kv_dim();
        let gu_rows = model.layers[0].gate_up.rows;
        let nd = 2 * ns + cfg.n_res();
        let wide = c.max(cfg.mlp_hidden);
        grow(&mut self.x, n * ns * c)?;
        grow(&mut self.xn, n * ns * c)?;
        grow(&mut self.u, n * c)?;
        grow(&mut self.a, n * wide)?;
        grow(&mut self.xq, n * wide)?;
        grow(&mut self.xs, n)?;
        grow(&mut self.qkv, n * qkv_rows)?;
        grow(&mut self.att, n * c)?;
        grow(&mut self.y, n * c)?;
        grow(&mut self.gu, n * gu_rows)?;
        grow(&mut self.hpre, n * ns)?;
        grow(&mut self.hpost, n * ns)?;
        grow(&mut self.hres, n * ns * ns)?;
        grow(&mut self.dyn_, n * nd.max(1))?;
        grow(&mut self.pos, n)?;
        let max_rows = qkv_rows.max(gu_rows).max(c);
        let max_ctx = batch
            .iter()
            .map(|(s, t)| s.pos + t.len())
            .max()
            .unwrap_or(0);
        if self.threads.len() < threads {
            self.threads.resize_with(threads, Default::default);
        }
        for ts in self.threads.iter_mut() {
            grow(&mut ts.acc, n * max_rows)?;
            grow(&mut ts.scores, max_ctx)?;
        }
        Ok(())
    }
}

/// One forward step in flight: the model, the team and workspace it borrows, the profile.
struct Step<'a> {
    model: &'a Model,
    team: &'a mut Crew,
    ws: &'a mut Workspace,
    prof: &'a mut Profile,
    clock: Clock,
    /// Rows of the step: new tokens over all sessions.
    n: usize,
}

impl Step<'_> {
    fn mark(&mut self, s: Section) {
        self.clock.mark(self.prof, s);
    }
}

/// The batched step (see the module docs): embed, every block's attention and MLP sublayers,
/// then the final norm and the head for the requested rows.
pub(crate) fn forward(
    model: &Model,
    batch: &mut [(&mut Session, &[u32])],
    which: Logits,
) -> Result<Vec<f32>> {
    let n = check(model, batch)?;
    let mut guard = model.lock();
    let rt = &mut *guard;
    let t_start = Instant::now();
    // The crate's team for the whole step (or this thread alone, if it is lent elsewhere).
    let mut crew = team::borrow(rt.threads)?;
    rt.ws.reserve(model, batch, n, crew.threads())?;
    let clock = Clock {
        on: rt.profile.enabled,
        t: Instant::now(),
    };
    let mut st = Step {
        model,
        team: &mut crew,
        ws: &mut rt.ws,
        prof: &mut rt.profile,
        clock,
        n,
    };
    embed(&mut st, batch);
    for (li, layer) in model.layers.iter().enumerate() {
        attention_sublayer(&mut st, batch, li, layer)?;
        mlp_sublayer(&mut st, layer)?;
    }
    let nout = final_norm(&mut st, batch, which)?;
    let logits = head(&mut st, nout)?;
    for (s, toks) in batch.iter_mut() {
        s.pos += toks.len();
    }
    if st.prof.enabled {
        st.prof.calls += 1;
        st.prof.rows += n as u64;
        st.prof.total += t_start.elapsed().as_secs_f64();
    }
    Ok(logits)
}

/// Token embeddings into the first stream of each row, copied into the other streams; and each
/// row's position in its session.
fn embed(st: &mut Step, batch: &[(&mut Session, &[u32])]) {
    let model = st.model;
    let ws = &mut *st.ws;
    let (c, ns) = (model.cfg.n_embd, model.cfg.streams());
    let mut row = 0;
    for (s, toks) in batch.iter() {
        for (j, &tok) in toks.iter().enumerate() {
            let (r0, r1) = (tok as usize * c, (tok as usize + 1) * c);
            let first = &mut ws.x[row * ns * c..(row * ns + 1) * c];
            match &model.tok_emb {
                super::Emb::F32(e) => first.copy_from_slice(&e[r0..r1]),
                super::Emb::F16(e) => {
                    for (x, &b) in first.iter_mut().zip(&e[r0..r1]) {
                        *x = f16::from_bits(b).to_f32(); // exact
                    }
                }
            }
            for st in 1..ns {
                ws.x.copy_within(row * ns * c..(row * ns + 1) * c, (row * ns + st) * c);
            }
            ws.pos[row] = s.pos + j;
            row += 1;
        }
    }
    st.mark(Section::Embed);
}

/// Attention sublayer: (mHC mappings,) norm → fused q/k/v GEMM → QK-norm + RoPE → KV-cache
/// writes → attention → sub-norm → o GEMM → residual.
fn attention_sublayer(
    st: &mut Step,
    batch: &mut [(&mut Session, &[u32])],
    li: usize,
    layer: &Layer,
) -> Result<()> {
    pre_sublayer(st, layer.mhc_attn.as_ref(), &layer.attn_norm)?;
    gemm(st, &layer.qkv, Out::Qkv)?;
    st.mark(Section::GemmQkv);
    qk_norm_rope(st, layer)?;
    write_kv(st, batch, li);
    st.mark(Section::Rope);
    attention(st)?;
    st.mark(Section::Attention);
    norm_quant_rows(st, Src::Att, &layer.attn_sub_norm)?;
    st.mark(Section::Norm);
    gemm(st, &layer.o, Out::Y)?;
    st.mark(Section::GemmO);
    post_sublayer(st, layer.mhc_attn.as_ref())?;
    st.mark(Section::Mhc);
    Ok(())
}

/// MLP sublayer: (mHC mappings,) norm → fused gate/up GEMM → SwiGLU | ReLU² → sub-norm →
/// down GEMM → residual.
fn mlp_sublayer(st: &mut Step, layer: &Layer) -> Result<()> {
    pre_sublayer(st, layer.mhc_mlp.as_ref(), &layer.mlp_norm)?;
    gemm(st, &layer.gate_up, Out::Gu)?;
    st.mark(Section::GemmGateUp);
    mlp_act(st, layer)?;
    st.mark(Section::Norm);
    gemm(st, &layer.down, Out::Y)?;
    st.mark(Section::GemmDown);
    post_sublayer(st, layer.mhc_mlp.as_ref())?;
    st.mark(Section::Mhc);
    Ok(())
}

/// QK-norm (when the model has it) and NEOX RoPE on the q and k heads of every row, in place
/// in `qkv` (row-parallel).
fn qk_norm_rope(st: &mut Step, layer: &Layer) -> Result<()> {
    let cfg = &st.model.cfg;
    let (c, hd, nh) = (cfg.n_embd, cfg.head_dim(), cfg.n_head);
    let kvd = cfg.kv_dim();
    let qkv_rows = c + 2 * kvd;
    let ws = &mut *st.ws;
    let qkv = SendPtr::new(&mut ws.qkv);
    let pos = &ws.pos;
    let (qn, kn) = (layer.q_norm.as_deref(), layer.k_norm.as_deref());
    let eps = cfg.norm_eps;
    let inv_freq = &st.model.inv_freq;
    rows_par(st.team, st.n, |r0, r1| {
        let mut cos = [0f32; 256];
        let mut sin = [0f32; 256];
        let h2 = hd / 2;
        for (r, &p) in pos.iter().enumerate().take(r1).skip(r0) {
            // SAFETY: disjoint rows per thread.
            let row = unsafe { qkv.slice(r * qkv_rows, r * qkv_rows + c + kvd) };
            // As rope_cos_sin: the angle is an f32 product, its cos/sin rounded to f32.
            for ((cs, sn), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&inv_freq[..h2]) {
                let ang = p as f32 * f;
                *cs = (ang as f64).cos() as f32;
                *sn = (ang as f64).sin() as f32;
            }
            for (hh, head) in row.chunks_exact_mut(hd).enumerate() {
                let norm = if hh < nh { qn } else { kn };
                if let Some(w) = norm {
                    math::rmsnorm_inplace(head, w, eps);
                }
                math::rope_neox(head, &cos[..h2], &sin[..h2]);
            }
        }
    })
}

/// K and V of every row into its session's layer-`li` cache, then the segment table of the
/// attention job.
fn write_kv(st: &mut Step, batch: &mut [(&mut Session, &[u32])], li: usize) {
    let cfg = &st.model.cfg;
    let (c, hd, nkv) = (cfg.n_embd, cfg.head_dim(), cfg.n_kv_head);
    let kvd = cfg.kv_dim();
    let qkv_rows = c + 2 * kvd;
    let ws = &mut *st.ws;
    let mut row0 = 0;
    for (s, toks) in batch.iter_mut() {
        let cap = s.cap;
        for j in 0..toks.len() {
            let r = row0 + j;
            let p = s.pos + j;
            let src = &ws.qkv[r * qkv_rows + c..r * qkv_rows + c + 2 * kvd];
            for h in 0..nkv {
                let dst = (h * cap + p) * hd;
                s.k[li].write(dst, &src[h * hd..(h + 1) * hd]);
                s.v[li].write(dst, &src[kvd + h * hd..kvd + (h + 1) * hd]);
            }
        }
        row0 += toks.len();
    }
    // The segment table (raw cache pointers for the attention job) is built only now, after the
    // last write through `&mut` to this layer's caches: no pointer taken earlier is used after a
    // mutable borrow of its buffer.
    ws.segs.clear();
    let mut row0 = 0;
    for (s, toks) in batch.iter() {
        ws.segs.push(Seg {
            row0,
            n: toks.len(),
            pos0: s.pos,
            cap: s.cap,
            k: s.k[li].as_ptr(),
            v: s.v[li].as_ptr(),
        });
        row0 += toks.len();
    }
}

/// Causal attention (GQA) of every row over its session's cache into `att`: work items are
/// (segment, head) pairs.
fn attention(st: &mut Step) -> Result<()> {
    let cfg = &st.model.cfg;
    let (c, hd, nh, nkv) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
    let qkv_rows = c + 2 * cfg.kv_dim();
    let ws = &mut *st.ws;
    let att = SendPtr::new(&mut ws.att);
    let qkv = &ws.qkv;
    let segs = &ws.segs;
    let th = SendPtr::new(&mut ws.threads);
    let items = segs.len() * nh;
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let kv = st.model.kv;
    let job = |t: usize, lo: usize, hi: usize| {
        // SAFETY: thread t alone uses scratch t.
        let ts = unsafe { &mut th.slice(t, t + 1)[0] };
        for it in lo..hi {
            let sg = segs[it / nh];
            let h = it % nh;
            let kvh = h / group;
            let n_ctx = sg.pos0 + sg.n;
            let base = kvh * sg.cap * hd;
            for j in 0..sg.n {
                let r = sg.row0 + j;
                let q = &qkv[r * qkv_rows + h * hd..r * qkv_rows + (h + 1) * hd];
                // SAFETY: row r, head h is written by this item only.
                let out = unsafe { att.slice(r * c + h * hd, r * c + (h + 1) * hd) };
                let n_keys = sg.pos0 + j + 1;
                // SAFETY: the caches hold `cap ≥ n_ctx` positions per head (reserved), of the
                // model's precision, and are only read while this job runs.
                unsafe {
                    match kv {
                        KvPrecision::F32 => {
                            let (k, v) = (sg.k as *const f32, sg.v as *const f32);
                            let kc = std::slice::from_raw_parts(k.add(base), n_ctx * hd);
                            let vc = std::slice::from_raw_parts(v.add(base), n_ctx * hd);
                            attend(q, kc, vc, n_keys, scale, &mut ts.scores, out)
                        }
                        KvPrecision::F16 => {
                            let (k, v) = (sg.k as *const f16, sg.v as *const f16);
                            let kc = std::slice::from_raw_parts(k.add(base), n_ctx * hd);
                            let vc = std::slice::from_raw_parts(v.add(base), n_ctx * hd);
                            attend(q, kc, vc, n_keys, scale, &mut ts.scores, out)
                        }
                    }
                }
            }
        }
    };
    if items == 1 || st.team.threads() == 1 {
        job(0, 0, items);
        Ok(())
    } else {
        st.team.run(items, 1, job)
    }
}

/// SwiGLU or ReLU² on the gate/up rows, then the sub-norm and int8 quantization of the down
/// projection's input (row-parallel).
fn mlp_act(st: &mut Step, layer: &Layer) -> Result<()> {
    let cfg = &st.model.cfg;
    let hid = cfg.mlp_hidden;
    let gu_rows = layer.gate_up.rows;
    let ws = &mut *st.ws;
    let gu = SendPtr::new(&mut ws.gu);
    let a = SendPtr::new(&mut ws.a);
    let xq = SendPtr::new(&mut ws.xq);
    let xs = SendPtr::new(&mut ws.xs);
    let kind = cfg.mlp;
    let w = &layer.mlp_sub_norm;
    let eps = cfg.norm_eps;
    rows_par(st.team, st.n, |r0, r1| {
        for r in r0..r1 {
            // SAFETY: disjoint rows per thread.
            let g = unsafe { gu.slice(r * gu_rows, (r + 1) * gu_rows) };
            let h = match kind {
                MlpKind::SwiGlu => {
                    let (gate, up) = g.split_at_mut(hid);
                    math::swiglu(gate, up);
                    &*gate
                }
                MlpKind::Relu2 => {
                    math::relu2(g);
                    &*g
                }
            };
            // SAFETY: disjoint rows per thread.
            let ar = unsafe { a.slice(r * hid, (r + 1) * hid) };
            math::rmsnorm(ar, h, w, eps);
            // SAFETY: disjoint rows per thread.
            let q = unsafe { xq.slice(r * hid, (r + 1) * hid) };
            // SAFETY: disjoint rows per thread.
            unsafe { xs.slice(r, r + 1)[0] = math::quantize_row(ar, q) };
        }
    })
}

/// The rows to project (every row, or each session's last), their stream mean and the final
/// RMSNorm into `h`; returns how many.
fn final_norm(st: &mut Step, batch: &[(&mut Session, &[u32])], which: Logits) -> Result<usize> {
    let model = st.model;
    let cfg = &model.cfg;
    let (c, ns) = (cfg.n_embd, cfg.streams());
    let ws = &mut *st.ws;
    ws.out_rows.clear();
    match which {
        Logits::All => ws.out_rows.extend(0..st.n),
        Logits::Last => {
            let mut r = 0;
            for (_, toks) in batch.iter() {
                r += toks.len();
                ws.out_rows.push(r - 1);
            }
        }
    }
    let nout = ws.out_rows.len();
    grow(&mut ws.h, nout * c)?;
    for (i, &r) in ws.out_rows.iter().enumerate() {
        let h = &mut ws.h[i * c..(i + 1) * c];
        if ns == 1 {
            h.copy_from_slice(&ws.x[r * c..(r + 1) * c]);
        } else {
            // x.mean(dim=-2): sum the streams in order, then divide.
            h.copy_from_slice(&ws.x[r * ns * c..r * ns * c + c]);
            for s in 1..ns {
                let xs = &ws.x[(r * ns + s) * c..(r * ns + s + 1) * c];
                h.iter_mut().zip(xs).for_each(|(a, b)| *a += b);
            }
            h.iter_mut().for_each(|a| *a /= ns as f32);
        }
        math::rmsnorm_inplace(h, &model.norm, cfg.norm_eps);
    }
    st.mark(Section::Embed);
    Ok(nout)
}

/// Logits `nout × vocab` of the normed rows `h`, with the vocabulary split over the team.
fn head(st: &mut Step, nout: usize) -> Result<Vec<f32>> {
    let model = st.model;
    let (c, v) = (model.cfg.n_embd, model.cfg.vocab_size);
    let ws = &mut *st.ws;
    let team = &mut *st.team;
    let mut logits =
        crate::error::try_zeroed(crate::error::checked_len(nout, v, "logits")?, "logits")?;
    let out = SendPtr::new(&mut logits);
    let h = &ws.h[..nout * c];
    match &model.head {
        Head::F32(w) => {
            let w = match (w, &model.tok_emb) {
                (Some(w), _) => w.as_slice(),
                (None, super::Emb::F32(e)) => e.as_slice(),
                (None, super::Emb::F16(_)) => unreachable!("an f32 head widens the embedding"),
            };
            team.run(v, HEAD_CHUNK, |_, lo, hi| {
                // SAFETY: this thread writes only columns lo..hi of the nout × v output.
                unsafe { math::matvec_rows_f32(w, c, lo, hi, h, nout, out.ptr(), v) };
            })?;
        }
        Head::F16(w) => {
            let w = match (w, &model.tok_emb) {
                (Some(w), _) => w.as_slice(),
                (None, super::Emb::F16(e)) => e.as_slice(),
                (None, super::Emb::F32(_)) => {
                    unreachable!("a tied fp16 head shares an fp16 embedding")
                }
            };
            team.run(v, HEAD_CHUNK, |_, lo, hi| {
                // SAFETY: this thread writes only columns lo..hi of the nout × v output.
                unsafe { math::matvec_rows_f16(w, c, lo, hi, h, nout, out.ptr(), v) };
            })?;
        }
        Head::Int8 { q, scale } => {
            grow(&mut ws.hq, nout * c)?;
            grow(&mut ws.hs, nout)?;
            for i in 0..nout {
                ws.hs[i] =
                    math::quantize_row(&h[i * c..(i + 1) * c], &mut ws.hq[i * c..(i + 1) * c]);
            }
            let (hq, hs) = (&ws.hq, &ws.hs);
            team.run(v, HEAD_CHUNK, |_, lo, hi| {
                for r in lo..hi {
                    let wr = &q[r * c..(r + 1) * c];
                    for i in 0..nout {
                        let acc = math::dot_i8(wr, &hq[i * c..(i + 1) * c]);
                        // SAFETY: this thread writes only columns lo..hi.
                        unsafe { *out.ptr().add(i * v + r) = acc as f32 * (scale[r] * hs[i]) };
                    }
                }
            })?;
        }
    }
    st.mark(Section::Head);
    Ok(logits)
}

// SAFETY: the raw cache pointers are only read during the attention job, while the sessions
// are borrowed mutably by `forward` and nobody else can write them; a `Seg` left in the
// workspace between calls is never dereferenced (the table is rebuilt per layer before use).
unsafe impl Sync for Seg {}
// SAFETY: as for `Sync` above.
unsafe impl Send for Seg {}

/// Which buffer a GEMM writes.
#[derive(Clone, Copy)]
enum Out {
    Qkv,
    Y,
    Gu,
}

/// `out = (xq · Wᵀ) · row_scale · xs` over the team: weight rows split in 32-row units, each
/// thread calling the kernel single-threaded on its row range.
fn gemm(st: &mut Step, w: &Fused, which: Out) -> Result<()> {
    let (n, kernel) = (st.n, st.model.kernel);
    let ws = &mut *st.ws;
    let team = &mut *st.team;
    let rows = w.rows;
    let cols = w.cols;
    let rb = cols / 4;
    let out = match which {
        Out::Qkv => SendPtr::new(&mut ws.qkv),
        Out::Y => SendPtr::new(&mut ws.y),
        Out::Gu => SendPtr::new(&mut ws.gu),
    };
    let xq = &ws.xq[..n * cols];
    let xs = &ws.xs[..n];
    let th = SendPtr::new(&mut ws.threads);
    // Work items are chunks of whole 32-row tiles. One activation row (decode): ~4 chunks per
    // thread (stealing granularity vs per-call overhead; the weights stream from memory once
    // anyway). Several rows (prefill, batches): chunks of ~48 KiB of weights, which stay in L1/L2
    // while every block of ACT_BLOCK activation rows passes over them.
    let chunk = if n == 1 && team.threads() == 1 {
        rows // one call: the kernel's prefetch runs on across what would be item boundaries
    } else if n == 1 {
        rows.div_ceil(4 * team.threads()).div_ceil(32).max(1) * 32
    } else {
        (GEMM_CHUNK_BYTES / rb / 32).max(1) * 32
    };
    let act_block = if kernel == Kernel::Amx {
        ACT_BLOCK_AMX
    } else {
        ACT_BLOCK
    };
    // Each block of activation rows is prepared for the kernel once, here, and shared by every
    // work item (preparing per item cost ~10% of a prefill).
    let blocks = (0..n)
        .step_by(act_block)
        .map(|i0| {
            let nb = act_block.min(n - i0);
            kernel.prepare(&xq[i0 * cols..(i0 + nb) * cols], nb, cols)
        })
        .collect::<Result<Vec<_>>>()?;
    // A job cannot return an error: the first kernel error is kept here.
    let err: Mutex<Option<Error>> = Mutex::new(None);
    team.run(rows, chunk, |t, lo, hi| {
        let m = hi - lo;
        // SAFETY: thread t alone uses scratch t.
        let ts = unsafe { &mut th.slice(t, t + 1)[0] };
        let r = TernaryView::new(&w.qs[lo * rb..hi * rb], m, cols, 1.0).and_then(|view| {
            let mut i0 = 0;
            for p in &blocks {
                let nb = p.n();
                kernels::gemm_i32_prepared(&view, p, &mut ts.acc[i0 * m..(i0 + nb) * m], 1)?;
                i0 += nb;
            }
            Ok(())
        });
        let acc = &ts.acc[..n * m];
        if let Err(e) = r {
            *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            return;
        }
        for i in 0..n {
            // SAFETY: columns lo..hi of row i belong to this thread.
            let o = unsafe { out.slice(i * rows + lo, i * rows + hi) };
            let a = &acc[i * m..(i + 1) * m];
            let s = &w.row_scale[lo..hi];
            for ((o, &a), &s) in o.iter_mut().zip(a).zip(s) {
                *o = a as f32 * (s * xs[i]);
            }
        }
    })?;
    if let Some(e) = err.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Src {
    /// The sublayer input: `x` (standard) or `u` (mHC).
    X,
    U,
    Att,
}

/// `a = rmsnorm(src, w)`, `xq, xs = quantize(a)` per row (width C).
fn norm_quant_rows(st: &mut Step, src: Src, w: &[f32]) -> Result<()> {
    let eps = st.model.cfg.norm_eps;
    let c = w.len();
    let ws = &mut *st.ws;
    let srcbuf: &[f32] = match src {
        Src::X => &ws.x,
        Src::U => &ws.u,
        Src::Att => &ws.att,
    };
    let a = SendPtr::new(&mut ws.a);
    let xq = SendPtr::new(&mut ws.xq);
    let xs = SendPtr::new(&mut ws.xs);
    rows_par(st.team, st.n, |r0, r1| {
        for r in r0..r1 {
            // SAFETY: disjoint rows per thread.
            let ar = unsafe { a.slice(r * c, (r + 1) * c) };
            math::rmsnorm(ar, &srcbuf[r * c..(r + 1) * c], w, eps);
            // SAFETY: disjoint rows per thread.
            let q = unsafe { xq.slice(r * c, (r + 1) * c) };
            // SAFETY: disjoint rows per thread.
            unsafe { xs.slice(r, r + 1)[0] = math::quantize_row(ar, q) };
        }
    })
}

/// Before a sublayer: mHC mappings and `u = H_pre·x` (mHC), then the pre-norm and quantization.
fn pre_sublayer(st: &mut Step, mhc: Option<&MhcParams>, norm_w: &[f32]) -> Result<()> {
    match mhc {
        None => norm_quant_rows(st, Src::X, norm_w)?,
        Some(p) => {
            mhc_mappings(st, p)?;
            st.mark(Section::Mhc);
            norm_quant_rows(st, Src::U, norm_w)?;
        }
    }
    st.mark(Section::Norm);
    Ok(())
}

#[inline]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// Per row: `d = (φ · flat(x)) · rsqrt(mean(x²) + eps)`, `H_pre`, `H_post`, `H_res`, and
/// `u = Σ_i H_pre[i]·x_i` (as `StreamResidual.mappings` and its einsum).
fn mhc_mappings(st: &mut Step, p: &MhcParams) -> Result<()> {
    let model = st.model;
    let cfg = &model.cfg;
    let (ns, c) = (cfg.streams(), cfg.n_embd);
    let nr = cfg.n_res();
    let nd = 2 * ns + nr;
    let nc = ns * c;
    let eps = cfg.norm_eps;
    let ws = &mut *st.ws;
    let x = &ws.x;
    let u = SendPtr::new(&mut ws.u);
    let hpre = SendPtr::new(&mut ws.hpre);
    let hpost = SendPtr::new(&mut ws.hpost);
    let hres = SendPtr::new(&mut ws.hres);
    let dyn_ = SendPtr::new(&mut ws.dyn_);
    let basis = &model.basis;
    let residual = cfg.residual;
    let iters = cfg.sinkhorn_iters;
    let err: Mutex<Option<Error>> = Mutex::new(None);
    rows_par(st.team, st.n, |r0, r1| {
        for r in r0..r1 {
            let flat = &x[r * nc..(r + 1) * nc];
            let rms = 1.0 / (math::dot(flat, flat) / nc as f32 + eps).sqrt();
            // SAFETY: disjoint rows per thread for every buffer below.
            let d = unsafe { dyn_.slice(r * nd, (r + 1) * nd) };
            for (k, dk) in d.iter_mut().enumerate() {
                *dk = math::dot(&p.proj[k * nc..(k + 1) * nc], flat) * rms;
            }
            // SAFETY: disjoint rows per thread.
            let pre = unsafe { hpre.slice(r * ns, (r + 1) * ns) };
            // SAFETY: disjoint rows per thread.
            let post = unsafe { hpost.slice(r * ns, (r + 1) * ns) };
            for i in 0..ns {
                pre[i] = sigmoid(p.pre_bias[i] + p.alpha[0] * d[i]);
                post[i] = 2.0 * sigmoid(p.post_bias[i] + p.alpha[1] * d[ns + i]);
            }
            let logits = &mut d[2 * ns..];
            for (l, &b) in logits.iter_mut().zip(&p.res_logits) {
                *l = b + p.alpha[2] * *l;
            }
            // SAFETY: disjoint rows per thread.
            let h = unsafe { hres.slice(r * ns * ns, (r + 1) * ns * ns) };
            match residual {
                Residual::MhcLite => {
                    let m = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut s = 0f32;
                    for l in logits.iter_mut() {
                        *l = (*l - m).exp();
                        s += *l;
                    }
                    h.fill(0.0);
                    for (k, l) in logits.iter().enumerate() {
                        let wk = l / s;
                        let bk = &basis[k * ns * ns..(k + 1) * ns * ns];
                        for (hv, &b) in h.iter_mut().zip(bk) {
                            *hv += wk * b;
                        }
                    }
                }
                Residual::Mhc => {
                    if let Err(e) = crate::mhc::sinkhorn_forward::<f32>(logits, ns, iters, h, 1) {
                        *err.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    }
                }
                Residual::Standard => {}
            }
            // SAFETY: disjoint rows per thread.
            let ur = unsafe { u.slice(r * c, (r + 1) * c) };
            ur.fill(0.0);
            for (i, &w) in pre.iter().enumerate() {
                math::axpy(ur, w, &flat[i * c..(i + 1) * c]);
            }
        }
    })?;
    if let Some(e) = err.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    Ok(())
}

/// After a sublayer with output `y`: `x += y` (standard) or `x = H_res·x + H_postᵀ·y` (mHC).
fn post_sublayer(st: &mut Step, mhc: Option<&MhcParams>) -> Result<()> {
    let cfg = &st.model.cfg;
    let (ns, c, n) = (cfg.streams(), cfg.n_embd, st.n);
    let ws = &mut *st.ws;
    if mhc.is_none() {
        let y = &ws.y[..n * c];
        ws.x[..n * c].iter_mut().zip(y).for_each(|(x, y)| *x += y);
        return Ok(());
    }
    let nc = ns * c;
    let x = SendPtr::new(&mut ws.x);
    let xn = SendPtr::new(&mut ws.xn);
    let (y, hres, hpost) = (&ws.y, &ws.hres, &ws.hpost);
    rows_par(st.team, n, |r0, r1| {
        for r in r0..r1 {
            // SAFETY: disjoint rows per thread.
            let xr = unsafe { x.slice(r * nc, (r + 1) * nc) };
            // SAFETY: disjoint rows per thread.
            let xnr = unsafe { xn.slice(r * nc, (r + 1) * nc) };
            let yr = &y[r * c..(r + 1) * c];
            let h = &hres[r * ns * ns..(r + 1) * ns * ns];
            for i in 0..ns {
                let o = &mut xnr[i * c..(i + 1) * c];
                o.fill(0.0);
                for j in 0..ns {
                    math::axpy(o, h[i * ns + j], &xr[j * c..(j + 1) * c]);
                }
                math::axpy(o, hpost[r * ns + i], yr);
            }
            xr.copy_from_slice(xnr);
        }
    })
}

// The model is shared across threads (the server), sessions move between them.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    send_sync::<Model>();
    send::<Session>();
};
