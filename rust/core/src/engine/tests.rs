//! Engine tests against a naive full-recompute reference written from the model's math
//! (no cache, no fusion, no threads, f64 where it costs nothing). The torch model is the
//! end-to-end reference (tests/test_engine.py); this is the Rust-side slow twin.

use super::*;
use crate::kernels::{ternary_linear, Kernel, TernaryMatrix};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn cfg(residual: Residual, mlp: MlpKind, qk_norm: bool, n_kv_head: usize) -> Config {
    Config {
        vocab_size: 97,
        seq_len: 64,
        n_layer: 2,
        n_head: 4,
        n_kv_head,
        n_embd: 256,
        mlp,
        mlp_hidden: 512,
        qk_norm,
        tie_embeddings: true,
        residual,
        n_streams: 3,
        sinkhorn_iters: 7,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
    }
}

fn randn(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Irwin–Hall approximation of a normal: plenty for test weights.
            let s: f32 = (0..4).map(|_| rng.random::<f32>()).sum();
            (s - 2.0) * std * 1.73
        })
        .collect()
}

fn ternary(rng: &mut StdRng, rows: usize, cols: usize) -> TernaryMatrix {
    let trits: Vec<i8> = (0..rows * cols)
        .map(|_| rng.random_range(-1i8..=1))
        .collect();
    let scale = rng.random_range(0.01f32..0.05);
    TernaryMatrix::from_trits(&trits, rows, cols, scale).unwrap()
}

fn f32t(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::F32 {
        data,
        shape: shape.to_vec(),
    }
}

fn weights(cfg: &Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (c, hd, kv, hid) = (cfg.n_embd, cfg.head_dim(), cfg.kv_dim(), cfg.mlp_hidden);
    let mut t = HashMap::new();
    let norm = |rng: &mut StdRng, n: usize| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(0.7f32..1.3)).collect()
    };
    t.insert(
        "wte.weight".into(),
        f32t(
            randn(&mut rng, cfg.vocab_size * c, 1.0),
            &[cfg.vocab_size, c],
        ),
    );
    t.insert("norm.weight".into(), f32t(norm(&mut rng, c), &[c]));
    if !cfg.tie_embeddings {
        t.insert(
            "lm_head.weight".into(),
            f32t(
                randn(&mut rng, cfg.vocab_size * c, 0.5),
                &[cfg.vocab_size, c],
            ),
        );
    }
    for i in 0..cfg.n_layer {
        let p = format!("blocks.{i}");
        let mut put = |name: &str, m: TernaryMatrix| {
            t.insert(format!("{p}.{name}"), Tensor::Ternary(m));
        };
        put("attn.q_proj.weight", ternary(&mut rng, c, c));
        put("attn.k_proj.weight", ternary(&mut rng, kv, c));
        put("attn.v_proj.weight", ternary(&mut rng, kv, c));
        put("attn.o_proj.weight", ternary(&mut rng, c, c));
        put("mlp.up_proj.weight", ternary(&mut rng, hid, c));
        put("mlp.down_proj.weight", ternary(&mut rng, c, hid));
        if cfg.mlp == MlpKind::SwiGlu {
            put("mlp.gate_proj.weight", ternary(&mut rng, hid, c));
        }
        for (name, n) in [
            ("attn_norm", c),
            ("mlp_norm", c),
            ("attn.sub_norm", c),
            ("mlp.sub_norm", hid),
        ] {
            t.insert(format!("{p}.{name}.weight"), f32t(norm(&mut rng, n), &[n]));
        }
        if cfg.qk_norm {
            for name in ["attn.q_norm", "attn.k_norm"] {
                t.insert(
                    format!("{p}.{name}.weight"),
                    f32t(norm(&mut rng, hd), &[hd]),
                );
            }
        }
        if cfg.residual != Residual::Standard {
            let (n, nr) = (cfg.n_streams, cfg.n_res());
            for sub in ["mhc_attn", "mhc_mlp"] {
                let q = format!("{p}.{sub}");
                t.insert(format!("{q}.pre_bias"), f32t(randn(&mut rng, n, 1.0), &[n]));
                t.insert(
                    format!("{q}.post_bias"),
                    f32t(randn(&mut rng, n, 1.0), &[n]),
                );
                t.insert(
                    format!("{q}.res_logits"),
                    f32t(randn(&mut rng, nr, 1.0), &[nr]),
                );
                t.insert(format!("{q}.alpha"), f32t(randn(&mut rng, 3, 0.5), &[3]));
                t.insert(
                    format!("{q}.proj"),
                    f32t(
                        randn(&mut rng, (2 * n + nr) * n * c, 0.05),
                        &[2 * n + nr, n * c],
                    ),
                );
            }
        }
    }
    t
}

/// An f32-head model: exact to the reference (the default head is f16).
fn model(cfg: &Config, seed: u64, threads: usize) -> Model {
    let opts = Options {
        threads,
        head: HeadPrecision::F32,
        ..Default::default()
    };
    Model::new(cfg.clone(), weights(cfg, seed), opts).unwrap()
}

// ----------------------------------------------------------------------------- naive reference

fn rms(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, g)| (*v as f64 * r) as f32 * g)
        .collect()
}

fn lin(m: &TernaryMatrix, x: &[f32]) -> Vec<f32> {
    let n = x.len() / m.cols;
    let mut out = vec![0f32; n * m.rows];
    ternary_linear(Kernel::Scalar, &m.view().unwrap(), x, n, &mut out, 1).unwrap();
    out
}

fn ter(t: &HashMap<String, Tensor>, name: &str) -> TernaryMatrix {
    match &t[name] {
        Tensor::Ternary(m) => m.clone(),
        _ => unreachable!(),
    }
}

fn fl(t: &HashMap<String, Tensor>, name: &str) -> Vec<f32> {
    match &t[name] {
        Tensor::F32 { data, .. } => data.clone(),
        _ => unreachable!(),
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// `(H_pre, H_post, H_res)` of one position's streams.
fn mhc_maps(
    cfg: &Config,
    t: &HashMap<String, Tensor>,
    p: &str,
    x: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = cfg.n_streams;
    let nc = x.len();
    let proj = fl(t, &format!("{p}.proj"));
    let alpha = fl(t, &format!("{p}.alpha"));
    let rmsv = 1.0
        / (x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / nc as f64 + cfg.norm_eps as f64)
            .sqrt();
    let d: Vec<f64> = proj
        .chunks_exact(nc)
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * rmsv
        })
        .collect();
    let pb = fl(t, &format!("{p}.pre_bias"));
    let qb = fl(t, &format!("{p}.post_bias"));
    let rl = fl(t, &format!("{p}.res_logits"));
    let pre: Vec<f64> = (0..n)
        .map(|i| sigmoid(pb[i] as f64 + alpha[0] as f64 * d[i]))
        .collect();
    let post: Vec<f64> = (0..n)
        .map(|i| 2.0 * sigmoid(qb[i] as f64 + alpha[1] as f64 * d[n + i]))
        .collect();
    let logits: Vec<f64> = rl
        .iter()
        .enumerate()
        .map(|(k, &b)| b as f64 + alpha[2] as f64 * d[2 * n + k])
        .collect();
    let mut h = vec![0f64; n * n];
    match cfg.residual {
        Residual::MhcLite => {
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let perms = crate::mhc::permutations(n).unwrap();
            for (k, p) in perms.chunks_exact(n).enumerate() {
                for (i, &j) in p.iter().enumerate() {
                    h[i * n + j] += e[k] / s;
                }
            }
        }
        Residual::Mhc => {
            // Literal log-domain Sinkhorn (rows then columns).
            let mut lp = logits.clone();
            for _ in 0..cfg.sinkhorn_iters {
                for i in 0..n {
                    let m = (0..n)
                        .map(|j| lp[i * n + j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let l = m + (0..n).map(|j| (lp[i * n + j] - m).exp()).sum::<f64>().ln();
                    (0..n).for_each(|j| lp[i * n + j] -= l);
                }
                for j in 0..n {
                    let m = (0..n)
                        .map(|i| lp[i * n + j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let l = m + (0..n).map(|i| (lp[i * n + j] - m).exp()).sum::<f64>().ln();
                    (0..n).for_each(|i| lp[i * n + j] -= l);
                }
            }
            h = lp.iter().map(|v| v.exp()).collect();
        }
        Residual::Standard => unreachable!(),
    }
    (pre, post, h)
}

/// Logits of every position of `toks` by full recomputation.
fn reference(cfg: &Config, t: &HashMap<String, Tensor>, toks: &[u32]) -> Vec<Vec<f32>> {
    let (c, hd, nh, nkv) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
    let ns = cfg.streams();
    let tn = toks.len();
    let eps = cfg.norm_eps;
    let emb = fl(t, "wte.weight");
    // x[pos][stream] : C
    let mut x: Vec<Vec<Vec<f32>>> = toks
        .iter()
        .map(|&k| vec![emb[k as usize * c..(k as usize + 1) * c].to_vec(); ns])
        .collect();
    for li in 0..cfg.n_layer {
        let p = format!("blocks.{li}");
        for sub in 0..2 {
            // sublayer input u per position
            let mut maps = Vec::new();
            let u: Vec<Vec<f32>> = x
                .iter()
                .map(|xs| {
                    if ns == 1 {
                        return xs[0].clone();
                    }
                    let flat: Vec<f32> = xs.concat();
                    let name = if sub == 0 { "mhc_attn" } else { "mhc_mlp" };
                    let (pre, post, h) = mhc_maps(cfg, t, &format!("{p}.{name}"), &flat);
                    let u = (0..c)
                        .map(|j| (0..ns).map(|i| pre[i] * xs[i][j] as f64).sum::<f64>() as f32)
                        .collect();
                    maps.push((post, h));
                    u
                })
                .collect();
            let y: Vec<Vec<f32>> = if sub == 0 {
                let a: Vec<f32> = u
                    .iter()
                    .flat_map(|r| rms(r, &fl(t, &format!("{p}.attn_norm.weight")), eps))
                    .collect();
                let q = lin(&ter(t, &format!("{p}.attn.q_proj.weight")), &a);
                let k = lin(&ter(t, &format!("{p}.attn.k_proj.weight")), &a);
                let v = lin(&ter(t, &format!("{p}.attn.v_proj.weight")), &a);
                let kvd = cfg.kv_dim();
                let rope = |vec: &mut [f32], pos: usize| {
                    let h2 = hd / 2;
                    for i in 0..h2 {
                        let f = (cfg.rope_theta.powf(-((2 * i) as f32 / hd as f32) as f64)) as f32;
                        let ang = (pos as f32 * f) as f64;
                        let (x0, x1) = (vec[i] as f64, vec[i + h2] as f64);
                        vec[i] = (x0 * ang.cos() - x1 * ang.sin()) as f32;
                        vec[i + h2] = (x1 * ang.cos() + x0 * ang.sin()) as f32;
                    }
                };
                let headify = |m: &[f32], w: usize, norm: Option<Vec<f32>>| -> Vec<Vec<Vec<f32>>> {
                    (0..tn)
                        .map(|pos| {
                            (0..w)
                                .map(|h| {
                                    let mut v = m
                                        [pos * w * hd + h * hd..pos * w * hd + (h + 1) * hd]
                                        .to_vec();
                                    if let Some(nw) = &norm {
                                        v = rms(&v, nw, eps);
                                    }
                                    v
                                })
                                .collect()
                        })
                        .collect()
                };
                let (qn, kn) = if cfg.qk_norm {
                    (
                        Some(fl(t, &format!("{p}.attn.q_norm.weight"))),
                        Some(fl(t, &format!("{p}.attn.k_norm.weight"))),
                    )
                } else {
                    (None, None)
                };
                let mut qh = headify(&q, nh, qn);
                let mut kh = headify(&k, nkv, kn);
                let vh = headify(&v, nkv, None);
                let _ = kvd;
                for pos in 0..tn {
                    qh[pos].iter_mut().for_each(|v| rope(v, pos));
                    kh[pos].iter_mut().for_each(|v| rope(v, pos));
                }
                let mut att = vec![0f32; tn * c];
                for pos in 0..tn {
                    for h in 0..nh {
                        let kv = h / (nh / nkv);
                        let s: Vec<f64> = (0..=pos)
                            .map(|j| {
                                qh[pos][h]
                                    .iter()
                                    .zip(&kh[j][kv])
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                                    / (hd as f64).sqrt()
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..hd {
                            att[pos * c + h * hd + d] = (0..=pos)
                                .map(|j| e[j] / z * vh[j][kv][d] as f64)
                                .sum::<f64>()
                                as f32;
                        }
                    }
                }
                let a: Vec<f32> = att
                    .chunks_exact(c)
                    .flat_map(|r| rms(r, &fl(t, &format!("{p}.attn.sub_norm.weight")), eps))
                    .collect();
                lin(&ter(t, &format!("{p}.attn.o_proj.weight")), &a)
                    .chunks_exact(c)
                    .map(|r| r.to_vec())
                    .collect()
            } else {
                let hid = cfg.mlp_hidden;
                let a: Vec<f32> = u
                    .iter()
                    .flat_map(|r| rms(r, &fl(t, &format!("{p}.mlp_norm.weight")), eps))
                    .collect();
                let up = lin(&ter(t, &format!("{p}.mlp.up_proj.weight")), &a);
                let h: Vec<f32> = match cfg.mlp {
                    MlpKind::SwiGlu => {
                        let g = lin(&ter(t, &format!("{p}.mlp.gate_proj.weight")), &a);
                        g.iter()
                            .zip(&up)
                            .map(|(g, u)| ((*g as f64 * sigmoid(*g as f64)) * *u as f64) as f32)
                            .collect()
                    }
                    MlpKind::Relu2 => up.iter().map(|u| u.max(0.0) * u.max(0.0)).collect(),
                };
                let h: Vec<f32> = h
                    .chunks_exact(hid)
                    .flat_map(|r| rms(r, &fl(t, &format!("{p}.mlp.sub_norm.weight")), eps))
                    .collect();
                lin(&ter(t, &format!("{p}.mlp.down_proj.weight")), &h)
                    .chunks_exact(c)
                    .map(|r| r.to_vec())
                    .collect()
            };
            for pos in 0..tn {
                if ns == 1 {
                    x[pos][0].iter_mut().zip(&y[pos]).for_each(|(a, b)| *a += b);
                } else {
                    let (post, h) = &maps[pos];
                    let old = x[pos].clone();
                    for i in 0..ns {
                        for j in 0..c {
                            let mut s = post[i] * y[pos][j] as f64;
                            for k in 0..ns {
                                s += h[i * ns + k] * old[k][j] as f64;
                            }
                            x[pos][i][j] = s as f32;
                        }
                    }
                }
            }
        }
    }
    let head = if cfg.tie_embeddings {
        emb
    } else {
        fl(t, "lm_head.weight")
    };
    x.iter()
        .map(|xs| {
            let m: Vec<f32> = (0..c)
                .map(|j| (xs.iter().map(|s| s[j] as f64).sum::<f64>() / ns as f64) as f32)
                .collect();
            let h = rms(&m, &fl(t, "norm.weight"), eps);
            head.chunks_exact(c)
                .map(|w| {
                    w.iter()
                        .zip(&h)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        })
        .collect()
}

fn max_err(a: &[f32], b: &[f32]) -> (f32, f32) {
    let e = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let s = b.iter().fold(0f32, |m, y| m.max(y.abs()));
    (e, s)
}

fn toks(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(0..vocab as u32)).collect()
}

#[test]
fn decode_matches_full_recompute_for_every_variant() {
    for residual in [Residual::Standard, Residual::MhcLite, Residual::Mhc] {
        for (mlp, qk, kvh) in [(MlpKind::SwiGlu, true, 2), (MlpKind::Relu2, false, 4)] {
            let cfg = cfg(residual, mlp, qk, kvh);
            let t = weights(&cfg, 7);
            let m = model(&cfg, 7, 2);
            let ids = toks(9, 3, cfg.vocab_size);
            let want = reference(&cfg, &t, &ids);
            let mut s = m.new_session(0);
            // prefill 4, then decode the rest one by one
            let got = m.forward(&mut [(&mut s, &ids[..4])], Logits::All).unwrap();
            let mut rows: Vec<Vec<f32>> = got
                .chunks_exact(cfg.vocab_size)
                .map(|r| r.to_vec())
                .collect();
            for &tk in &ids[4..] {
                rows.push(m.step(&mut s, &[tk]).unwrap());
            }
            assert_eq!(s.position(), ids.len());
            for (pos, (g, w)) in rows.iter().zip(&want).enumerate() {
                let (e, sc) = max_err(g, w);
                assert!(
                    e <= 5e-4 * sc + 1e-5,
                    "{residual:?} {mlp:?} qk={qk} pos {pos}: max err {e} (scale {sc})"
                );
            }
        }
    }
}

#[test]
fn untied_head_and_int8_head() {
    let mut c = cfg(Residual::Standard, MlpKind::SwiGlu, true, 4);
    c.tie_embeddings = false;
    let t = weights(&c, 11);
    let ids = toks(5, 1, c.vocab_size);
    let want = reference(&c, &t, &ids);
    let f32_head = Options {
        head: HeadPrecision::F32,
        ..Default::default()
    };
    let m = Model::new(c.clone(), t.clone(), f32_head).unwrap();
    let mut s = m.new_session(0);
    let got = m.forward(&mut [(&mut s, &ids)], Logits::All).unwrap();
    let (e, sc) = max_err(&got[4 * c.vocab_size..], &want[4]);
    assert!(e <= 2e-3 * sc + 1e-4);
    let opts = Options {
        head: HeadPrecision::Int8,
        ..Default::default()
    };
    let m8 = Model::new(c.clone(), t, opts).unwrap();
    let mut s = m8.new_session(0);
    let got = m8.step(&mut s, &ids).unwrap();
    let (e, sc) = max_err(&got, &want[4]);
    assert!(e <= 3e-2 * sc, "int8 head error {e} vs scale {sc}");
    let opts = Options {
        head: HeadPrecision::F16,
        ..Default::default()
    };
    let m16 = Model::new(c.clone(), weights(&c, 11), opts).unwrap();
    let mut s = m16.new_session(0);
    let got = m16.step(&mut s, &ids).unwrap();
    let (e, sc) = max_err(&got, &want[4]);
    assert!(e <= 2e-3 * sc, "f16 head error {e} vs scale {sc}");
}

#[test]
fn default_head_is_f16_and_the_head_is_held_once() {
    for tied in [true, false] {
        let mut c = cfg(Residual::Standard, MlpKind::SwiGlu, true, 4);
        c.tie_embeddings = tied;
        let bytes = |head: Option<HeadPrecision>| {
            let mut o = Options::default();
            if let Some(h) = head {
                o.head = h;
            }
            let m = Model::new(c.clone(), weights(&c, 3), o).unwrap();
            (m.head_precision(), m.weight_bytes())
        };
        let (h, b16) = bytes(None);
        assert_eq!(h, HeadPrecision::F16);
        let (_, b32) = bytes(Some(HeadPrecision::F32));
        let vc = c.vocab_size * c.n_embd;
        // tied: f32 reads the embedding itself (no copy), f16 adds only its 2-byte copy;
        // untied: the f16 head replaces the 4-byte one (no f32 head kept beside it).
        let want = if tied { b32 + 2 * vc } else { b32 - 2 * vc };
        assert_eq!(b16, want, "tied = {tied}");
    }
}

/// A float16 embedding (a GGUF's `token_embd`) tied to the f16 head is kept once, in f16, for
/// both the lookups and the head: the logits equal, bit for bit, those of the same values given
/// as f32 (widened exactly), with the f32 embedding's 4 bytes per value gone.
#[test]
fn f16_embedding_is_shared_by_a_tied_f16_head() {
    let c = cfg(Residual::MhcLite, MlpKind::SwiGlu, true, 2);
    let mut t = weights(&c, 6);
    let Some(Tensor::F32 { data, shape }) = t.remove("wte.weight") else {
        panic!("wte")
    };
    let bits: Vec<u16> = data
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let widened: Vec<f32> = bits
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect();
    let with = |wte: Tensor, head| {
        let mut t = t.clone();
        t.insert("wte.weight".into(), wte);
        let o = Options {
            head,
            threads: 1,
            ..Default::default()
        };
        Model::new(c.clone(), t, o).unwrap()
    };
    let ids = toks(9, 5, c.vocab_size);
    let run = |m: &Model| m.step(&mut m.new_session(0), &ids).unwrap();
    let f16_data = || Tensor::F16 {
        data: bits.clone(),
        shape: shape.clone(),
    };
    let f32_data = || Tensor::F32 {
        data: widened.clone(),
        shape: shape.clone(),
    };
    let vc = c.vocab_size * c.n_embd;
    for head in [HeadPrecision::F16, HeadPrecision::F32, HeadPrecision::Int8] {
        let (a, b) = (with(f16_data(), head), with(f32_data(), head));
        assert_eq!(run(&a), run(&b), "{head:?}");
        let saved = if head == HeadPrecision::F16 {
            4 * vc
        } else {
            0
        };
        assert_eq!(a.weight_bytes() + saved, b.weight_bytes(), "{head:?}");
    }
}

#[test]
fn fp16_kv_cache_is_close() {
    let c = cfg(Residual::MhcLite, MlpKind::SwiGlu, true, 2);
    let t = weights(&c, 21);
    let ids = toks(12, 4, c.vocab_size);
    let want = reference(&c, &t, &ids);
    let opts = Options {
        kv: KvPrecision::F16,
        ..Default::default()
    };
    let m = Model::new(c.clone(), t, opts).unwrap();
    let mut s = m.new_session(0);
    m.step(&mut s, &ids[..5]).unwrap();
    for (pos, &tk) in ids.iter().enumerate().skip(5) {
        let got = m.step(&mut s, &[tk]).unwrap();
        let (e, sc) = max_err(&got, &want[pos]);
        assert!(e <= 3e-2 * sc, "pos {pos}: fp16 KV error {e} vs scale {sc}");
    }
    assert_eq!(
        s.cache_bytes(),
        2 * 2 * 2 * CACHE_CHUNK.min(64) * c.kv_dim()
    );
}

#[test]
fn batched_equals_one_at_a_time_and_threads_agree() {
    let cfg = cfg(Residual::MhcLite, MlpKind::SwiGlu, true, 2);
    let m1 = model(&cfg, 5, 1);
    let m2 = model(&cfg, 5, 2);
    let prompts = [toks(3, 1, 97), toks(7, 2, 97), toks(1, 3, 97)];
    // one at a time, single thread
    let mut want = Vec::new();
    for p in &prompts {
        let mut s = m1.new_session(0);
        let mut out = vec![m1.step(&mut s, p).unwrap()];
        for k in 0..4u32 {
            out.push(m1.step(&mut s, &[k * 11 % 97]).unwrap());
        }
        want.push(out);
    }
    // together: batched prefill of all three, then batched decode
    let mut ss: Vec<Session> = (0..3).map(|_| m2.new_session(0)).collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    {
        let mut b: Vec<(&mut Session, &[u32])> = ss
            .iter_mut()
            .zip(&prompts)
            .map(|(s, p)| (s, p.as_slice()))
            .collect();
        let l = m2.forward(&mut b, Logits::Last).unwrap();
        for (i, r) in l.chunks_exact(97).enumerate() {
            got[i].push(r.to_vec());
        }
    }
    for k in 0..4u32 {
        let tk = [k * 11 % 97];
        let mut b: Vec<(&mut Session, &[u32])> = ss.iter_mut().map(|s| (s, &tk[..])).collect();
        let l = m2.forward(&mut b, Logits::Last).unwrap();
        for (i, r) in l.chunks_exact(97).enumerate() {
            got[i].push(r.to_vec());
        }
    }
    // Per-row arithmetic does not depend on the batch or the thread count: bit-identical.
    assert_eq!(got, want);
}

#[test]
fn fork_decodes_like_a_fresh_prefill_and_is_independent() {
    for kv in [KvPrecision::F32, KvPrecision::F16] {
        let c = cfg(Residual::MhcLite, MlpKind::SwiGlu, true, 2);
        let opts = Options {
            kv,
            threads: 1,
            ..Default::default()
        };
        let m = Model::new(c.clone(), weights(&c, 9), opts).unwrap();
        let prompt = toks(6, 2, c.vocab_size);
        let (ta, tb) = ([5u32, 17, 40], [80u32, 3]);
        // the reference: a fresh prefill per continuation
        let fresh = |cont: &[u32]| -> Vec<Vec<f32>> {
            let mut s = m.new_session(0);
            m.step(&mut s, &prompt).unwrap();
            cont.iter()
                .map(|&t| m.step(&mut s, &[t]).unwrap())
                .collect()
        };
        let mut parent = m.new_session(0);
        m.step(&mut parent, &prompt).unwrap();
        let mut a = parent.fork().unwrap();
        let mut b = parent.fork().unwrap();
        assert_eq!((a.position(), a.cache_bytes()), (6, parent.cache_bytes()));
        // interleaved decodes: a fork that shared memory with its sibling would diverge
        let mut got_a = Vec::new();
        let mut got_b = Vec::new();
        for i in 0..3 {
            got_a.push(m.step(&mut a, &[ta[i]]).unwrap());
            if i < 2 {
                got_b.push(m.step(&mut b, &[tb[i]]).unwrap());
            }
        }
        assert_eq!(got_a, fresh(&ta), "{kv:?}");
        assert_eq!(got_b, fresh(&tb), "{kv:?}");
        assert_eq!(parent.position(), 6);
        assert_eq!(m.step(&mut parent, &[ta[0]]).unwrap(), fresh(&ta[..1])[0]);
    }
}

/// Every kernel gives the scalar kernel's logits bit for bit (the integer products are exact and
/// the rest is the same code), for a 40-token prefill (where `amx` uses its tiles: n ≥ 16, in
/// one call, ragged) and a batched decode of 17 sessions.
#[test]
fn every_kernel_matches_scalar_on_prefill_and_wide_batches() {
    let c = cfg(Residual::Standard, MlpKind::SwiGlu, true, 2);
    let build = |kernel| {
        let o = Options {
            threads: 2,
            kernel: Some(kernel),
            ..Default::default()
        };
        Model::new(c.clone(), weights(&c, 4), o).unwrap()
    };
    let run = |m: &Model| {
        let mut s = m.new_session(0);
        let mut out = m
            .forward(&mut [(&mut s, &toks(40, 8, c.vocab_size))], Logits::All)
            .unwrap();
        let mut ss: Vec<Session> = (0..17).map(|_| m.new_session(0)).collect();
        let tk: Vec<[u32; 1]> = (0..17u32).map(|i| [i * 5 % 97]).collect();
        let mut b: Vec<(&mut Session, &[u32])> =
            ss.iter_mut().zip(&tk).map(|(s, t)| (s, &t[..])).collect();
        out.extend(m.forward(&mut b, Logits::Last).unwrap());
        out
    };
    let want = run(&build(Kernel::Scalar));
    for k in Kernel::available() {
        assert_eq!(run(&build(k)), want, "{}", k.name());
    }
}

#[test]
fn bad_inputs_are_errors_and_leave_sessions_alone() {
    let cfg = cfg(Residual::Standard, MlpKind::Relu2, false, 4);
    let m = model(&cfg, 1, 2);
    let mut s = m.new_session(8);
    let e = m.step(&mut s, &[97]).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    assert!(m.step(&mut s, &[]).is_err());
    m.step(&mut s, &[1, 2, 3, 4, 5, 6]).unwrap();
    let e = m.step(&mut s, &[1, 2, 3]).unwrap_err();
    assert!(e.to_string().contains("context overflow"), "{e}");
    assert_eq!(s.position(), 6);
    m.step(&mut s, &[1, 2]).unwrap();
    assert!(m.step(&mut s, &[1]).is_err());
    // a session of another model
    let other = model(&cfg, 1, 1);
    let mut so = other.new_session(0);
    assert!(m
        .step(&mut so, &[1])
        .unwrap_err()
        .to_string()
        .contains("another model"));
    // reset and truncate
    s.reset();
    assert_eq!(s.position(), 0);
    m.step(&mut s, &[1, 2, 3]).unwrap();
    s.truncate(1).unwrap();
    assert!(s.truncate(2).is_err());
}

#[test]
fn weight_errors_name_the_tensor() {
    let c = cfg(Residual::Mhc, MlpKind::SwiGlu, true, 2);
    let mut t = weights(&c, 1);
    t.remove("blocks.1.mlp.gate_proj.weight");
    let e = Model::new(c.clone(), t, Options::default()).err().unwrap();
    assert!(
        e.to_string().contains("blocks.1.mlp.gate_proj.weight"),
        "{e}"
    );
    let mut t = weights(&c, 1);
    t.insert("norm.weight".into(), f32t(vec![1.0; 10], &[10]));
    let e = Model::new(c.clone(), t, Options::default()).err().unwrap();
    assert!(e.to_string().contains("norm.weight"), "{e}");
    let mut t = weights(&c, 1);
    t.insert(
        "blocks.0.attn.q_proj.weight".into(),
        f32t(vec![0.0; 4], &[2, 2]),
    );
    assert!(Model::new(c.clone(), t, Options::default()).is_err());
    let mut t = weights(&c, 1);
    t.insert("blocks.9.extra".into(), f32t(vec![0.0; 4], &[4]));
    let e = Model::new(c.clone(), t, Options::default()).err().unwrap();
    assert!(e.to_string().contains("unexpected"), "{e}");
}

#[test]
fn absurd_sizes_and_thread_counts_are_errors_before_allocating() {
    let c = cfg(Residual::Standard, MlpKind::SwiGlu, false, 2);
    // More layers than the weights can hold: refused before anything is sized by n_layer.
    for n_layer in [1000usize, 4096] {
        let big = Config {
            n_layer,
            ..c.clone()
        };
        let e = Model::new(big, weights(&c, 1), Options::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("n_layer"), "{e}");
        assert!(e.to_string().contains("weights"), "{e}");
    }
    // Beyond any real model: refused by the config check itself.
    for n_layer in [4097usize, 1 << 40, usize::MAX] {
        let big = Config {
            n_layer,
            ..c.clone()
        };
        let e = Model::new(big, weights(&c, 1), Options::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("above the limit"), "{e}");
    }
    for threads in [
        crate::kernels::max_threads() + 1,
        100_000,
        1 << 40,
        usize::MAX,
    ] {
        let opts = Options {
            threads,
            ..Default::default()
        };
        let e = Model::new(c.clone(), weights(&c, 1), opts).err().unwrap();
        assert!(e.to_string().contains("threads requested"), "{e}");
    }
    let m = model(&c, 1, 1);
    for n in [100_000usize, 1 << 40, usize::MAX] {
        assert!(m.set_threads(n).is_err());
    }
    assert_eq!(m.threads(), 1);
    m.set_threads(2).unwrap();
    assert_eq!(m.threads(), 2);
}

#[test]
fn profile_counts_sections() {
    let c = cfg(Residual::MhcLite, MlpKind::SwiGlu, true, 2);
    let opts = Options {
        profile: true,
        threads: 2,
        ..Default::default()
    };
    let m = Model::new(c.clone(), weights(&c, 1), opts).unwrap();
    let mut s = m.new_session(0);
    m.step(&mut s, &[1, 2, 3]).unwrap();
    m.step(&mut s, &[4]).unwrap();
    let p = m.profile(true);
    assert_eq!(p.calls, 2);
    assert_eq!(p.rows, 4);
    // No assertion on the durations themselves (a busy machine or a coarse clock makes any
    // bound flaky): only that every section is reported with a sane value.
    assert!(p.enabled);
    assert_eq!(p.entries().len(), p.seconds.len());
    assert!(p
        .seconds
        .iter()
        .chain([&p.total])
        .all(|s| s.is_finite() && *s >= 0.0));
    assert_eq!(m.profile(false).calls, 0);
    // Profiling off: the counters stay at zero.
    let m = Model::new(c.clone(), weights(&c, 1), Options::default()).unwrap();
    let mut s = m.new_session(0);
    m.step(&mut s, &[1, 2, 3]).unwrap();
    let p = m.profile(false);
    assert!(!p.enabled);
    assert_eq!((p.calls, p.rows), (0, 0));
    assert!(p.seconds.iter().all(|&s| s == 0.0));
}
