//! Checks that need a CUDA GPU. CI has none, so they are #[ignore]d; run them on a GPU
//! machine with `cargo test --release --test gpu -- --ignored` (or the built test binary
//! with `--ignored`). Each one fails, rather than passes, when CUDA is missing.

use ptb_lm::config::Config;
use ptb_lm::model::LstmLm;
use ptb_lm::step::TrainStep;
use tch::{Device, Kind, Tensor};

fn better_like() -> Config {
    Config::parse(
        "[model]\nwordvec_size = 650\nhidden_size = 650\nnum_layers = 2\ndropout = 0.5\ntie_weights = true\n\
         [train]\nlr = 20.0\nmax_grad = 0.25\nepochs = 1\n",
        &[],
    )
    .unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_and_cudnn_are_available() {
    assert!(tch::Cuda::is_available(), "CUDA is not available to this binary");
    assert!(tch::Cuda::cudnn_is_available(), "cuDNN is not available");
    assert!(ptb_lm::cuda_graph::available(), "built without the CUDA graph shim");
}

/// Runs `steps` SGD steps on fixed random batches and returns (loss sum, weights).
fn train_steps(cfg: &Config, graph: bool, steps: usize) -> (f64, Vec<Tensor>) {
    let device = Device::Cuda(0);
    tch::manual_seed(7);
    let model = LstmLm::new(&cfg.model, device, Kind::Float).unwrap();
    let mut step = TrainStep::new(model, &cfg.train, graph);
    assert_eq!(step.uses_graph(), graph);
    tch::manual_seed(8);
    let (t, b) = (cfg.train.bptt, cfg.train.batch_size);
    let data = Tensor::randint(cfg.model.vocab_size, [steps as i64 + 1, t, b], (Kind::Int64, device));
    for k in 0..steps {
        step.run(&data.get(k as i64), &data.get(k as i64 + 1), 1000 + k as i64).unwrap();
    }
    let loss = step.loss_sum();
    (loss, step.model.parameters().iter().map(|p| p.detach().copy()).collect())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_graph_step_computes_what_the_plain_step_computes() {
    let cfg = better_like();
    let steps = 12; // 3 warm-up steps, the capture, 9 replays
    let (loss_eager, w_eager) = train_steps(&cfg, false, steps);
    let (loss_graph, w_graph) = train_steps(&cfg, true, steps);
    let rel = (loss_eager - loss_graph).abs() / loss_eager.abs();
    assert!(rel < 1e-4, "loss sums differ: plain {loss_eager}, graph {loss_graph}");
    for (a, b) in w_eager.iter().zip(&w_graph) {
        let diff = f64::try_from((a - b).abs().max()).unwrap();
        let scale = f64::try_from(a.abs().max()).unwrap().max(1e-6);
        assert!(diff / scale < 1e-3, "weights differ by {diff} (scale {scale})");
    }
    // And training did something: the weights moved from their initial values.
    let (_, w0) = train_steps(&cfg, false, 0);
    let moved = f64::try_from((&w_eager[0] - &w0[0]).abs().max()).unwrap();
    assert!(moved > 0.0);
    println!("plain loss sum {loss_eager:.6}, graph loss sum {loss_graph:.6}");
}
