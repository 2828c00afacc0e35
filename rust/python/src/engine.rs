//! Bindings for the Rust inference engine: `EngineModel` (weights, thread count) and
//! `EngineSession` (one sequence's KV cache).
//!
//! `EngineModel(config, weights, threads=0, kernel=None, head="f16", kv="f32", profile=False)`:
//!
//! * `config`: a dict with `GPTConfig`'s fields (`GPTConfig.to_dict()`): `vocab_size`, `seq_len`,
//!   `n_layer`, `n_head`, `n_kv_head`, `n_embd`, `mlp` ("swiglu" | "relu2"), `mlp_hidden`,
//!   `qk_norm`, `tie_embeddings`, `residual` ("standard" | "mhc_lite" | "mhc"), `n_streams`,
//!   `sinkhorn_iters`, `rope_theta`, `norm_eps`, and optionally `quant` (must be "ternary") and
//!   `init_std` (ignored). Unknown keys are refused.
//! * `weights`: the torch model's `state_dict()` names. BitLinear weights
//!   (`blocks.N.attn.{q,k,v,o}_proj.weight`, `blocks.N.mlp.{gate,up,down}_proj.weight`) are
//!   `(packed uint8 (rows, cols/4), scale float)` tuples in the kernel layout (`ops.pack_ternary`
//!   or `_core.tq2_0_to_kernel_layout`); everything else is a float32 (or float16, widened
//!   exactly; a tied `wte.weight` read by an f16 head stays f16, the one copy for both) array of
//!   the state-dict shape: `wte.weight`, `norm.weight`, `lm_head.weight` (untied only),
//!   `blocks.N.{attn_norm,mlp_norm}.weight`, `blocks.N.attn.{sub_norm,q_norm,k_norm}.weight`,
//!   `blocks.N.mlp.sub_norm.weight`, `blocks.N.{mhc_attn,mhc_mlp}.{pre_bias,post_bias,
//!   res_logits,alpha,proj}`. Missing, unexpected or mis-shaped weights raise ValueError /
//!   ShapeError naming the tensor.
//! * `head`: "f16" (the default: an fp16 copy of the head, half the bytes read per token,
//!   ~1e-4 relative logit error, the same greedy tokens as f32 on a trained d20), "f32" (exact:
//!   the embedding itself when tied) or "int8" (per-row int8 copy and int8 activations: a
//!   quarter, ~1e-2).
//! * `kv`: KV cache element type, "f32" (exact, the default) or "f16" (half the memory and the
//!   attention's reads, which dominate decode at long contexts).
//!
//! Every compute call releases the GIL. Errors: token ids outside `[0, vocab)`, context
//! overflow (`position + len(tokens) > max_seq`), empty token lists and sessions of another
//! model raise ValueError and leave the sessions unchanged.

use crate::convert::{array_u8, f32_array, guarded, shape2, to_py_err};
use nanochat_core::engine::{
    Config, HeadPrecision, KvPrecision, Logits, MlpKind, Model, Options, Residual, Session, Tensor,
};
use nanochat_core::kernels::{Kernel, TernaryMatrix};
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::collections::HashMap;
use std::sync::Arc;

// The config keys the engine accepts: `GPTConfig`'s fields, generated from the schema.
use nanochat_core::engine::schema_gen::CONFIG_KEYS;

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    let v = d
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("config: missing key '{key}'")))?;
    let ty = v
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    v.extract::<T>()
        .map_err(|_| PyTypeError::new_err(format!("config: '{key}' has the wrong type ({ty})")))
}

fn parse_config(d: &Bound<'_, PyDict>) -> PyResult<Config> {
    for k in d.keys() {
        let k: String = k.extract()?;
        if !CONFIG_KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "config: unknown key '{k}' (known: {})",
                CONFIG_KEYS.join(", ")
            )));
        }
    }
    if let Some(q) = d.get_item("quant")? {
        let q: String = q.extract()?;
        if q != "ternary" {
            return Err(PyValueError::new_err(format!(
                "the Rust engine runs ternary models only (config quant = '{q}'); \
                 serve this model with the torch engine"
            )));
        }
    }
    let mlp = match get::<String>(d, "mlp")?.as_str() {
        "swiglu" => MlpKind::SwiGlu,
        "relu2" => MlpKind::Relu2,
        s => {
            return Err(PyValueError::new_err(format!(
                "config: mlp must be 'swiglu' or 'relu2', got '{s}'"
            )))
        }
    };
    let residual = match get::<String>(d, "residual")?.as_str() {
        "standard" => Residual::Standard,
        "mhc_lite" => Residual::MhcLite,
        "mhc" => Residual::Mhc,
        s => {
            return Err(PyValueError::new_err(format!(
                "config: residual must be 'standard', 'mhc_lite' or 'mhc', got '{s}'"
            )))
        }
    };
    Ok(Config {
        vocab_size: get(d, "vocab_size")?,
        seq_len: get(d, "seq_len")?,
        n_layer: get(d, "n_layer")?,
        n_head: get(d, "n_head")?,
        n_kv_head: get(d, "n_kv_head")?,
        n_embd: get(d, "n_embd")?,
        mlp,
        mlp_hidden: get(d, "mlp_hidden")?,
        qk_norm: get(d, "qk_norm")?,
        tie_embeddings: get(d, "tie_embeddings")?,
        residual,
        n_streams: get(d, "n_streams")?,
        sinkhorn_iters: get(d, "sinkhorn_iters")?,
        rope_theta: get(d, "rope_theta")?,
        norm_eps: get::<f64>(d, "norm_eps")? as f32,
    })
}

fn config_dict<'py>(py: Python<'py>, c: &Config) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("vocab_size", c.vocab_size)?;
    d.set_item("seq_len", c.seq_len)?;
    d.set_item("n_layer", c.n_layer)?;
    d.set_item("n_head", c.n_head)?;
    d.set_item("n_kv_head", c.n_kv_head)?;
    d.set_item("n_embd", c.n_embd)?;
    d.set_item(
        "mlp",
        match c.mlp {
            MlpKind::SwiGlu => "swiglu",
            MlpKind::Relu2 => "relu2",
        },
    )?;
    d.set_item("mlp_hidden", c.mlp_hidden)?;
    d.set_item("qk_norm", c.qk_norm)?;
    d.set_item("tie_embeddings", c.tie_embeddings)?;
    d.set_item(
        "residual",
        match c.residual {
            Residual::Standard => "standard",
            Residual::MhcLite => "mhc_lite",
            Residual::Mhc => "mhc",
        },
    )?;
    d.set_item("n_streams", c.n_streams)?;
    d.set_item("sinkhorn_iters", c.sinkhorn_iters)?;
    d.set_item("rope_theta", c.rope_theta)?;
    d.set_item("norm_eps", c.norm_eps as f64)?;
    Ok(d)
}

fn parse_tensor(name: &str, v: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    if let Ok(t) = v.cast::<PyTuple>() {
        if t.len() != 2 {
            return Err(PyTypeError::new_err(format!(
                "weights['{name}']: a ternary weight is a (packed uint8 array, scale) pair, \
                 got a tuple of {}",
                t.len()
            )));
        }
        let packed = t.get_item(0)?;
        let arr = array_u8(&packed, &format!("weights['{name}'][0]"))?;
        let (rows, rb) = shape2(arr.shape(), &format!("weights['{name}'][0]"))?;
        let scale: f32 = t.get_item(1)?.extract().map_err(|_| {
            PyTypeError::new_err(format!("weights['{name}'][1]: the scale must be a float"))
        })?;
        return Ok(Tensor::Ternary(TernaryMatrix {
            rows,
            cols: rb * 4,
            scale,
            qs: arr.as_slice()?.to_vec(),
        }));
    }
    // float16 (a GGUF's token_embd, memory-mapped): its bits, through a uint16 view (no copy).
    let is_f16 = v
        .getattr("dtype")
        .and_then(|d| d.getattr("str"))
        .and_then(|s| s.extract::<String>())
        .is_ok_and(|s| s == "<f2" || s == "=f2");
    if is_f16 {
        let bits = v.call_method1("view", ("uint16",))?;
        let arr = crate::convert::array_u16(&bits, &format!("weights['{name}']"))?;
        return Ok(Tensor::F16 {
            shape: arr.shape().to_vec(),
            data: arr.as_slice()?.to_vec(),
        });
    }
    let arr = f32_array(v, &format!("weights['{name}']"))?;
    Ok(Tensor::F32 {
        shape: arr.shape().to_vec(),
        data: arr.as_slice()?.to_vec(),
    })
}

fn tokens_arg(tokens: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let v: Vec<i64> = tokens.extract().map_err(|_| {
        PyTypeError::new_err("tokens: expected a sequence of ints (list or 1-D integer array)")
    })?;
    v.into_iter()
        .map(|t| {
            u32::try_from(t).map_err(|_| {
                PyValueError::new_err(format!(
                    "token id {t} is out of range (negative or too large)"
                ))
            })
        })
        .collect()
}

/// A ternary model loaded into the Rust engine (see the module docs for the arguments).
#[pyclass(name = "EngineModel", module = "nanochat._core", frozen)]
pub struct EngineModel {
    inner: Arc<Model>,
}

#[pymethods]
impl EngineModel {
    #[new]
    #[pyo3(signature = (config, weights, threads=0, kernel=None, head="f16", kv="f32", profile=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        config: &Bound<'_, PyDict>,
        weights: &Bound<'_, PyDict>,
        threads: usize,
        kernel: Option<&str>,
        head: &str,
        kv: &str,
        profile: bool,
    ) -> PyResult<Self> {
        nanochat_core::kernels::check_threads(threads, "EngineModel threads").map_err(to_py_err)?;
        let cfg = parse_config(config)?;
        cfg.validate().map_err(to_py_err)?;
        let mut t = HashMap::with_capacity(weights.len());
        for (k, v) in weights.iter() {
            let name: String = k
                .extract()
                .map_err(|_| PyTypeError::new_err("weights: keys must be str"))?;
            let tensor = parse_tensor(&name, &v)?;
            t.insert(name, tensor);
        }
        let kernel = match kernel {
            None | Some("auto") => None,
            Some(name) => Some(Kernel::from_name(name).map_err(to_py_err)?),
        };
        let head = HeadPrecision::from_name(head).map_err(to_py_err)?;
        let kv = KvPrecision::from_name(kv).map_err(to_py_err)?;
        let opts = Options {
            threads,
            kernel,
            head,
            kv,
            profile,
        };
        let model = py.detach(|| guarded(|| Model::new(cfg, t, opts)))?;
        Ok(Self {
            inner: Arc::new(model),
        })
    }

    /// A new empty session (KV cache) of at most `max_seq` positions (0 = the config's seq_len).
    #[pyo3(signature = (max_seq=0))]
    fn new_session(&self, max_seq: usize) -> EngineSession {
        EngineSession {
            sess: self.inner.new_session(max_seq),
            model: self.inner.clone(),
        }
    }

    /// Advance several sessions by one token each in one batched step; returns float32
    /// `(len(sessions), vocab)` logits. Sessions must be distinct and belong to this model.
    fn decode_batch<'py>(
        &self,
        py: Python<'py>,
        sessions: Vec<Bound<'py, EngineSession>>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let toks = tokens_arg(tokens)?;
        if toks.len() != sessions.len() {
            return Err(PyValueError::new_err(format!(
                "decode_batch: {} sessions but {} tokens",
                sessions.len(),
                toks.len()
            )));
        }
        let lists: Vec<Vec<u32>> = toks.into_iter().map(|t| vec![t]).collect();
        self.run(py, &sessions, lists, false)
    }

    /// General step: advance `sessions[i]` by `tokens[i]` (a list of ids each) in one batched
    /// forward. Returns float32 logits: `(len(sessions), vocab)` for the last position of each,
    /// or with `all_logits=True` `(total tokens, vocab)` for every new position in order.
    #[pyo3(signature = (sessions, tokens, all_logits=false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        sessions: Vec<Bound<'py, EngineSession>>,
        tokens: Vec<Bound<'py, PyAny>>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if tokens.len() != sessions.len() {
            return Err(PyValueError::new_err(format!(
                "forward: {} sessions but {} token lists",
                sessions.len(),
                tokens.len()
            )));
        }
        let lists = tokens
            .iter()
            .map(tokens_arg)
            .collect::<PyResult<Vec<_>>>()?;
        self.run(py, &sessions, lists, all_logits)
    }

    /// The config as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config_dict(py, self.inner.config())
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.config().vocab_size
    }

    /// Threads per forward step, borrowed from the crate's one thread team (a step that finds the
    /// team busy with another caller runs on its own thread).
    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// Set the threads per forward step (0 = NANOCHAT_THREADS or all cores; more than
    /// `max_threads()` raises ValueError).
    fn set_threads(&self, py: Python<'_>, n: usize) -> PyResult<()> {
        let m = self.inner.clone();
        py.detach(|| guarded(|| m.set_threads(n)))
    }

    /// Name of the ternary kernel in use.
    #[getter]
    fn kernel(&self) -> &'static str {
        self.inner.kernel().name()
    }

    /// "f32", "f16" or "int8".
    #[getter]
    fn head(&self) -> &'static str {
        self.inner.head_precision().name()
    }

    /// KV cache element type of new sessions: "f32" or "f16".
    #[getter]
    fn kv(&self) -> &'static str {
        self.inner.kv_precision().name()
    }

    /// Bytes of weights held in memory.
    #[getter]
    fn weight_bytes(&self) -> usize {
        self.inner.weight_bytes()
    }

    /// Cumulative seconds per section since the last reset (all zero unless built with
    /// `profile=True`), plus `calls`, `rows` and `total` (seconds inside forward calls).
    #[pyo3(signature = (reset=false))]
    fn profile<'py>(&self, py: Python<'py>, reset: bool) -> PyResult<Bound<'py, PyDict>> {
        let p = self.inner.profile(reset);
        let d = PyDict::new(py);
        for (k, v) in p.entries() {
            d.set_item(k, v)?;
        }
        d.set_item("calls", p.calls)?;
        d.set_item("rows", p.rows)?;
        d.set_item("total", p.total)?;
        d.set_item("enabled", p.enabled)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let c = self.inner.config();
        format!(
            "EngineModel(n_layer={}, n_embd={}, vocab_size={}, residual={:?}, kernel={}, threads={})",
            c.n_layer,
            c.n_embd,
            c.vocab_size,
            c.residual,
            self.inner.kernel().name(),
            self.inner.threads()
        )
    }
}

impl EngineModel {
    fn run<'py>(
        &self,
        py: Python<'py>,
        sessions: &[Bound<'py, EngineSession>],
        lists: Vec<Vec<u32>>,
        all_logits: bool,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        if sessions.is_empty() {
            return Err(PyValueError::new_err("need at least one session"));
        }
        let mut guards = Vec::with_capacity(sessions.len());
        for (i, s) in sessions.iter().enumerate() {
            let g = s.try_borrow_mut().map_err(|_| {
                PyValueError::new_err(format!(
                    "session {i} is listed twice or is in use by another thread"
                ))
            })?;
            if !Arc::ptr_eq(&g.model, &self.inner) {
                return Err(PyValueError::new_err(format!(
                    "session {i} belongs to another EngineModel"
                )));
            }
            guards.push(g);
        }
        let mut refs: Vec<&mut Session> = guards.iter_mut().map(|g| &mut g.sess).collect();
        let model = &*self.inner;
        let which = if all_logits {
            Logits::All
        } else {
            Logits::Last
        };
        let logits = py.detach(|| {
            guarded(|| {
                let mut batch: Vec<(&mut Session, &[u32])> = refs
                    .iter_mut()
                    .zip(&lists)
                    .map(|(s, t)| (&mut **s, t.as_slice()))
                    .collect();
                model.forward(&mut batch, which)
            })
        })?;
        let v = model.config().vocab_size;
        let rows = logits.len() / v;
        PyArray1::from_vec(py, logits).reshape([rows, v])
    }
}

/// One sequence's KV cache and position; created by `EngineModel.new_session`.
#[pyclass(name = "EngineSession", module = "nanochat._core")]
pub struct EngineSession {
    model: Arc<Model>,
    sess: Session,
}

#[pymethods]
impl EngineSession {
    /// Feed `tokens` (the prompt, or any continuation); returns float32 `(vocab,)` logits of
    /// the last position.
    fn prefill<'py>(
        &mut self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let toks = tokens_arg(tokens)?;
        self.step(py, toks)
    }

    /// Feed one token; returns float32 `(vocab,)` logits for the next.
    fn decode<'py>(&mut self, py: Python<'py>, token: i64) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let t = u32::try_from(token)
            .map_err(|_| PyValueError::new_err(format!("token id {token} is out of range")))?;
        self.step(py, vec![t])
    }

    /// Feed `tokens`; returns float32 `(len(tokens), vocab)` logits of every new position.
    fn forward_all<'py>(
        &mut self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let toks = tokens_arg(tokens)?;
        let (model, sess) = (&*self.model, &mut self.sess);
        let logits = py.detach(|| guarded(|| model.forward(&mut [(sess, &toks)], Logits::All)))?;
        let v = model.config().vocab_size;
        let rows = logits.len() / v;
        PyArray1::from_vec(py, logits).reshape([rows, v])
    }

    /// A new session of the same model holding a copy of this one's KV cache and position:
    /// prefill a prompt once, then fork it for each of `n` samples. The two are independent.
    fn fork(&self, py: Python<'_>) -> PyResult<EngineSession> {
        let sess = py.detach(|| guarded(|| self.sess.fork()))?;
        Ok(EngineSession {
            sess,
            model: self.model.clone(),
        })
    }

    /// Forget the sequence (the cache memory is kept for reuse).
    fn reset(&mut self) {
        self.sess.reset()
    }

    /// Rewind to `position` tokens.
    fn truncate(&mut self, position: usize) -> PyResult<()> {
        self.sess.truncate(position).map_err(to_py_err)
    }

    /// Tokens held (the position of the next token).
    #[getter]
    fn position(&self) -> usize {
        self.sess.position()
    }

    #[getter]
    fn max_seq(&self) -> usize {
        self.sess.max_seq()
    }

    /// Bytes held by the KV cache (it grows in steps of 256 positions).
    #[getter]
    fn cache_bytes(&self) -> usize {
        self.sess.cache_bytes()
    }

    fn __repr__(&self) -> String {
        format!(
            "EngineSession(position={}, max_seq={})",
            self.sess.position(),
            self.sess.max_seq()
        )
    }
}

impl EngineSession {
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        toks: Vec<u32>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let (model, sess) = (&*self.model, &mut self.sess);
        let logits = py.detach(|| guarded(|| model.step(sess, &toks)))?;
        Ok(PyArray1::from_vec(py, logits))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<EngineModel>()?;
    m.add_class::<EngineSession>()?;
    Ok(())
}
