//! The stateful recurrent language model: embedding → dropout → N recurrent layers (dropout
//! between them) → dropout → linear decoder to the vocabulary, with optional weight tying.
//! The recurrent cell (`model.cell`: LSTM, GRU or plain RNN) is a [`Cell`]; all that differs
//! between cells is there, the rest of the model is the same for all.
//!
//! Each layer is one call to libtorch's fused RNN of the cell (cuDNN on CUDA), so the book's
//! dropout between layers stays explicit. On CUDA the layers can instead run as one
//! multi-layer cuDNN call ([`LstmLm::set_fused`]), which computes the same function (dropout
//! between layers included) faster, because cuDNN overlaps the layers.
//! Tensors are time-major: inputs (T, B), logits (T, B, V).
//!
//! Parameter names, as stored in checkpoints, with G the cell's gate blocks
//! ([`Cell::gates`]: LSTM 4, GRU 3, RNN 1) and P its prefix ([`Cell::prefix`]: `lstm`, `gru`,
//! `rnn`): `embedding.weight` (V, D), `P.{l}.weight_ih` (GH, in), `P.{l}.weight_hh` (GH, H),
//! `P.{l}.bias_ih` (GH), `P.{l}.bias_hh` (GH), `decoder.weight` (V, H, absent when tied: the
//! decoder then uses `embedding.weight`), `decoder.bias` (V). An LSTM's are `lstm.0.weight_ih`
//! (4H, in) and so on, as before there were other cells.

pub use crate::cell::Cell;
use crate::config::{Config, InitScheme, ModelConfig};
use anyhow::{bail, Result};
use std::path::Path;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

/// Hidden state and, for a cell that has one ([`Cell::has_cell_state`]: the LSTM), cell
/// state of every layer, each (1, B, H). `c` is empty for the other cells.
#[derive(Debug)]
pub struct State {
    pub h: Vec<Tensor>,
    pub c: Vec<Tensor>,
}

impl State {
    pub fn zeros(cell: Cell, layers: usize, batch: i64, hidden: i64, kind: Kind, device: Device) -> State {
        let z = |n| (0..n).map(|_| Tensor::zeros([1, batch, hidden], (kind, device))).collect();
        State { h: z(layers), c: z(if cell.has_cell_state() { layers } else { 0 }) }
    }

    /// Another handle on the same tensors.
    pub fn shallow_clone(&self) -> State {
        State {
            h: self.h.iter().map(Tensor::shallow_clone).collect(),
            c: self.c.iter().map(Tensor::shallow_clone).collect(),
        }
    }

    /// Cuts the autograd history (truncated BPTT).
    pub fn detach(&self) -> State {
        State { h: self.h.iter().map(Tensor::detach).collect(), c: self.c.iter().map(Tensor::detach).collect() }
    }

    /// Copies `other` into these tensors in place (static buffers for CUDA graphs).
    pub fn copy_from(&mut self, other: &State) {
        for (dst, src) in self.h.iter_mut().zip(&other.h).chain(self.c.iter_mut().zip(&other.c)) {
            dst.copy_(src);
        }
    }

    pub fn zero_(&mut self) {
        for t in self.h.iter_mut().chain(self.c.iter_mut()) {
            let _ = t.zero_();
        }
    }

    /// Named tensors for a resumable checkpoint: `state.h.{l}`, and `state.c.{l}` where
    /// there is a cell state.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (l, h) in self.h.iter().enumerate() {
            out.push((format!("state.h.{l}"), h.shallow_clone()));
            if let Some(c) = self.c.get(l) {
                out.push((format!("state.c.{l}"), c.shallow_clone()));
            }
        }
        out
    }
}

/// What one forward pass gives back.
pub struct Forward {
    /// (T, B, V) unnormalised scores.
    pub logits: Tensor,
    /// The state after the last step (still attached to the graph).
    pub state: State,
    /// Last recurrent layer's output before dropout (for temporal activation regularisation).
    pub last_raw: Tensor,
    /// Last recurrent layer's output after dropout (for activation regularisation).
    pub last_dropped: Tensor,
}

/// What [`LstmLm::hidden`] returns: the forward pass up to the decoder, whose input is
/// `last_dropped` ([`LstmLm::decoded_loss`] takes it from there).
pub struct Hidden {
    /// The state after the last step (still attached to the graph).
    pub state: State,
    /// Last recurrent layer's output before dropout (for temporal activation regularisation).
    pub last_raw: Tensor,
    /// Last recurrent layer's output after dropout: the decoder's input (T, B, H).
    pub last_dropped: Tensor,
}

struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

impl Layer {
    /// The weights in the order libtorch's RNN functions and cuDNN take them.
    fn weights(&self) -> [&Tensor; 4] {
        [&self.w_ih, &self.w_hh, &self.b_ih, &self.b_hh]
    }
}

/// The language model, whatever its cell (the name is from when the LSTM was the only one).
pub struct LstmLm {
    vs: nn::VarStore,
    cfg: ModelConfig,
    embedding: Tensor,
    layers: Vec<Layer>,
    decoder_weight: Option<Tensor>,
    decoder_bias: Tensor,
    fused: bool,
}

impl LstmLm {
    /// A freshly initialised model; draws from libtorch's global RNG (seed it first).
    pub fn new(cfg: &ModelConfig, device: Device, kind: Kind) -> Result<LstmLm> {
        if cfg.tie_weights && cfg.wordvec_size != cfg.hidden_size {
            bail!(
                "model.tie_weights needs model.wordvec_size == model.hidden_size (got {} and {})",
                cfg.wordvec_size,
                cfg.hidden_size
            );
        }
        let mut vs = nn::VarStore::new(device);
        let root = vs.root();
        let (v, d, h) = (cfg.vocab(), cfg.wordvec_size, cfg.hidden_size);
        if v < 1 {
            bail!("model.vocab_size is not known yet: it comes from the corpus (or the checkpoint)");
        }
        let normal = |fan_in: i64| Init::Randn { mean: 0.0, stdev: 1.0 / (fan_in as f64).sqrt() };
        let (emb_init, dec_init) = match cfg.init {
            InitScheme::Book => (Init::Randn { mean: 0.0, stdev: 0.01 }, normal(h)),
            InitScheme::Uniform => (Init::Uniform { lo: -0.1, up: 0.1 }, Init::Uniform { lo: -0.1, up: 0.1 }),
        };
        let embedding = (&root / "embedding").var("weight", &[v, d], emb_init);
        let mut layers = Vec::new();
        let g = cfg.cell.gates();
        for l in 0..cfg.num_layers {
            let p = &root / cfg.cell.prefix() / l;
            let input = if l == 0 { d } else { h };
            let bound = 1.0 / (h as f64).sqrt();
            let (ih, hh, b) = match cfg.init {
                InitScheme::Book => (normal(input), normal(h), Init::Const(0.0)),
                InitScheme::Uniform => {
                    let u = Init::Uniform { lo: -bound, up: bound };
                    (u, u, u)
                }
            };
            layers.push(Layer {
                w_ih: p.var("weight_ih", &[g * h, input], ih),
                w_hh: p.var("weight_hh", &[g * h, h], hh),
                b_ih: p.var("bias_ih", &[g * h], b),
                b_hh: p.var("bias_hh", &[g * h], b),
            });
        }
        let dec = &root / "decoder";
        let decoder_weight = (!cfg.tie_weights).then(|| dec.var("weight", &[v, h], dec_init));
        let decoder_bias = dec.var("bias", &[v], Init::Const(0.0));
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let model = LstmLm { vs, cfg: cfg.clone(), embedding, layers, decoder_weight, decoder_bias, fused: false };
        model.flatten_for_cudnn();
        Ok(model)
    }

    /// On CUDA, lays the recurrent weights out in one buffer per cuDNN call (per layer, or
    /// one for all layers when fused), so cuDNN does not copy them on every call.
    fn flatten_for_cudnn(&self) {
        if !(self.vs.device().is_cuda() && tch::Cuda::cudnn_is_available()) {
            return;
        }
        let h = self.cfg.hidden_size;
        let flatten = |layers: &[Layer], input: i64| {
            let weights: Vec<&Tensor> = layers.iter().flat_map(Layer::weights).collect();
            let _ = Tensor::internal_cudnn_rnn_flatten_weight(
                &weights,
                4,
                input,
                self.cfg.cell.cudnn_mode(),
                h,
                0,
                layers.len() as i64,
                false,
                false,
            );
        };
        if self.fused {
            flatten(&self.layers, self.cfg.wordvec_size);
        } else {
            for (l, layer) in self.layers.iter().enumerate() {
                flatten(std::slice::from_ref(layer), if l == 0 { self.cfg.wordvec_size } else { h });
            }
        }
    }

    /// Whether the layers can run as one cuDNN call: CUDA with cuDNN, several layers, and
    /// no per-layer trick (locked dropout, weight drop) that needs them one by one.
    pub fn can_fuse(&self) -> bool {
        self.device().is_cuda()
            && tch::Cuda::cudnn_is_available()
            && self.layers.len() > 1
            && !self.cfg.locked_dropout
            && self.cfg.weight_drop == 0.0
    }

    /// Runs the layers as one cuDNN call when `on` and [`LstmLm::can_fuse`]. Returns
    /// whether they now are.
    pub fn set_fused(&mut self, on: bool) -> bool {
        let fused = on && self.can_fuse();
        if fused != self.fused {
            self.fused = fused;
            self.flatten_for_cudnn();
        }
        self.fused
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn kind(&self) -> Kind {
        self.embedding.kind()
    }

    /// The recurrent cell.
    pub fn cell(&self) -> Cell {
        self.cfg.cell
    }

    pub fn zero_state(&self, batch: i64) -> State {
        State::zeros(self.cfg.cell, self.layers.len(), batch, self.cfg.hidden_size, self.kind(), self.device())
    }

    /// Trainable tensors with their checkpoint names, sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters().into_iter().map(|(_, t)| t).collect()
    }

    pub fn num_parameters(&self) -> i64 {
        self.parameters().iter().map(Tensor::numel).sum::<usize>() as i64
    }

    /// The decoder's weight: its own, or the embedding matrix when tied.
    pub fn decoder_weight(&self) -> &Tensor {
        self.decoder_weight.as_ref().unwrap_or(&self.embedding)
    }

    pub fn embedding_weight(&self) -> &Tensor {
        &self.embedding
    }

    pub fn decoder_bias(&self) -> &Tensor {
        &self.decoder_bias
    }

    /// Each recurrent layer's `[weight_ih, weight_hh, bias_ih, bias_hh]`, bottom first (for
    /// running the cell step by step outside [`LstmLm::forward`], as [`crate::gradflow`] does).
    pub fn layer_weights(&self) -> Vec<[&Tensor; 4]> {
        self.layers.iter().map(Layer::weights).collect()
    }

    /// Runs `x` (T, B) of word ids from `state`. With `train`, dropout is active.
    pub fn forward(&self, x: &Tensor, state: &State, train: bool) -> Forward {
        let h = self.hidden(x, state, train);
        Forward {
            logits: self.decode(&h.last_dropped),
            state: h.state,
            last_raw: h.last_raw,
            last_dropped: h.last_dropped,
        }
    }

    /// The decoder's scores (…, V) for the last layer's (dropped-out) output `h` (…, H).
    pub fn decode(&self, h: &Tensor) -> Tensor {
        h.linear(self.decoder_weight(), Some(&self.decoder_bias))
    }

    /// The mean cross-entropy of [`LstmLm::decode`]`(h)` against `targets` (float32 under
    /// bf16 autocast): the loss of training and of every perplexity ([`crate::xent`]; fused
    /// on the CPU).
    pub fn decoded_loss(&self, h: &Tensor, targets: &Tensor) -> Tensor {
        crate::xent::decoded_loss(h, self.decoder_weight(), &self.decoder_bias, targets)
    }

    /// [`LstmLm::forward`] without the decoder.
    pub fn hidden(&self, x: &Tensor, state: &State, train: bool) -> Hidden {
        let cfg = &self.cfg;
        let emb_w = if train && cfg.dropout_embedding > 0.0 {
            embedding_dropout(&self.embedding, cfg.dropout_embedding)
        } else {
            self.embedding.shallow_clone()
        };
        let mut h = Tensor::embedding(&emb_w, x, -1, false, false);
        h = self.dropout(&h, cfg.dropout_input(), train);
        let cell = cfg.cell;
        if self.fused {
            let weights: Vec<&Tensor> = self.layers.iter().flat_map(Layer::weights).collect();
            let p = if train { cfg.dropout_hidden() } else { 0.0 };
            let n = self.layers.len() as i64;
            let c0 = cell.has_cell_state().then(|| Tensor::cat(&state.c, 0));
            let (out, hn, cn) = cell.run(&h, (&Tensor::cat(&state.h, 0), c0.as_ref()), &weights, n, p, train);
            let split = |t: &Tensor| (0..n).map(|l| t.narrow(0, l, 1)).collect();
            let dropped = self.dropout(&out, cfg.dropout_output(), train);
            return Hidden {
                state: State { h: split(&hn), c: cn.as_ref().map_or_else(Vec::new, split) },
                last_raw: out,
                last_dropped: dropped,
            };
        }
        let mut new_h = Vec::with_capacity(self.layers.len());
        let mut new_c = Vec::with_capacity(self.layers.len());
        let mut last_raw = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let w_hh = if train && cfg.weight_drop > 0.0 {
                layer.w_hh.dropout(cfg.weight_drop, true)
            } else {
                layer.w_hh.shallow_clone()
            };
            let (out, hn, cn) = cell.run(
                &h,
                (&state.h[l], state.c.get(l)),
                &[&layer.w_ih, &w_hh, &layer.b_ih, &layer.b_hh],
                1,
                0.0,
                train,
            );
            new_h.push(hn);
            new_c.extend(cn);
            let last = l + 1 == self.layers.len();
            let p = if last { cfg.dropout_output() } else { cfg.dropout_hidden() };
            if last {
                last_raw = Some(out.shallow_clone());
            }
            h = self.dropout(&out, p, train);
        }
        Hidden { state: State { h: new_h, c: new_c }, last_raw: last_raw.expect("at least one layer"), last_dropped: h }
    }

    /// Reads `x` (T, B) from `state` through the embedding and the recurrent layers only, without
    /// dropout and without the decoder: the state [`LstmLm::forward`] would return (in
    /// evaluation mode), at a fraction of its memory, since no logits are computed. For a
    /// prompt, whose words need no scores.
    pub fn read(&self, x: &Tensor, state: &State) -> State {
        let cell = self.cfg.cell;
        let mut h = Tensor::embedding(&self.embedding, x, -1, false, false);
        if self.fused {
            let weights: Vec<&Tensor> = self.layers.iter().flat_map(Layer::weights).collect();
            let n = self.layers.len() as i64;
            let c0 = cell.has_cell_state().then(|| Tensor::cat(&state.c, 0));
            let (_, hn, cn) = cell.run(&h, (&Tensor::cat(&state.h, 0), c0.as_ref()), &weights, n, 0.0, false);
            let split = |t: &Tensor| (0..n).map(|l| t.narrow(0, l, 1)).collect();
            return State { h: split(&hn), c: cn.as_ref().map_or_else(Vec::new, split) };
        }
        let mut out = State { h: Vec::with_capacity(self.layers.len()), c: Vec::with_capacity(self.layers.len()) };
        for (l, layer) in self.layers.iter().enumerate() {
            let (o, hn, cn) = cell.run(&h, (&state.h[l], state.c.get(l)), &layer.weights(), 1, 0.0, false);
            out.h.push(hn);
            out.c.extend(cn);
            h = o;
        }
        out
    }

    fn dropout(&self, x: &Tensor, p: f64, train: bool) -> Tensor {
        if !train || p == 0.0 {
            x.shallow_clone()
        } else if self.cfg.locked_dropout {
            locked_dropout(x, p)
        } else {
            x.dropout(p, true)
        }
    }

    /// Mean cross-entropy of `logits` (T, B, V) against `targets` (T, B), in the logits'
    /// dtype (tch's `cross_entropy_for_logits` would force float32). Training and every
    /// perplexity use [`LstmLm::decoded_loss`], which takes the decoder's input instead.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        crate::xent::of_scores(logits, targets)
    }

    /// Copies checked weights into the model: every parameter must be present with its
    /// shape, and nothing else may be there (`source` names the file in errors).
    pub fn load_named(&self, tensors: &[(String, Tensor)], source: &Path) -> Result<()> {
        let params = self.named_parameters();
        for (name, _) in tensors {
            if !params.iter().any(|(n, _)| n == name) {
                bail!(
                    "{}: unexpected tensor '{name}': not a parameter of this model (a file from \
                     another model or program?)",
                    source.display()
                );
            }
        }
        tch::no_grad(|| -> Result<()> {
            for (name, param) in &params {
                let Some((_, src)) = tensors.iter().find(|(n, _)| n == name) else {
                    bail!("{}: tensor '{name}' is missing", source.display());
                };
                if src.size() != param.size() {
                    bail!(
                        "{}: tensor '{name}' has shape {:?}, the model expects {:?}",
                        source.display(),
                        src.size(),
                        param.size()
                    );
                }
                if !src.is_floating_point() {
                    bail!("{}: tensor '{name}' is {:?}, not floating point", source.display(), src.kind());
                }
                param.shallow_clone().copy_(src);
            }
            Ok(())
        })
    }
}

/// Number of parameters of the model `cfg` describes, computed without building it (as
/// f64: absurd configs must not overflow).
pub fn parameter_count(cfg: &ModelConfig) -> f64 {
    let (v, d, h) = (cfg.vocab() as f64, cfg.wordvec_size as f64, cfg.hidden_size as f64);
    let (layers, g) = (cfg.num_layers as f64, cfg.cell.gates() as f64);
    let recurrent = g * h * (d + h + 2.0) + (layers - 1.0).max(0.0) * g * h * (h + h + 2.0);
    let decoder = if cfg.tie_weights { 0.0 } else { v * h };
    v * d + recurrent + decoder + v
}

/// About how many bytes training `cfg` takes on its device (float32): the weights, their
/// gradients, the recovery snapshot, the averaged-SGD means and the copy made to validate
/// them or Adam's two moments and their recovery copies, plus one batch of activations kept for the backward pass (logits and their
/// gradient, the recurrent gates and states). An estimate to refuse what cannot fit, not a bound.
pub fn training_bytes(cfg: &Config) -> f64 {
    let m = &cfg.model;
    let copies = match (cfg.train.asgd, cfg.train.optimizer) {
        (_, crate::config::OptimizerKind::Adam) => 7.0,
        (true, _) => 5.0,
        _ => 3.0,
    };
    let tokens = (cfg.train.batch_size * cfg.train.bptt) as f64;
    // Per layer and unit, each with its gradient: the cell's gates and two states (LSTM: 12).
    let per_unit = 2.0 * (m.cell.gates() + 2) as f64;
    let per_token =
        3.0 * m.vocab() as f64 + per_unit * (m.num_layers * m.hidden_size) as f64 + 2.0 * m.wordvec_size as f64;
    4.0 * (copies * parameter_count(m) + tokens * per_token)
}

/// Variational dropout: one mask per sequence (shape (1, B, D)), shared by every time step.
pub fn locked_dropout(x: &Tensor, p: f64) -> Tensor {
    let s = x.size();
    let mask = Tensor::empty([1, s[1], s[2]], (x.kind(), x.device())).bernoulli_float_(1.0 - p) / (1.0 - p);
    x * mask
}

/// Embedding dropout: whole rows (words) of the embedding matrix are zeroed, the rest scaled.
pub fn embedding_dropout(w: &Tensor, p: f64) -> Tensor {
    let mask = Tensor::empty([w.size()[0], 1], (w.kind(), w.device())).bernoulli_float_(1.0 - p) / (1.0 - p);
    w * mask
}
