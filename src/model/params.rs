//! The parameters of a GPT: their names (equal to the HF tensor names of a
//! `nanomoe_gpt` checkpoint), shapes and initialisation, and the store that owns them.
//!
//! `param_specs` is the single list of what a model with a given config holds. Random
//! init, checkpoint validation (missing / extra / mis-shaped tensors), saving and the
//! optimizer's decay groups all read it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::kernels::panels::{Elem, Panels};
use crate::quant::{QKind, QTensor};
use crate::weight::Mat;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal(f64),
    /// Truncated normal on [-2 std, 2 std] (torch.nn.init.trunc_normal_ as nanoMoE calls it).
    TruncNormal(f64),
    Zeros,
    Ones,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Every parameter of a GPT with this config, in a fixed order.
pub fn param_specs(c: &GPTConfig) -> Vec<ParamSpec> {
    let d = c.n_embd;
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, init: Init| out.push(ParamSpec { name, shape, init });
    // nanoGPT init: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2 n_layer))
    // (GPT-2 paper, sec. 2.3). Switch init: truncated normal, std sqrt(s / fan_in)
    // (Switch Transformer, Fedus et al. 2021, p. 10).
    let switch = |fan_in: usize| Init::TruncNormal((c.switch_tfm_init_scale / fan_in as f64).sqrt());
    let linear = |fan_in: usize| if c.use_switch_tfm_init { switch(fan_in) } else { Init::Normal(0.02) };
    let resid = |fan_in: usize| {
        if c.use_switch_tfm_init {
            switch(fan_in)
        } else {
            Init::Normal(0.02 / (2.0 * c.n_layer as f64).sqrt())
        }
    };
    // wte doubles as lm_head (a Linear), which nanoMoE initialises last.
    push("transformer.wte.weight".into(), vec![c.vocab_size, d], linear(d));
    push("transformer.wpe.weight".into(), vec![c.block_size, d], Init::Normal(0.02));
    // LayerNorm: weight (+ bias); RMSNorm: weight only.
    let ln = |push: &mut dyn FnMut(String, Vec<usize>, Init), p: String| {
        push(format!("{p}.weight"), vec![d], Init::Ones);
        if c.norm_bias() {
            push(format!("{p}.bias"), vec![d], Init::Zeros);
        }
    };
    for i in 0..c.n_layer {
        let p = format!("transformer.h.{i}");
        ln(&mut push, format!("{p}.ln_1"));
        push(format!("{p}.attn.c_attn.weight"), vec![3 * d, d], linear(d));
        if c.bias {
            push(format!("{p}.attn.c_attn.bias"), vec![3 * d], Init::Zeros);
        }
        push(format!("{p}.attn.c_proj.weight"), vec![d, d], resid(d));
        if c.bias {
            push(format!("{p}.attn.c_proj.bias"), vec![d], Init::Zeros);
        }
        ln(&mut push, format!("{p}.ln_2"));
        if c.is_moe_layer(i) {
            let e = c.n_exp;
            push(format!("{p}.mlp.router.w_g.weight"), vec![e, d], linear(d));
            if c.use_noisy_top_k {
                push(format!("{p}.mlp.router.w_noise.weight"), vec![e, d], linear(d));
            }
            if c.swiglu_experts() {
                // SwiGLU's gate, initialised as c_fc (the seed's Qwen3MLPExperts).
                push(format!("{p}.mlp.experts.gate_proj"), vec![e, d, 4 * d], linear(d));
            }
            push(format!("{p}.mlp.experts.c_fc"), vec![e, d, 4 * d], linear(d));
            push(format!("{p}.mlp.experts.c_proj"), vec![e, 4 * d, d], resid(4 * d));
            if c.bias && !c.swiglu_experts() {
                push(format!("{p}.mlp.experts.fc_bias"), vec![e, 1, 4 * d], Init::Zeros);
                push(format!("{p}.mlp.experts.proj_bias"), vec![e, 1, d], Init::Zeros);
            }
        } else {
            push(format!("{p}.mlp.c_fc.weight"), vec![4 * d, d], linear(d));
            if c.bias {
                push(format!("{p}.mlp.c_fc.bias"), vec![4 * d], Init::Zeros);
            }
            push(format!("{p}.mlp.c_proj.weight"), vec![d, 4 * d], resid(4 * d));
            if c.bias {
                push(format!("{p}.mlp.c_proj.bias"), vec![d], Init::Zeros);
            }
        }
    }
    ln(&mut push, "transformer.ln_f".into());
    out
}

/// Named, trainable parameters (candle `Var`s) in a fixed order.
/// The tensors inference may store in bf16: matrices (embeddings, attention, MLPs, experts),
/// not the router (nanoMoE keeps it in f32), biases or norms.
pub fn is_weight_matrix(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.contains(".router.") && !name.ends_with("_bias")
}

/// The tensors inference may quantize: the weight matrices whose rows (what a product sums
/// over) are a multiple of 32 long - not the position embedding, which is only looked up.
pub fn is_quantizable(name: &str, shape: &[usize]) -> bool {
    is_weight_matrix(name, shape.len()) && name != "transformer.wpe.weight" && shape.get(1).is_some_and(|k| k % crate::quant::BLOCK == 0)
}

/// Whether inference keeps a parameter `name` of this shape (f32, bf16 or f16) in panels:
/// the weight matrices (linear weights, expert stacks) but the position embedding, which is
/// only looked up.
pub fn is_packable(name: &str, shape: &[usize]) -> bool {
    let matrix = shape.len() == if is_expert_stack(name) { 3 } else { 2 };
    matrix && is_weight_matrix(name, shape.len()) && name != "transformer.wpe.weight" && shape.iter().all(|&d| d > 0)
}

/// [`is_packable`] for a tensor, which must also be f32, bf16 or f16.
pub fn packs(name: &str, t: &Tensor) -> bool {
    Elem::of(t.dtype()).is_some() && is_packable(name, t.dims())
}

/// A matrix [N, K], or an expert stack ([E, N, K] when `held_nk`, else nanoMoE's
/// [E, K, N]), in panels of its own type (f32, bf16 or f16).
pub fn pack_tensor(t: &Tensor, held_nk: bool) -> Result<Panels> {
    let t = if t.rank() == 3 && !held_nk { transposed_experts(t)? } else { t.contiguous()? };
    let (e, n, k) = panel_dims(t.dims()).ok_or_else(|| Error::Msg(format!("cannot pack a tensor of shape {:?}", t.dims())))?;
    let (storage, layout) = t.storage_and_layout();
    let start = layout.start_offset();
    // Each source row widened to f32 as it is packed (exact), without an f32 copy of the
    // whole tensor.
    fn from_rows<W: crate::kernels::matvec::Weight>(elem: Elem, w: &[W], (e, n, k): (usize, usize, usize)) -> Result<Panels> {
        let w = &w[..e * n * k];
        Panels::pack_as(
            elem,
            e,
            n,
            k,
            |e, i, out| {
                for (o, v) in out.iter_mut().zip(&w[(e * n + i) * k..(e * n + i + 1) * k]) {
                    *o = v.f();
                }
            },
            |_, _| {},
        )
    }
    match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(w)) => from_rows(Elem::F32, &w[start..], (e, n, k)),
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(w)) => from_rows(Elem::BF16, &w[start..], (e, n, k)),
        candle_core::Storage::Cpu(candle_core::CpuStorage::F16(w)) => from_rows(Elem::F16, &w[start..], (e, n, k)),
        _ => Err(Error::Msg(format!("cannot pack {:?} weights (f32, bf16 or f16 on the CPU)", t.dtype()))),
    }
}

/// (matrices, rows, cols) of a matrix [N, K] or a stack [E, N, K] as panels hold it.
pub fn panel_dims(shape: &[usize]) -> Option<(usize, usize, usize)> {
    match shape[..] {
        [n, k] => Some((1, n, k)),
        [e, n, k] => Some((e, n, k)),
        _ => None,
    }
}

/// Expert stacks are [E, K, N] as tensors and [E, N, K] when quantized.
pub fn is_expert_stack(name: &str) -> bool {
    name.contains(".mlp.experts.") && !name.ends_with("_bias")
}

/// The shape a quantized tensor stands for, in the tensors' layout.
fn logical_shape(name: &str, q: &QTensor) -> Vec<usize> {
    let mut s = q.shape.clone();
    if is_expert_stack(name) && s.len() == 3 {
        s.swap(1, 2);
    }
    s
}

/// An expert stack [E, K, N] as [E, N, K]: f32 by the blocked transpose kernel, one
/// expert per task (candle's strided copy took ~1 s for nano-MoE's 28 M expert weights).
fn transposed_experts(t: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (e, k, n) = t.dims3()?;
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return Ok(t.transpose(1, 2)?.contiguous()?);
    }
    let out = crate::kernels::with_f32(t, "inference layout", |w| {
        let mut out = vec![0f32; e * k * n];
        if k * n > 0 {
            out.par_chunks_mut(k * n).zip(w.par_chunks(k * n)).for_each(|(o, s)| crate::kernels::transpose::transpose(k, n, s, n, o, k));
        }
        Ok(out)
    })?;
    Ok(Tensor::from_vec(out, (e, n, k), t.device())?)
}

#[derive(Clone)]
pub struct ParamStore {
    vars: BTreeMap<String, Var>,
    /// Quantized weights (inference), by name; never also in `vars`.
    quant: BTreeMap<String, Arc<QTensor>>,
    /// Dense expert stacks held [E, N, K] for inference (see
    /// [`ParamStore::into_inference_layout`]); `get` still gives them as [E, K, N].
    nk: BTreeSet<String>,
    /// Weight matrices (f32, bf16, f16) packed for inference (see [`ParamStore::into_inference_layout`]),
    /// by name; never also in `vars`. `get` unpacks them.
    panels: BTreeMap<String, Arc<Panels>>,
    order: Vec<String>,
}

impl ParamStore {
    /// Random init following the specs, reproducible from `seed`.
    pub fn init(specs: &[ParamSpec], seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = Vec::with_capacity(specs.len());
        for s in specs {
            let n: usize = s.shape.iter().product();
            let data: Vec<f32> = match s.init {
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
                Init::Normal(std) => {
                    let dist = Normal::new(0.0f64, std).map_err(|e| Error::Msg(e.to_string()))?;
                    (0..n).map(|_| dist.sample(&mut rng) as f32).collect()
                }
                Init::TruncNormal(std) => {
                    let dist = Normal::new(0.0f64, std).map_err(|e| Error::Msg(e.to_string()))?;
                    (0..n)
                        .map(|_| loop {
                            let x = dist.sample(&mut rng);
                            if x.abs() <= 2.0 * std {
                                break x as f32;
                            }
                        })
                        .collect()
                }
            };
            tensors.push((s.name.clone(), Tensor::from_vec(data, s.shape.as_slice(), device)?));
        }
        Self::from_tensors(tensors)
    }

    /// Takes tensors as they are (any float dtype is converted to f32).
    pub fn from_tensors(tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| Ok((n, if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32)? })))
            .collect::<Result<Vec<_>>>()?;
        Self::from_tensors_keeping_dtype(tensors)
    }

    /// Takes tensors as they are, in their dtypes (variables are not copied).
    pub fn from_tensors_keeping_dtype(tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut vars = BTreeMap::new();
        let mut order = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            order.push(name.clone());
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(ParamStore { vars, quant: BTreeMap::new(), nk: BTreeSet::new(), panels: BTreeMap::new(), order })
    }

    /// Tensors, quantized and packed weights as they are, expert stacks [E, N, K] in all
    /// (GGUF's layout, the inference layout of [`ParamStore::into_inference_layout`]); f32
    /// matrices among the tensors are packed.
    pub fn from_parts(tensors: Vec<(String, Tensor)>, quantized: Vec<(String, QTensor)>, panels: Vec<(String, Panels)>) -> Result<Self> {
        let mut store = Self::from_tensors_keeping_dtype(tensors)?;
        store.nk = store.vars.iter().filter(|(n, v)| is_expert_stack(n) && v.rank() == 3).map(|(n, _)| n.clone()).collect();
        for (name, q) in quantized {
            store.order.push(name.clone());
            store.quant.insert(name, Arc::new(q));
        }
        store.with_panels(panels).into_panels()
    }

    /// Quantizes the tensors [`is_quantizable`] accepts to `kind`, freeing each original as
    /// it goes.
    pub fn into_quantized(self, kind: QKind) -> Result<Self> {
        let ParamStore { vars, mut quant, mut nk, panels, order } = self.into_unpanelled()?;
        let mut kept = BTreeMap::new();
        for (name, v) in vars {
            // Held [E, N, K] already (the inference layout) or [E, K, N]: quantized blocks
            // run along K either way, and whether K allows them is the logical shape's call.
            let held_nk = nk.contains(&name);
            let mut logical = v.dims().to_vec();
            if held_nk {
                logical.swap(1, 2);
            }
            if !is_quantizable(&name, &logical) {
                kept.insert(name, v);
                continue;
            }
            let t = v.as_tensor().to_dtype(DType::F32)?;
            drop(v);
            let t = if is_expert_stack(&name) && !held_nk { t.transpose(1, 2)?.contiguous()? } else { t };
            let shape = t.dims().to_vec();
            let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
            drop(t);
            nk.remove(&name);
            quant.insert(name, Arc::new(QTensor::quantize(kind, &data, shape)?.for_this_cpu()));
        }
        Ok(ParamStore { vars: kept, quant, nk, panels, order })
    }

    /// A weight as the forward passes take it.
    pub fn mat(&self, name: &str) -> Result<Mat> {
        if let Some(p) = self.panels.get(name) {
            return Ok(Mat::Panels(p.clone()));
        }
        match self.quant.get(name) {
            Some(q) => Ok(Mat::Quant(q.clone())),
            None if self.nk.contains(name) => Ok(Mat::DenseNk(self.vars[name].as_tensor().clone())),
            None => Ok(Mat::Dense(self.get(name)?)),
        }
    }

    /// The quantized weights (name, blocks) in spec order.
    pub fn quantized(&self) -> impl Iterator<Item = (&str, &Arc<QTensor>)> {
        self.order.iter().filter_map(move |n| self.quant.get(n).map(|q| (n.as_str(), q)))
    }

    pub fn is_quantized(&self) -> bool {
        !self.quant.is_empty()
    }

    /// A copy with the tensors `pick` selects stored in `dtype` (bf16 inference weights);
    /// the others are shared.
    pub fn with_dtype(&self, dtype: DType, pick: impl Fn(&str, &Tensor) -> bool) -> Result<Self> {
        // Cloning shares the storage of every variable; only converted ones are copied.
        self.clone().into_dtype(dtype, pick)
    }

    /// [`ParamStore::with_dtype`] that frees each converted original as it goes.
    pub fn into_dtype(self, dtype: DType, pick: impl Fn(&str, &Tensor) -> bool) -> Result<Self> {
        let this = self.into_unpanelled()?;
        let mut vars = BTreeMap::new();
        for (name, v) in this.vars {
            let v = if pick(&name, v.as_tensor()) && v.dtype() != dtype { Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)? } else { v };
            vars.insert(name, v);
        }
        Ok(ParamStore { vars, quant: this.quant, nk: this.nk, panels: this.panels, order: this.order })
    }

    /// Dense expert stacks transposed to [E, N, K] (each original freed as it goes), the
    /// layout of linear weights and of quantized experts: a decoding product then reads
    /// whole weight rows with the [N, K] kernel instead of row segments of [K, N] (nano-MoE
    /// at 16 rows: ~3x faster down projections). Inference only: the model cannot train
    /// on them. `get` and saving still see [E, K, N].
    pub fn into_inference_layout(mut self) -> Result<Self> {
        let names: Vec<String> = self.training_layout_experts().map(str::to_string).collect();
        for name in names {
            let v = self.vars.remove(&name).expect("listed");
            let t = transposed_experts(v.as_tensor())?;
            drop(v);
            self.vars.insert(name.clone(), Var::from_tensor(&t)?);
            self.nk.insert(name);
        }
        self.into_panels()
    }

    /// The f32, bf16 and f16 weight matrices (linear weights [N, K], expert stacks held [E, N, K]; not the
    /// position embedding, which is only looked up) packed in panels for the batch-invariant
    /// product kernel (`kernels::panels`), each original freed as it goes. Inference only.
    fn into_panels(mut self) -> Result<Self> {
        let names: Vec<String> = self.vars.iter().filter(|(n, v)| packs(n, v.as_tensor())).map(|(n, _)| n.clone()).collect();
        for name in names {
            let v = self.vars.remove(&name).expect("listed");
            let panels = pack_tensor(v.as_tensor(), self.nk.contains(&name))?;
            drop(v);
            self.nk.remove(&name);
            self.panels.insert(name, Arc::new(panels));
        }
        Ok(self)
    }

    /// Tensors as [`ParamStore::from_tensors_keeping_dtype`] takes them (the training
    /// layout), with weights already packed ([`pack_tensor`]), for inference: the store in
    /// the inference layout.
    pub fn from_tensors_and_panels(tensors: Vec<(String, Tensor)>, panels: Vec<(String, Panels)>) -> Result<Self> {
        Self::from_tensors_keeping_dtype(tensors)?.with_panels(panels).into_inference_layout()
    }

    /// The store with `panels` added (after the tensors in its order).
    fn with_panels(mut self, panels: Vec<(String, Panels)>) -> Self {
        for (name, p) in panels {
            self.order.push(name.clone());
            self.panels.insert(name, Arc::new(p));
        }
        self
    }

    /// The packed matrices back as tensors (held as `into_inference_layout` leaves them).
    fn into_unpanelled(mut self) -> Result<Self> {
        for (name, p) in std::mem::take(&mut self.panels) {
            let t = self.unpacked(&name, &p)?;
            if t.rank() == 3 {
                self.nk.insert(name.clone());
            }
            self.vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(self)
    }

    /// A packed matrix as a tensor: [N, K], or an expert stack [E, N, K].
    fn unpacked(&self, name: &str, p: &Panels) -> Result<Tensor> {
        let data: Vec<f32> = (0..p.matrices()).flat_map(|e| p.unpack(e)).collect();
        // Back in the panels' type (exact: they hold values of it).
        Ok(match is_expert_stack(name) {
            true => Tensor::from_vec(data, (p.matrices(), p.rows(), p.cols()), &Device::Cpu)?,
            false => Tensor::from_vec(data, (p.rows(), p.cols()), &Device::Cpu)?,
        }
        .to_dtype(p.elem().dtype())?)
    }

    /// Dense expert stacks still [E, K, N].
    fn training_layout_experts(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().filter(|(n, v)| is_expert_stack(n) && v.rank() == 3 && !self.nk.contains(*n)).map(|(n, _)| n.as_str())
    }

    /// Whether [`ParamStore::into_inference_layout`] would change something.
    pub fn needs_inference_layout(&self) -> bool {
        self.training_layout_experts().next().is_some()
    }

    /// Checks that the store holds exactly the specs' tensors with their shapes, and puts
    /// them in spec order.
    pub fn check_against(&mut self, specs: &[ParamSpec]) -> Result<()> {
        for s in specs {
            if let Some(p) = self.panels.get(&s.name) {
                let shape = match is_expert_stack(&s.name) {
                    true => vec![p.matrices(), p.cols(), p.rows()],
                    false => vec![p.rows(), p.cols()],
                };
                if shape != s.shape {
                    return Err(Error::Checkpoint(format!("tensor {} has shape {shape:?}, expected {:?}", s.name, s.shape)));
                }
                continue;
            }
            if let Some(q) = self.quant.get(&s.name) {
                let shape = logical_shape(&s.name, q);
                if shape != s.shape {
                    return Err(Error::Checkpoint(format!("tensor {} has shape {shape:?}, expected {:?}", s.name, s.shape)));
                }
                continue;
            }
            match self.vars.get(&s.name) {
                None => return Err(Error::Checkpoint(format!("missing tensor {} (expected shape {:?})", s.name, s.shape))),
                Some(v) => {
                    let mut dims = v.dims().to_vec();
                    if self.nk.contains(&s.name) {
                        dims.swap(1, 2);
                    }
                    if dims != s.shape {
                        return Err(Error::Checkpoint(format!("tensor {} has shape {dims:?}, expected {:?}", s.name, s.shape)));
                    }
                }
            }
        }
        if self.vars.len() + self.quant.len() + self.panels.len() != specs.len() {
            let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
            let extra: Vec<&str> = self.order.iter().map(String::as_str).filter(|n| !known.contains(n)).collect();
            return Err(Error::Checkpoint(format!("unexpected tensor(s) not used by this config: {}", extra.join(", "))));
        }
        self.order = specs.iter().map(|s| s.name.clone()).collect();
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Tensor> {
        if let Some(q) = self.quant.get(name) {
            return Err(Error::Checkpoint(format!("tensor {name} is stored as {} (inference only)", q.kind.name())));
        }
        if let Some(p) = self.panels.get(name) {
            let t = self.unpacked(name, p)?;
            return Ok(if t.rank() == 3 { t.transpose(1, 2)? } else { t });
        }
        let t = self.vars.get(name).map(|v| v.as_tensor().clone()).ok_or_else(|| Error::Checkpoint(format!("missing tensor {name}")))?;
        match self.nk.contains(name) {
            true => Ok(t.transpose(1, 2)?),
            false => Ok(t),
        }
    }

    /// Whether the store holds `name` (a tensor or a quantized weight).
    pub fn has(&self, name: &str) -> bool {
        self.vars.contains_key(name) || self.quant.contains_key(name) || self.panels.contains_key(name)
    }

    pub fn var(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    /// (name, var) in spec order: the tensors, not the quantized or packed weights
    /// ([`ParamStore::quantized`]; [`ParamStore::dense_names`] lists every dense one).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.order.iter().filter_map(move |n| self.vars.get(n).map(|v| (n.as_str(), v)))
    }

    /// Names of the dense parameters (tensors and packed f32 weights; `get` gives each as a
    /// tensor) in spec order.
    pub fn dense_names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().filter(move |n| self.vars.contains_key(*n) || self.panels.contains_key(*n)).map(String::as_str)
    }

    /// (name, element count) of every parameter, tensors and quantized ones, in spec order.
    pub fn sizes(&self) -> impl Iterator<Item = (&str, usize)> {
        self.order.iter().map(move |n| (n.as_str(), self.vars.get(n).map(|v| v.elem_count()).or_else(|| self.quant.get(n).map(|q| q.elem_count())).or_else(|| self.panels.get(n).map(|p| p.elem_count())).unwrap_or(0)))
    }

    pub fn num_params(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum::<usize>() + self.quant.values().map(|q| q.elem_count()).sum::<usize>() + self.panels.values().map(|p| p.elem_count()).sum::<usize>()
    }
}
