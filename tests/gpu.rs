//! Checks that need a CUDA GPU. CI has none, so they are #[ignore]d; run them on a GPU
//! machine with `cargo test --release --test gpu -- --ignored` (or the built test binary
//! with `--ignored`). Each one fails, rather than passes, when CUDA is missing.

mod common;

use common::{config_with, rng_lock};
use ptb_lm::config::Config;
use ptb_lm::model::LstmLm;
use ptb_lm::step::TrainStep;
use tch::{Device, Kind, Tensor};

/// better.toml's model and step, with `extra` overrides.
fn better_like(extra: &[&str]) -> Config {
    config_with(
        "[model]\nwordvec_size = 650\nhidden_size = 650\nnum_layers = 2\ndropout = 0.5\ntie_weights = true\n\
         [train]\nlr = 20.0\nmax_grad = 0.25\nepochs = 1\n",
        extra,
    )
}

fn new_step(cfg: &Config, graph: bool) -> TrainStep {
    tch::manual_seed(7);
    let model = LstmLm::new(&cfg.model, Device::Cuda(0), Kind::Float).unwrap();
    let step = TrainStep::new(model, &cfg.train, graph).unwrap();
    assert_eq!(step.uses_graph(), graph);
    step
}

fn batches(cfg: &Config, n: usize) -> Tensor {
    tch::manual_seed(8);
    let (t, b) = (cfg.train.bptt, cfg.train.batch_size);
    Tensor::randint(cfg.model.vocab(), [n as i64 + 1, t, b], (Kind::Int64, Device::Cuda(0)))
}

/// Runs `steps` SGD steps on fixed random batches and returns (loss sum, weights).
fn train_steps(cfg: &Config, graph: bool, steps: usize) -> (f64, Vec<Tensor>) {
    let mut step = new_step(cfg, graph);
    let data = batches(cfg, steps);
    for k in 0..steps {
        step.run(&data.get(k as i64), &data.get(k as i64 + 1), 1000 + k as i64).unwrap();
    }
    let loss = step.loss_sum();
    (loss, step.model.parameters().iter().map(|p| p.detach().copy()).collect())
}

fn assert_same(cfg: &Config, what: &str) {
    let steps = 12; // 3 warm-up steps, the capture, 9 replays
    let (loss_eager, w_eager) = train_steps(cfg, false, steps);
    let (loss_graph, w_graph) = train_steps(cfg, true, steps);
    let rel = (loss_eager - loss_graph).abs() / loss_eager.abs();
    assert!(rel < 1e-4, "{what}: loss sums differ: plain {loss_eager}, graph {loss_graph}");
    for (a, b) in w_eager.iter().zip(&w_graph) {
        let diff = f64::try_from((a - b).abs().max()).unwrap();
        let scale = f64::try_from(a.abs().max()).unwrap().max(1e-6);
        assert!(diff / scale < 1e-3, "{what}: weights differ by {diff} (scale {scale})");
    }
    let (_, w0) = train_steps(cfg, false, 0);
    let moved = f64::try_from((&w_eager[0] - &w0[0]).abs().max()).unwrap();
    assert!(moved > 0.0, "{what}: training did not move the weights");
    println!("{what}: plain loss sum {loss_eager:.6}, graph loss sum {loss_graph:.6}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_and_cudnn_are_available() {
    let _rng = rng_lock();
    assert!(tch::Cuda::is_available(), "CUDA is not available to this binary");
    assert!(tch::Cuda::cudnn_is_available(), "cuDNN is not available");
    assert!(ptb_lm::cuda::available(), "built without the CUDA shim");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_graph_step_computes_what_the_plain_step_computes() {
    let _rng = rng_lock();
    // Layer by layer, every dropout drawn from libtorch's generator: bit-for-bit the same.
    assert_same(&better_like(&["train.fused_lstm=false"]), "per-layer");
    // Fused layers (no dropout between them, which cuDNN would draw itself).
    let fused = better_like(&["model.dropout_hidden=0.0"]);
    assert_same(&fused, "fused");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cudnn_dropout_between_fused_layers_changes_every_replay() {
    let _rng = rng_lock();
    // Only the dropout between layers is on, and lr = 0: with the same batch and state, the
    // loss of each replay differs only by cuDNN's dropout mask.
    let cfg = better_like(&["model.dropout_input=0.0", "model.dropout_output=0.0", "model.dropout_hidden=0.5"]);
    let mut step = new_step(&cfg, true);
    assert!(step.model.is_fused());
    let replays = replay_losses(&mut step, &cfg, |_| 5); // the same seed every time
    println!("losses of identical replays: {replays:?}");
}

/// Ten steps at lr 0 on the same batch from the same state (seed of step k: `seed(k)`); the
/// losses of the replays after the 3 warm-ups and the capture, checked to be all different:
/// only the dropout masks can make them differ.
fn replay_losses(step: &mut TrainStep, cfg: &Config, seed: impl Fn(i64) -> i64) -> Vec<f64> {
    step.set_lr(0.0);
    let data = batches(cfg, 1);
    let mut losses = Vec::new();
    for k in 0..10 {
        step.reset_state();
        step.reset_loss_sum(0.0);
        step.run(&data.get(0), &data.get(1), seed(k)).unwrap();
        losses.push(step.loss_sum());
    }
    let replays = losses[4..].to_vec();
    let mut distinct = replays.clone();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    assert_eq!(distinct.len(), replays.len(), "a dropout mask repeats across replays: {replays:?}");
    replays
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_step_stays_close_to_fp32() {
    let _rng = rng_lock();
    let (loss32, _) = train_steps(&better_like(&["train.precision=\"fp32\""]), true, 12);
    let (loss16, w16) = train_steps(&better_like(&["train.precision=\"bf16\""]), true, 12);
    let rel = (loss32 - loss16).abs() / loss32;
    assert!(rel < 0.02, "bf16 loss sum {loss16} vs fp32 {loss32}");
    assert!(w16.iter().all(|w| bool::try_from(w.isfinite().all()).unwrap()));
    assert!(w16.iter().all(|w| w.kind() == Kind::Float), "master weights must stay float32");
    println!("12 steps: fp32 loss sum {loss32:.5}, bf16 {loss16:.5} ({:.3}% apart)", rel * 100.0);
}

/// best.toml's regularised recipe at a smaller width: locked dropout, embedding dropout,
/// weight drop, AR/TAR, weight decay, bf16 unless overridden.
fn best_like(extra: &[&str]) -> Config {
    config_with(
        "[model]\nwordvec_size = 256\nhidden_size = 256\nnum_layers = 2\ntie_weights = true\ninit = \"uniform\"\n\
         locked_dropout = true\ndropout_input = 0.45\ndropout_hidden = 0.3\ndropout_output = 0.45\n\
         dropout_embedding = 0.1\nweight_drop = 0.5\n\
         [train]\nlr = 30.0\nmax_grad = 0.25\nepochs = 1\nbptt = 70\nweight_decay = 1.2e-6\nar_alpha = 2.0\n\
         tar_beta = 1.0\nprecision = \"bf16\"\n",
        extra,
    )
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_regularised_step_is_captured_and_computes_what_the_plain_step_computes() {
    let _rng = rng_lock();
    let cfg = best_like(&["train.precision=\"fp32\""]);
    let step = new_step(&cfg, true);
    assert!(!step.model.is_fused(), "locked dropout and weight drop need the layers one by one");
    drop(step);
    assert_same(&cfg, "regularised, fp32");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn locked_dropout_and_weight_drop_masks_are_redrawn_on_every_replay() {
    let _rng = rng_lock();
    // lr = 0, the same batch and state every step: only the masks (locked dropout, embedding
    // dropout, weight drop) can make two replays' losses differ. Seeds differ per step, as
    // in training.
    let cfg = best_like(&[]);
    let mut step = new_step(&cfg, true);
    let replays = replay_losses(&mut step, &cfg, |k| 2000 + k);
    println!("losses of replays with fresh masks: {replays:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_cell_trains_in_a_cuda_graph_with_fused_layers_as_in_plain_steps() {
    let _rng = rng_lock();
    for cell in ptb_lm::cell::ALL {
        let set = format!("model.cell={}", cell.key());
        // lr 1: the plain RNNs blow up at the LSTM's 20. No dropout between the layers, which
        // cuDNN would draw itself in the fused call.
        let fused = better_like(&[&set, "train.lr=1.0", "model.dropout_hidden=0.0"]);
        let step = new_step(&fused, true);
        assert!(step.model.is_fused(), "{cell}: the layers are not fused");
        assert!(step.describe().contains(&format!("fused {cell} layers")), "{}", step.describe());
        drop(step);
        // The CUDA graph of the fused step computes what the plain fused step computes.
        assert_same(&fused, &format!("{cell}, fused"));
        // And the fused call computes what one cuDNN call per layer computes.
        let (loss_fused, _) = train_steps(&fused, true, 12);
        let per_layer = better_like(&[&set, "train.lr=1.0", "model.dropout_hidden=0.0", "train.fused_lstm=false"]);
        let (loss_layers, _) = train_steps(&per_layer, false, 12);
        let rel = (loss_fused - loss_layers).abs() / loss_layers.abs();
        assert!(rel < 1e-3, "{cell}: fused graph loss sum {loss_fused}, per-layer plain {loss_layers}");
        println!("{cell}: fused graph loss sum {loss_fused:.6}, per-layer plain {loss_layers:.6}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adam_steps_in_a_cuda_graph_compute_what_plain_adam_steps_compute() {
    let _rng = rng_lock();
    // Adam's moments, step count and bias corrections live on the device, so the captured
    // update replays what the plain one computes (per layer: every draw from libtorch's generator).
    let adam = ["train.optimizer=\"adam\"", "train.lr=0.002"];
    assert_same(&better_like(&[adam[0], adam[1], "train.fused_lstm=false"]), "adam, per-layer");
    assert_same(&better_like(&[adam[0], adam[1], "model.dropout_hidden=0.0"]), "adam, fused");
    // The step count advanced once per step, replays included.
    let cfg = better_like(&adam);
    let mut step = new_step(&cfg, true);
    let data = batches(&cfg, 12);
    for k in 0..12 {
        step.run(&data.get(k), &data.get(k + 1), 1000 + k).unwrap();
    }
    let state = step.resumable_state().unwrap();
    let count = state.iter().find(|(n, _)| n == "adam.step").map(|(_, t)| f64::try_from(t).unwrap());
    assert_eq!(count, Some(12.0));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_decoders_loss_on_cuda_equals_the_cpus_fused_one_in_value_and_gradients() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    tch::manual_seed(3);
    let (n, hidden, v) = (700, 200, 10000);
    let h0 = Tensor::randn([n, hidden], (Kind::Float, Device::Cpu));
    let w0 = Tensor::randn([v, hidden], (Kind::Float, Device::Cpu)) * 0.1;
    let b0 = Tensor::randn([v], (Kind::Float, Device::Cpu));
    let t = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let run = |device: Device| {
        let leaf = |x: &Tensor| x.to_device(device).set_requires_grad(true);
        let (h, w, b) = (leaf(&h0), leaf(&w0), leaf(&b0));
        let loss = ptb_lm::xent::decoded_loss(&h, &w, &b, &t.to_device(device));
        loss.backward();
        let grads: Vec<Tensor> = [h.grad(), w.grad(), b.grad()].iter().map(|g| g.to_device(Device::Cpu)).collect();
        (f64::try_from(loss.to_device(Device::Cpu)).unwrap(), grads)
    };
    let (cpu, cg) = run(Device::Cpu);
    let (cuda, gg) = run(Device::Cuda(0));
    // TF32 is off by default, so both are float32 products summed in different orders.
    assert!((cpu - cuda).abs() <= 1e-5 * cpu.abs(), "loss {cpu} on the CPU, {cuda} on CUDA");
    for (a, b) in cg.iter().zip(&gg) {
        let diff = f64::try_from((a - b).abs().max() / b.abs().max()).unwrap();
        assert!(diff <= 1e-4, "the gradients differ by {diff:e}");
    }
}
