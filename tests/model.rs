//! The model's mathematics: gradients of every cell against finite differences, weight
//! tying, each regularisation option doing exactly what it claims, and the parameters an
//! LSTM config has always had.

mod common;

use common::{config_with, rng_lock};
use ptb_lm::cell::{Cell, ALL};
use ptb_lm::config::{Config, ModelConfig};
use ptb_lm::data::Batches;
use ptb_lm::eval::{perplexity, perplexity_of_stream};
use ptb_lm::model::{embedding_dropout, locked_dropout, LstmLm};
use ptb_lm::step::TrainStep;
use ptb_lm::xent;
use tch::{Device, Kind, Tensor};

fn model_cfg(extra: &[&str]) -> Config {
    config_with(
        "[model]\nvocab_size = 12\nwordvec_size = 4\nhidden_size = 4\nnum_layers = 2\ntie_weights = true\n\
         [train]\nlr = 1.0\nepochs = 1\nbatch_size = 2\nbptt = 5\nmax_grad = 0.0\ncuda_graph = false\n",
        extra,
    )
}

/// Gives every weight values of order `scale` (the book's init makes activations tiny).
fn randomize(model: &LstmLm, scale: f64) {
    tch::no_grad(|| {
        for p in model.parameters() {
            p.shallow_clone().copy_(&(p.randn_like() * scale));
        }
    });
}

fn ids(t: i64, b: i64, v: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(v, [t, b], (Kind::Int64, Device::Cpu))
}

/// Loss of `model` on fixed data from a fixed non-zero state (so every weight matters).
fn loss(model: &LstmLm, x: &Tensor, y: &Tensor) -> Tensor {
    let mut state = model.zero_state(x.size()[1]);
    for t in state.h.iter_mut().chain(state.c.iter_mut()) {
        *t = t.ones_like() * 0.3;
    }
    LstmLm::loss(&model.forward(x, &state, false).logits, y)
}

fn gradient_check(cfg: &ModelConfig) {
    tch::manual_seed(11);
    let model = LstmLm::new(cfg, Device::Cpu, Kind::Double).unwrap();
    randomize(&model, 0.5);
    let (x, y) = (ids(5, 2, cfg.vocab(), 1), ids(5, 2, cfg.vocab(), 2));
    loss(&model, &x, &y).backward();
    let eps = 1e-6;
    for (name, p) in model.named_parameters() {
        assert_eq!(p.kind(), Kind::Double);
        let analytic = p.grad().flatten(0, -1);
        let flat = p.detach().view(-1);
        let mut numeric = vec![0.0; flat.size()[0] as usize];
        for (i, n) in numeric.iter_mut().enumerate() {
            let i = i as i64;
            let orig = flat.double_value(&[i]);
            let at = |v: f64| {
                tch::no_grad(|| {
                    let _ = flat.get(i).fill_(v);
                });
                tch::no_grad(|| loss(&model, &x, &y).double_value(&[]))
            };
            let (plus, minus) = (at(orig + eps), at(orig - eps));
            at(orig);
            *n = (plus - minus) / (2.0 * eps);
        }
        let numeric = Tensor::from_slice(&numeric);
        let err = (&analytic - &numeric).norm().double_value(&[]);
        let scale = analytic.norm().double_value(&[]) + numeric.norm().double_value(&[]);
        assert!(scale > 0.0, "{name}: zero gradient");
        let rel = err / scale;
        assert!(rel < 1e-5, "{name}: relative error {rel:e} between autograd and finite differences");
    }
}

#[test]
fn gradients_of_every_cell_match_central_finite_differences_in_f64() {
    let _rng = rng_lock();
    for cell in ALL {
        let cell = format!("model.cell={}", cell.key());
        gradient_check(&model_cfg(&[&cell]).model);
        gradient_check(
            &model_cfg(&[&cell, "model.tie_weights=false", "model.wordvec_size=3", "model.num_layers=1"]).model,
        );
    }
}

#[test]
fn a_config_without_a_cell_builds_the_lstm_it_always_did() {
    let _rng = rng_lock();
    let cfg = model_cfg(&["model.tie_weights=false", "model.wordvec_size=3"]);
    assert_eq!(cfg.model.cell, Cell::Lstm);
    let shapes = |cfg: &ModelConfig| -> Vec<(String, Vec<i64>)> {
        let model = LstmLm::new(cfg, Device::Cpu, Kind::Float).unwrap();
        model.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect()
    };
    // The names and shapes of ptb-lm before `model.cell` (vocabulary 12, D 3, H 4, 2 layers).
    let before: Vec<(String, Vec<i64>)> = [
        ("decoder.bias", vec![12]),
        ("decoder.weight", vec![12, 4]),
        ("embedding.weight", vec![12, 3]),
        ("lstm.0.bias_hh", vec![16]),
        ("lstm.0.bias_ih", vec![16]),
        ("lstm.0.weight_hh", vec![16, 4]),
        ("lstm.0.weight_ih", vec![16, 3]),
        ("lstm.1.bias_hh", vec![16]),
        ("lstm.1.bias_ih", vec![16]),
        ("lstm.1.weight_hh", vec![16, 4]),
        ("lstm.1.weight_ih", vec![16, 4]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(shapes(&cfg.model), before);
    // The same weights, drawn in the same order, as with the cell named.
    tch::manual_seed(3);
    let plain = LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(3);
    let named = model_cfg(&["model.tie_weights=false", "model.wordvec_size=3", "model.cell=\"lstm\""]);
    let named = LstmLm::new(&named.model, Device::Cpu, Kind::Float).unwrap();
    for ((n, a), b) in plain.named_parameters().iter().zip(named.parameters()) {
        assert!(a.equal(&b), "{n} differs");
    }
    // The other cells: G·H rows (GRU 3, RNN 1) under their own prefix; nothing else changes.
    for (cell, prefix, g) in [(Cell::Gru, "gru", 3), (Cell::RnnTanh, "rnn", 1), (Cell::RnnRelu, "rnn", 1)] {
        let other =
            model_cfg(&["model.tie_weights=false", "model.wordvec_size=3", &format!("model.cell={}", cell.key())]);
        let expect: Vec<(String, Vec<i64>)> = before
            .iter()
            .map(|(n, s)| match n.strip_prefix("lstm.") {
                Some(rest) => (format!("{prefix}.{rest}"), [vec![s[0] / 4 * g], s[1..].to_vec()].concat()),
                None => (n.clone(), s.clone()),
            })
            .collect();
        assert_eq!(shapes(&other.model), expect, "{cell}");
    }
}

#[test]
fn a_checkpoint_of_one_cell_is_refused_by_another() {
    let _rng = rng_lock();
    let gru = LstmLm::new(&model_cfg(&["model.cell=gru"]).model, Device::Cpu, Kind::Float).unwrap();
    let lstm = LstmLm::new(&model_cfg(&[]).model, Device::Cpu, Kind::Float).unwrap();
    let err = lstm.load_named(&gru.named_parameters(), std::path::Path::new("x.safetensors")).unwrap_err();
    assert!(err.to_string().starts_with("x.safetensors: unexpected tensor 'gru.0.bias_hh'"), "{err}");
    let err = gru.load_named(&lstm.named_parameters(), std::path::Path::new("x.safetensors")).unwrap_err();
    assert!(err.to_string().starts_with("x.safetensors: unexpected tensor 'lstm.0.bias_hh'"), "{err}");
}

#[test]
fn tied_weights_are_one_tensor_that_learns_from_the_decoder() {
    let _rng = rng_lock();
    let grads_of_unused_rows = |tie: bool| {
        let cfg = model_cfg(&[&format!("model.tie_weights={tie}")]);
        tch::manual_seed(1);
        let model = LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap();
        // Inputs use words 0..3 only; targets are spread over the vocabulary.
        let x = ids(5, 2, 4, 3);
        let y = ids(5, 2, 12, 4);
        loss(&model, &x, &y).backward();
        let g = model.embedding_weight().grad();
        (model, g.narrow(0, 4, 8).abs().sum(Kind::Float).double_value(&[]))
    };
    let (tied, unused_tied) = grads_of_unused_rows(true);
    assert_eq!(tied.decoder_weight().data_ptr(), tied.embedding_weight().data_ptr());
    assert!(!tied.named_parameters().iter().any(|(n, _)| n == "decoder.weight"));
    assert!(unused_tied > 0.0, "no gradient reached embedding rows through the decoder");
    let (untied, unused_untied) = grads_of_unused_rows(false);
    assert_ne!(untied.decoder_weight().data_ptr(), untied.embedding_weight().data_ptr());
    assert_eq!(unused_untied, 0.0, "untied: words never input get no embedding gradient");
}

#[test]
fn tying_needs_equal_sizes() {
    let _rng = rng_lock();
    let err = Config::parse(
        "[model]\nwordvec_size = 4\nhidden_size = 5\ntie_weights = true\n[train]\nlr = 1.0\nepochs = 1\n",
        &[],
    )
    .unwrap_err();
    assert!(err.to_string().contains("model.tie_weights needs model.wordvec_size == model.hidden_size"));
}

#[test]
fn locked_dropout_uses_one_mask_across_time() {
    let _rng = rng_lock();
    tch::manual_seed(5);
    let x = Tensor::ones([7, 3, 50], (Kind::Float, Device::Cpu));
    let y = locked_dropout(&x, 0.5);
    let first = y.get(0);
    for t in 1..7 {
        assert!(y.get(t).equal(&first), "time step {t} has its own mask");
    }
    let kept = first.ne(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(kept > 0.3 && kept < 0.7, "kept {kept}");
    assert!(first.eq(0.0).logical_or(&first.eq(2.0)).all().int64_value(&[]) == 1, "kept values scaled by 1/(1-p)");
    // Plain dropout, by contrast, draws a new mask per step.
    let z = x.dropout(0.5, true);
    assert!(!z.get(1).equal(&z.get(0)));
}

#[test]
fn embedding_dropout_drops_whole_words() {
    let _rng = rng_lock();
    tch::manual_seed(6);
    let w = Tensor::ones([200, 8], (Kind::Float, Device::Cpu));
    let d = embedding_dropout(&w, 0.25);
    let row_max = d.amax(1, false);
    let row_min = d.amin(1, false);
    assert!(row_max.equal(&row_min), "a row is partly dropped");
    let dropped = row_max.eq(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    assert!(dropped > 0.1 && dropped < 0.4, "dropped {dropped}");
    let kept = row_max.ne(0.0);
    let scaled = row_max.masked_select(&kept);
    assert!((scaled - 1.0 / 0.75).abs().max().double_value(&[]) < 1e-6);
}

#[test]
fn weight_drop_touches_only_hidden_to_hidden_weights() {
    let _rng = rng_lock();
    // Only DropConnect is on. From a zero state, the first time step does not use W_hh, so
    // it is unchanged; later steps are changed; the parameters themselves stay intact.
    let cfg = model_cfg(&["model.weight_drop=0.9", "model.num_layers=1"]);
    tch::manual_seed(9);
    let model = LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap();
    randomize(&model, 1.0);
    let before: Vec<Tensor> = model.parameters().iter().map(|p| p.detach().copy()).collect();
    let x = ids(4, 2, 12, 1);
    let state = model.zero_state(2);
    let plain = tch::no_grad(|| model.forward(&x, &state, false).logits);
    let dropped = tch::no_grad(|| model.forward(&x, &state, true).logits);
    assert!(dropped.get(0).allclose(&plain.get(0), 1e-6, 1e-6, false), "step 0 must not see W_hh");
    assert!(!dropped.get(3).allclose(&plain.get(3), 1e-4, 1e-4, false), "later steps must see the dropped W_hh");
    for (p, b) in model.parameters().iter().zip(&before) {
        assert!(p.equal(b), "weight drop must not modify the stored weights");
    }
}

/// A seeded tiny model's step with averaged SGD switched on from its first weights.
fn averaging_step(extra: &[&str]) -> TrainStep {
    let cfg = model_cfg(extra);
    tch::manual_seed(2);
    let model = LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap();
    let mut step = TrainStep::new(model, &cfg.train, false).unwrap();
    step.start_averaging(None);
    step
}

#[test]
fn averaged_sgd_weights_are_the_mean_of_the_iterates() {
    let _rng = rng_lock();
    let mut step = averaging_step(&["model.dropout=0.2"]);
    let snapshot = |s: &TrainStep| -> Vec<Tensor> { s.model.parameters().iter().map(|p| p.detach().copy()).collect() };
    let mut iterates = vec![snapshot(&step)];
    for k in 0..6 {
        step.run(&ids(5, 2, 12, 10 + k), &ids(5, 2, 12, 20 + k), k).unwrap();
        iterates.push(snapshot(&step));
    }
    assert_eq!(step.averaged_count(), 7);
    let avg = step.averaged_named().unwrap();
    for (i, (name, a)) in avg.iter().enumerate() {
        let mean = Tensor::stack(&iterates.iter().map(|w| w[i].shallow_clone()).collect::<Vec<_>>(), 0).mean_dim(
            0,
            false,
            Kind::Float,
        );
        let diff = (a - &mean).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: running mean is off by {diff}");
    }
    // Evaluating with the averages swaps them in and back out.
    let trained = snapshot(&step);
    let inside = step.with_averaged(|m| m.parameters()[0].detach().copy());
    assert!(inside.allclose(&avg[0].1, 1e-6, 1e-6, false));
    assert!(step.model.parameters()[0].equal(&trained[0]));
}

#[test]
fn a_restore_after_a_non_finite_step_also_restores_the_averages() {
    let _rng = rng_lock();
    let mut step = averaging_step(&["train.max_grad=0"]);
    step.run(&ids(5, 2, 12, 1), &ids(5, 2, 12, 2), 1).unwrap();
    step.snapshot();
    let good: Vec<Tensor> = step.averaged_named().unwrap().iter().map(|(_, t)| t.copy()).collect();
    // An infinite learning rate: the weights, and with them the running means, go non-finite.
    step.set_lr(f64::INFINITY);
    step.run(&ids(5, 2, 12, 3), &ids(5, 2, 12, 4), 2).unwrap();
    let poisoned = step.averaged_named().unwrap();
    assert!(poisoned.iter().any(|(_, t)| !bool::try_from(t.isfinite().all()).unwrap()));
    assert!(!step.weights_finite());
    assert!(step.restore());
    assert!(step.weights_finite());
    assert_eq!(step.averaged_count(), 2);
    for ((name, a), g) in step.averaged_named().unwrap().iter().zip(&good) {
        assert!(a.equal(g), "{name}: the running mean was not restored");
    }
}

#[test]
fn a_restore_after_a_non_finite_step_also_restores_adams_moments_and_step_count() {
    let _rng = rng_lock();
    let cfg = model_cfg(&["train.optimizer=\"adam\"", "train.lr=0.01"]);
    tch::manual_seed(2);
    let model = LstmLm::new(&cfg.model, Device::Cpu, Kind::Float).unwrap();
    let mut step = TrainStep::new(model, &cfg.train, false).unwrap();
    let adam = |s: &TrainStep| -> Vec<(String, Tensor)> {
        let state = s.resumable_state().unwrap();
        state.into_iter().filter(|(n, _)| n.starts_with("adam.")).map(|(n, t)| (n, t.copy())).collect()
    };
    step.run(&ids(5, 2, 12, 1), &ids(5, 2, 12, 2), 1).unwrap();
    step.snapshot();
    let good = adam(&step);
    assert!(good.iter().any(|(n, _)| n == "adam.step") && good.iter().any(|(n, _)| n.starts_with("adam.v.")));
    // An infinite learning rate: the weights go non-finite; the moments and count move on.
    step.set_lr(f64::INFINITY);
    step.run(&ids(5, 2, 12, 3), &ids(5, 2, 12, 4), 2).unwrap();
    assert!(!step.weights_finite());
    let moved = adam(&step);
    assert!(good.iter().zip(&moved).any(|((_, a), (_, b))| !a.equal(b)), "the step changed no Adam state");
    assert!(step.restore());
    assert!(step.weights_finite());
    for ((name, a), (_, g)) in adam(&step).iter().zip(&good) {
        assert!(a.equal(g), "{name} was not restored");
    }
}

/// The same model every time, with weights of order one so every term is visible.
fn seeded_model(cfg: &ModelConfig) -> LstmLm {
    tch::manual_seed(4);
    let model = LstmLm::new(cfg, Device::Cpu, Kind::Float).unwrap();
    randomize(&model, 0.5);
    model
}

/// One step from the same start with `extra` settings; returns (loss sum, weights).
fn one_step(extra: &[&str]) -> (f64, Vec<Tensor>) {
    let cfg = model_cfg(extra);
    let model = seeded_model(&cfg.model);
    let mut step = TrainStep::new(model, &cfg.train, false).unwrap();
    step.run(&ids(5, 2, 12, 1), &ids(5, 2, 12, 2), 1).unwrap();
    (step.loss_sum(), step.model.parameters().iter().map(|p| p.detach().copy()).collect())
}

#[test]
fn weight_decay_shrinks_weights_by_lr_times_decay() {
    let _rng = rng_lock();
    let start = seeded_model(&model_cfg(&[]).model).parameters();
    let (_, plain) = one_step(&[]);
    let (_, decayed) = one_step(&["train.weight_decay=0.01"]);
    // p' = p (1 - lr wd) - lr g: the difference is -lr * wd * p.
    for ((a, b), p0) in decayed.iter().zip(&plain).zip(&start) {
        let expect = p0 * -0.01; // -lr * wd * p with lr 1
        assert!((a - b).allclose(&expect, 1e-5, 1e-6, false));
    }
}

#[test]
fn activation_regularisers_change_the_update_but_not_the_reported_loss() {
    let _rng = rng_lock();
    let (loss0, w0) = one_step(&[]);
    for key in ["train.ar_alpha=2.0", "train.tar_beta=1.0"] {
        let (loss1, w1) = one_step(&[key]);
        // The regulariser (alpha * mean(h^2) or beta * mean((h_t - h_t-1)^2), of order 0.1
        // with these weights) is not in the reported loss.
        assert!((loss0 - loss1).abs() / loss0 < 1e-5, "{key}: reported {loss1}, cross-entropy alone {loss0}");
        assert!(w0.iter().zip(&w1).any(|(a, b)| !a.allclose(b, 1e-7, 1e-7, false)), "{key} had no effect");
    }
}

#[test]
fn a_text_scored_in_chunks_equals_one_pass_over_it() {
    let _rng = rng_lock();
    let cfg = model_cfg(&["model.dropout=0.3"]);
    tch::manual_seed(11);
    let model = LstmLm::new(&cfg.model, Device::Cpu, Kind::Double).unwrap();
    randomize(&model, 0.5);
    let corpus: Vec<i64> = (0..24).map(|i| (i * 7 + i / 3) % 12).collect();
    // One forward over all 23 predictions from a zero state, no dropout.
    let ids = Tensor::from_slice(&corpus).view([-1, 1]);
    let f = model.forward(&ids.narrow(0, 0, 23), &model.zero_state(1), false);
    let whole = f64::try_from(LstmLm::loss(&f.logits, &ids.narrow(0, 1, 23))).unwrap().exp();
    // Chunks of 5 (the last one of 3) carry the state across.
    let chunked = perplexity_of_stream(&model, &corpus, 5, Device::Cpu);
    assert!((chunked - whole).abs() / whole < 1e-12, "{chunked} vs {whole}");
    // And, where the book's batching drops nothing (batch 1, 20 = 4 x 5 predictions), it agrees.
    let book = perplexity(&model, &Batches::new(&corpus[..21], 1, 5, Device::Cpu).unwrap());
    let stream = perplexity_of_stream(&model, &corpus[..21], 5, Device::Cpu);
    assert!((book - stream).abs() / book < 1e-12, "{book} vs {stream}");
}

/// The loss and the gradients of h, W and b through [`xent::decoded_loss`] and through
/// [`xent::reference`] (the decoder, then cross_entropy), as the largest relative difference.
fn fused_against_reference(n: i64, hidden: i64, v: i64, scale: f64, seed: i64) -> (f64, f64, f64) {
    tch::manual_seed(seed);
    let h0 = Tensor::randn([n, hidden], (Kind::Float, Device::Cpu)) * scale;
    let w0 = Tensor::randn([v, hidden], (Kind::Float, Device::Cpu)) * 0.5;
    let b0 = Tensor::randn([v], (Kind::Float, Device::Cpu));
    let t = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let run = |f: fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Tensor| {
        let (h, w, b) =
            (h0.copy().set_requires_grad(true), w0.copy().set_requires_grad(true), b0.copy().set_requires_grad(true));
        let loss = f(&h.view([n / 2, 2, hidden]), &w, &b, &t.view([n / 2, 2]));
        (&loss * 3.0).backward();
        (f64::try_from(&loss).unwrap(), [h.grad(), w.grad(), b.grad()])
    };
    let (fused, fg) = run(xent::decoded_loss);
    let (plain, pg) = run(xent::reference);
    let grad_diff = fg
        .iter()
        .zip(&pg)
        .map(|(a, b)| f64::try_from((a - b).abs().max() / b.abs().max()).unwrap())
        .fold(0.0, f64::max);
    (fused, plain, grad_diff)
}

#[test]
fn the_fused_cpu_loss_equals_the_decoder_then_cross_entropy_in_value_and_gradients() {
    #[cfg(target_arch = "x86_64")]
    if xent::enabled_by_environment() && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert!(xent::fused_available(), "this CPU has AVX2 and FMA, yet the fused loss was not built");
    }
    // Vocabularies with and without a tail of fewer than 8 scores (the kernel's vectors are 8
    // wide); scores of order 1, and spread over tens.
    for (n, hidden, v, scale, seed) in
        [(40, 16, 1000, 1.0, 1), (22, 7, 1003, 1.0, 2), (10, 5, 13, 20.0, 3), (6, 3, 5, 1.0, 4)]
    {
        let (fused, plain, grads) = fused_against_reference(n, hidden, v, scale, seed);
        assert!((fused - plain).abs() <= 1e-5 * plain.abs().max(1.0), "V {v}: loss {fused} against {plain}");
        assert!(grads <= 1e-5, "V {v}: the gradients differ by {grads:e} (relative to the largest)");
    }
}

#[test]
fn the_fused_cpu_loss_treats_non_finite_scores_as_log_softmax_does_and_refuses_a_bad_target() {
    let (n, hidden, v) = (4, 3, 11);
    let w = Tensor::ones([v, hidden], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([v], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[1i64, 2, 3, 4]);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let h = Tensor::ones([n, hidden], (Kind::Float, Device::Cpu));
        let _ = h.get(2).get(1).fill_(bad);
        let loss = f64::try_from(xent::decoded_loss(&h, &w, &b, &t)).unwrap();
        assert!(loss.is_nan(), "a row of scores {bad} gave the loss {loss}");
    }
    // One word scored -inf among finite scores has probability 0: a finite loss, unless it
    // is a target's (then +inf), in both paths.
    let h = Tensor::randn([n, hidden], (Kind::Float, Device::Cpu));
    let b = Tensor::zeros([v], (Kind::Float, Device::Cpu));
    let _ = b.get(7).fill_(f64::NEG_INFINITY);
    for (targets, finite) in [([1i64, 2, 3, 4], true), ([1, 7, 3, 4], false)] {
        let t = Tensor::from_slice(&targets);
        let fused = f64::try_from(xent::decoded_loss(&h, &w, &b, &t)).unwrap();
        let plain = f64::try_from(xent::reference(&h, &w, &b, &t)).unwrap();
        assert_eq!(fused.is_finite(), finite, "targets {targets:?}: {fused}");
        assert!(
            fused == plain || (fused - plain).abs() <= 1e-5 * plain.abs(),
            "targets {targets:?}: {fused} against {plain}"
        );
    }
    let h = Tensor::ones([n, hidden], (Kind::Float, Device::Cpu));
    // Huge finite scores (a bias of ±1e20 swamps h·W): the loss is that of a uniform guess.
    for c in [1e10, -1e20, 1e30] {
        let b = Tensor::full([v], c, (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[1i64, 2, 3, 4]);
        let fused = f64::try_from(xent::decoded_loss(&h, &w, &b, &t)).unwrap();
        let plain = f64::try_from(xent::reference(&h, &w, &b, &t)).unwrap();
        assert!((fused - plain).abs() <= 1e-5 * plain, "bias {c}: {fused} against {plain}");
    }
    for target in [-1i64, v] {
        let t = Tensor::from_slice(&[1i64, target, 3, 4]);
        let r = std::panic::catch_unwind(|| xent::decoded_loss(&h, &w, &b, &t));
        assert!(r.is_err(), "target {target} of {v} classes gave a loss");
    }
}
