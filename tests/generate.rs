//! Generation and what a run reports (metrics.jsonl, the PNG), on one small trained run:
//! samples are reproducible and follow the model, prompts are spelled as the corpus was and
//! may be of any length (from a file or standard input), and output that cannot be written
//! is an error.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A run trained once for this test binary (under Cargo's per-target temp directory).
fn trained() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("generate-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, tiny_config(&ptb_dir(), &dir.join("run"), "")).unwrap();
        let o =
            command().args(["train", "--config", cfg.to_str().unwrap(), "--epochs", "3", "--quiet"]).output().unwrap();
        assert_success(&o);
        dir.join("run")
    })
}

fn generate(args: &[&str]) -> std::process::Output {
    let best = trained().join("best");
    let mut all = vec!["generate", "--checkpoint", best.to_str().unwrap()];
    all.extend_from_slice(args);
    command().args(&all).output().unwrap()
}

/// A sample's draws after its prompt, read back from how generate writes them: each word,
/// and "\n" for each `<eos>` (a line break before the next word).
fn draws<'a>(sample: &'a str, prompt: &str) -> Vec<&'a str> {
    let rest = sample.strip_prefix(prompt).unwrap_or_else(|| panic!("sample without its prompt: {sample:?}"));
    let mut out = Vec::new();
    for (i, line) in rest.split('\n').enumerate() {
        if i > 0 {
            out.push("\n");
        }
        out.extend(line.split(' ').filter(|w| !w.is_empty()));
    }
    out
}

/// A sample as generate writes it: the prompt, then each drawn word after a space, or after
/// the line breaks of the `<eos>` drawn before it; an `<eos>` at the end writes nothing.
fn written(prompt: &str, draws: &[&str]) -> String {
    let mut text = prompt.to_string();
    let mut breaks = 0;
    for &d in draws {
        if d == "\n" {
            breaks += 1;
            continue;
        }
        if breaks > 0 {
            text.push_str(&"\n".repeat(breaks));
        } else if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(d);
        breaks = 0;
    }
    text
}

#[test]
fn the_same_seed_gives_the_same_text_of_exactly_the_words_asked_for() {
    let prompt = "the company said";
    let run = |words: &str, seed: &str| {
        let o = generate(&["--prompt", prompt, "--words", words, "--seed", seed]);
        assert_success(&o);
        stdout(&o)
    };
    let a = run("40", "5");
    assert_eq!(a, run("40", "5"));
    assert_ne!(a, run("40", "6"));
    // 40 draws, each a word or an <eos> (a line break, none written at the end): the first
    // 40 draws of a longer sample with the same seed, whatever words the model drew.
    let long = run("400", "5");
    let all = draws(long.strip_suffix('\n').unwrap(), prompt);
    assert!(all.len() >= 40, "{long:?}");
    assert_eq!(a, written(prompt, &all[..40]) + "\n");
}

#[test]
fn unknown_prompt_words_are_read_as_unk_with_a_warning_quoting_each() {
    let o = generate(&["--prompt", "the xyzzy, Company 1987 qqq", "--words", "5"]);
    assert_success(&o);
    let err = stderr(&o);
    // PTB: "Company" is found lower-cased and "1987" as N; only the two nonsense words are named.
    assert_eq!(err.trim(), "warning: not in the vocabulary, read as <unk>: 'xyzzy,', 'qqq'");
    assert!(stdout(&o).starts_with("the xyzzy, Company 1987 qqq"), "{}", stdout(&o));
}

#[test]
fn outside_ptb_prompt_words_are_read_as_written_or_lower_cased_as_the_corpus_was() {
    let s = Sandbox::new();
    let text = std::fs::read_to_string(shakespeare_file()).unwrap();
    let lines: String = text.lines().take(3000).flat_map(|l| [l, "\n"]).collect();
    std::fs::write(s.path("one.txt"), lines).unwrap();
    for (name, lowercase) in [("kept", false), ("lower", true)] {
        let cfg = format!(
            "[data]\nfile = \"one.txt\"\nlowercase = {lowercase}\n[model]\nwordvec_size = 16\nhidden_size = 16\n\
             num_layers = 1\ntie_weights = true\n[train]\nbatch_size = 10\nbptt = 20\nlr = 20.0\nepochs = 1\n\
             [run]\nout_dir = \"{name}\"\ndevice = \"cpu\"\n"
        );
        std::fs::write(s.path(&format!("{name}.toml")), cfg).unwrap();
        assert_success(&s.run(&["train", "--config", &format!("{name}.toml"), "--quiet"]));
    }
    // The text keeps its case: "FIRST" is not "First" nor "first" (which the vocabulary has),
    // and "1987" is no "N"; both are read as <unk> and named.
    let vocab = ptb_lm::checkpoint::Checkpoint::load(&s.path("kept/best")).unwrap().meta.vocab;
    assert!(vocab.iter().any(|w| w == "first") && vocab.iter().any(|w| w == "First"));
    let o = s.run(&["generate", "--checkpoint", "kept/best", "--prompt", "FIRST Citizen: 1987", "--words", "3"]);
    assert_success(&o);
    assert_eq!(stderr(&o).trim(), "warning: not in the vocabulary, read as <unk>: 'FIRST', '1987'");
    assert!(stdout(&o).starts_with("FIRST Citizen: 1987"), "{}", stdout(&o));
    // A lower-cased corpus lower-cases the prompt, as it did the text.
    let o = s.run(&["generate", "--checkpoint", "lower/best", "--prompt", "FIRST CITIZEN: 1987", "--words", "3"]);
    assert_success(&o);
    assert_eq!(stderr(&o).trim(), "warning: not in the vocabulary, read as <unk>: '1987'");
    assert!(stdout(&o).starts_with("FIRST CITIZEN: 1987"), "{}", stdout(&o));
}

/// A copy of the trained checkpoint whose decoder adds `boost` to the score of `word`.
fn boosted(word: &str, boost: f64) -> PathBuf {
    use ptb_lm::checkpoint::Checkpoint;
    let best = trained().join("best");
    let ckpt = Checkpoint::load(&best).unwrap();
    let id = ckpt.vocab().unwrap().id(word).unwrap();
    let dir = trained().with_file_name(format!("boosted-{}", word.trim_matches(['<', '>'])));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(best.join("checkpoint.json"), dir.join("checkpoint.json")).unwrap();
    let weights: Vec<(String, tch::Tensor)> = ckpt
        .weights
        .iter()
        .map(|(n, t)| {
            let t = t.copy();
            if n == "decoder.bias" {
                let _ = t.get(id).g_add_scalar_(boost);
            }
            (n.clone(), t)
        })
        .collect();
    tch::Tensor::write_safetensors(&weights, dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn unk_is_never_sampled_unless_allowed() {
    // <unk> scores e^50 times higher than any other word could without the boost: drawn at
    // every step where it is allowed, so never drawing it is the ban at work.
    let dir = boosted("<unk>", 50.0);
    let args = ["generate", "--checkpoint", dir.to_str().unwrap(), "--prompt", "the", "--words", "400", "--seed", "1"];
    let o = command().args(args).output().unwrap();
    assert_success(&o);
    assert_eq!(draws(stdout(&o).trim_end(), "the").len(), 400, "{}", stdout(&o));
    assert!(!stdout(&o).contains("<unk>"));
    let o = command().args(args).arg("--allow-unk").output().unwrap();
    assert_success(&o);
    assert!(stdout(&o).contains("<unk>"), "--allow-unk should let <unk> through");
}

#[test]
fn eos_becomes_a_line_break_and_until_eos_stops_there() {
    // PTB ends a sentence about every 20 words, and so does the model: 2000 words without
    // one would take a probability below e^-100.
    let o = generate(&["--words", "2000", "--seed", "2"]);
    assert_success(&o);
    assert!(stdout(&o).trim_end().lines().count() > 1, "no sentence ended in 2000 words");
    assert!(!stdout(&o).contains("<eos>"));
    let prompt = "the company said";
    let args = ["--prompt", prompt, "--words", "1000", "--seed", "2", "--until-eos", "--samples", "3", "--top-k", "50"];
    let o = generate(&args);
    assert_success(&o);
    let text = stdout(&o);
    // With a prompt no sample is empty, and --until-eos leaves no line break inside one: the
    // samples are exactly what lies between the blank lines.
    let samples: Vec<&str> = text.strip_suffix('\n').unwrap().split("\n\n").collect();
    assert_eq!(samples.len(), 3, "{text:?}");
    for s in &samples {
        let words = draws(s, prompt);
        assert!(!words.contains(&"\n"), "{samples:?}");
        assert!(words.len() < 1000, "a sample did not stop at its sentence's end: {s:?}");
    }
}

#[test]
fn generate_refuses_bad_arguments() {
    let o = generate(&["--top-k", "0"]);
    assert_one_line_error(&o, &["--top-k must be at least 1"]);
    for t in ["-1", "1e-38", "1e39", "nan", "inf"] {
        let o = generate(&["--temperature", t]);
        assert_one_line_error(&o, &["--temperature must be 0 (always the likeliest word) or between 0.001 and 1000"]);
    }
    let o = generate(&["--words", "-3"]);
    assert_one_line_error(&o, &["--words"]);
    let o = command().args(["generate", "--checkpoint", "/nonexistent/best"]).output().unwrap();
    assert_one_line_error(&o, &["/nonexistent/best: no such checkpoint directory"]);
    let o = generate(&["--prompt", "the", "--prompt-file", "p.txt"]);
    assert_one_line_error(&o, &["--prompt-file", "cannot be used with", "--prompt"]);
    let o = generate(&["--prompt-file", "/nonexistent/prompt.txt"]);
    assert_one_line_error(&o, &["/nonexistent/prompt.txt: cannot read the prompt"]);
}

#[test]
fn metrics_are_one_json_object_per_epoch() {
    let text = std::fs::read_to_string(trained().join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 3);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"].as_u64(), Some(i as u64 + 1));
        for key in ["lr", "train_ppl", "valid_ppl", "tokens_per_s", "seconds"] {
            let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
            assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        }
        assert_eq!(r["device"].as_str(), Some("cpu"));
    }
}

#[test]
fn the_perplexity_plot_is_a_whole_png() {
    let png = std::fs::read(trained().join("perplexity.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (900, 560));
    assert_eq!(&png[png.len() - 8..png.len() - 4], b"IEND", "truncated PNG");
    assert!(png.len() > 10_000, "suspiciously small plot ({} bytes)", png.len());
    assert!(!trained().join("perplexity.partial.png").exists());
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::ExitStatusExt;
    // A pipe whose reader is gone before ptb-lm writes a byte (like `ptb-lm ... | head -0`).
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a fresh descriptor owned by nothing else.
    let writer = unsafe { std::process::Stdio::from_raw_fd(fds[1]) };
    let o = command().arg("info").stdout(writer).output().unwrap();
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{:?}", o.status);
}

/// The model's own next-word distribution after `prompt`, computed with libtorch's softmax
/// (independently of the sampler's own f64 code).
struct Expected {
    /// Probabilities at temperature `t`, `<unk>` removed unless allowed, cut to the top k.
    p: Vec<f64>,
    /// Scores (logits), `<unk>`'s -inf unless allowed.
    scores: Vec<f64>,
    /// The score of the k-th likeliest word, where top-k cuts (-inf without top-k).
    cut: f64,
    vocab: ptb_lm::data::Vocab,
}

fn model_probabilities(prompt: &str, t: f64, top_k: Option<i64>, allow_unk: bool) -> Expected {
    use ptb_lm::checkpoint::Checkpoint;
    use tch::{Device, Kind, Tensor};
    let ckpt = Checkpoint::load(&trained().join("best")).unwrap();
    let model = ckpt.model(Device::Cpu).unwrap();
    let vocab = ckpt.vocab().unwrap();
    let ids: Vec<i64> = prompt.split_whitespace().map(|w| vocab.id(w).unwrap()).collect();
    let logits = tch::no_grad(|| {
        let f = model.forward(&Tensor::from_slice(&ids).view([-1, 1]), &model.zero_state(1), false);
        f.logits.get(-1).get(0).to_kind(Kind::Double)
    });
    if !allow_unk {
        let _ = logits.get(vocab.id("<unk>").unwrap()).fill_(f64::NEG_INFINITY);
    }
    let scaled = &logits / t;
    let (masked, cut) = match top_k {
        Some(k) => {
            let (top, keep) = logits.topk(k, 0, true, true);
            let m = Tensor::full([logits.size()[0]], f64::NEG_INFINITY, (Kind::Double, Device::Cpu));
            (m.index_copy(0, &keep, &scaled.index_select(0, &keep)), top.double_value(&[k - 1]))
        }
        None => (scaled, f64::NEG_INFINITY),
    };
    Expected {
        p: Vec::<f64>::try_from(masked.softmax(0, Kind::Double)).unwrap(),
        scores: Vec::<f64>::try_from(&logits).unwrap(),
        cut,
        vocab,
    }
}

#[test]
fn samples_follow_the_models_distribution_at_every_temperature() {
    let prompt = "the company said";
    let n = 4000;
    for (t, top_k, allow_unk) in [(0.5, None, false), (1.2, None, false), (1.2, Some(20), false), (0.5, Some(50), true)]
    {
        let Expected { p, scores, cut, vocab } = model_probabilities(prompt, t, top_k, allow_unk);
        let (ts, ns, ks) = (t.to_string(), n.to_string(), top_k.unwrap_or(0).to_string());
        let mut args = vec!["--prompt", prompt, "--words", "1", "--samples", &ns, "--seed", "9", "--temperature", &ts];
        if top_k.is_some() {
            args.extend(["--top-k", &ks]);
        }
        if allow_unk {
            args.push("--allow-unk");
        }
        let o = generate(&args);
        assert_success(&o);
        let text = stdout(&o);
        let samples: Vec<&str> = text.trim_end().split("\n\n").collect();
        assert_eq!(samples.len(), n, "T={t}");
        let eos = vocab.id("<eos>").unwrap() as usize;
        let mut counts = vec![0usize; p.len()];
        for s in &samples {
            let rest = s.strip_prefix(prompt).unwrap_or_else(|| panic!("sample without its prompt: {s:?}"));
            let id = match rest.trim() {
                "" => eos,
                w => vocab.id(w).unwrap_or_else(|| panic!("not a word: {w:?}")) as usize,
            };
            counts[id] += 1;
        }
        // Nothing outside the distribution's support (<unk> when banned, words outside top-k).
        // The sampler computes its scores in another process, with other threads and another
        // sequence of float operations (the prompt read without the decoder), so a word tied
        // with the k-th at float precision may fall on either side of the cut.
        for (id, (&c, &q)) in counts.iter().zip(&p).enumerate() {
            let at_the_cut = (scores[id] - cut).abs() <= 1e-4 * cut.abs().max(1.0);
            assert!(
                q > 0.0 || c == 0 || at_the_cut,
                "T={t} top_k={top_k:?}: '{}' drawn {c} times with probability 0",
                vocab.word(id as i64)
            );
        }
        // Binomial z-scores of the 12 likeliest words, and a chi-square over every word
        // expected at least 5 times (the rest pooled); the seed is fixed, the bounds wide.
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        for &id in &order[..12] {
            let e = n as f64 * p[id];
            let z = (counts[id] as f64 - e) / (e * (1.0 - p[id])).sqrt().max(1e-9);
            assert!(
                z.abs() < 4.5,
                "T={t} top_k={top_k:?}: '{}' {} times, expected {e:.1} (z = {z:.2})",
                vocab.word(id as i64),
                counts[id]
            );
        }
        let (mut chi2, mut bins, mut pooled_e, mut pooled_o) = (0.0, 0usize, 0.0, 0usize);
        for id in 0..p.len() {
            let e = n as f64 * p[id];
            if e >= 5.0 {
                chi2 += (counts[id] as f64 - e).powi(2) / e;
                bins += 1;
            } else {
                pooled_e += e;
                pooled_o += counts[id];
            }
        }
        if pooled_e >= 5.0 {
            chi2 += (pooled_o as f64 - pooled_e).powi(2) / pooled_e;
            bins += 1;
        }
        let df = (bins - 1) as f64;
        assert!(
            chi2 < df + 6.0 * (2.0 * df).sqrt() + 10.0,
            "T={t} top_k={top_k:?}: chi-square {chi2:.1} with {df} degrees of freedom"
        );
    }
}

#[test]
fn words_are_written_as_they_are_drawn() {
    // A long sample in a pipe: its first words arrive while the rest is still being drawn.
    use std::io::Read;
    let best = trained().join("best");
    let mut child = command()
        .args(["generate", "--checkpoint", best.to_str().unwrap(), "--words", "200000", "--seed", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert!(child.try_wait().unwrap().is_none(), "all 200,000 words were drawn before the first was shown");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn a_libtorch_error_is_a_one_line_error_not_a_backtrace() {
    let best = trained().join("best");
    let o = command()
        .args(["eval", "--checkpoint", best.to_str().unwrap(), "--device", "cpu"])
        .env("PTB_LM_FAILPOINT_TORCH", "1")
        .output()
        .unwrap();
    assert_one_line_error(&o, &["libtorch failed: mat1 and mat2 shapes cannot be multiplied", "please report it"]);
}

#[test]
fn command_line_numbers_are_checked_like_config_values() {
    let best = trained().join("best");
    let best = best.to_str().unwrap();
    for b in ["0", "-1", "99999999999"] {
        let o = command().args(["eval", "--checkpoint", best, "--batch-size", b]).output().unwrap();
        assert_one_line_error(&o, &["--batch-size"]);
    }
    // A batch size the split is too short for: a clear error, not an overflow.
    let o =
        command().args(["eval", "--checkpoint", best, "--batch-size", "1000000", "--device", "cpu"]).output().unwrap();
    assert_one_line_error(&o, &["too short for batch size 1000000"]);
    let o = command().args(["info", "--threads", "0"]).output().unwrap();
    assert_one_line_error(&o, &["--threads"]);
    let o = command().args(["--threads", "1", "info"]).output().unwrap();
    assert_success(&o);
    assert!(stdout(&o).contains("cpu threads: 1"), "{}", stdout(&o));
    let graphs = stdout(&o).lines().find(|l| l.starts_with("cuda graphs: ")).unwrap().to_string();
    if !tch::Cuda::is_available() {
        assert!(!graphs.contains("usable") || graphs.contains("not usable"), "{graphs}");
    }
}

/// `n` words of the trained model's vocabulary (not `<eos>` or `<unk>`), spread over it.
fn vocabulary_words(n: usize) -> Vec<String> {
    let vocab = ptb_lm::checkpoint::Checkpoint::load(&trained().join("best")).unwrap().meta.vocab;
    let words: Vec<&String> = vocab.iter().filter(|w| !w.starts_with('<')).collect();
    (0..n).map(|i| words[i * 7919 % words.len()].clone()).collect()
}

/// `ptb-lm generate` with `args` and `input` on its standard input.
fn generate_from_stdin(args: &[&str], input: String) -> std::process::Output {
    use std::io::Write;
    let best = trained().join("best");
    let mut child = command()
        .args(["generate", "--checkpoint", best.to_str().unwrap()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let o = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    o
}

#[test]
fn a_prompt_from_a_file_or_standard_input_gives_the_text_the_command_line_gives() {
    let s = Sandbox::new();
    let sampling = ["--words", "30", "--seed", "4", "--samples", "2"];
    // 5000 words (about 40 kB, within one argument's limit), the file's in lines of 12.
    let words = vocabulary_words(5000);
    let flat = words.join(" ");
    let lines: String = words.chunks(12).map(|c| c.join(" ") + "\n").collect();
    std::fs::write(s.path("prompt.txt"), &lines).unwrap();
    let file = s.path("prompt.txt");
    let a = generate(&[&["--prompt", flat.as_str()][..], &sampling].concat());
    let b = generate(&[&["--prompt-file", file.to_str().unwrap()][..], &sampling].concat());
    let c = generate_from_stdin(&[&["--prompt-file", "-"][..], &sampling].concat(), lines);
    for o in [&a, &b, &c] {
        assert_success(o);
        assert_eq!(stderr(o), "", "every prompt word is in the vocabulary");
    }
    assert!(stdout(&a).starts_with(&format!("{flat} ")) || stdout(&a).starts_with(&format!("{flat}\n")));
    assert_eq!(stdout(&a), stdout(&b), "--prompt-file FILE");
    assert_eq!(stdout(&a), stdout(&c), "--prompt-file -");
    // 50,000 words: past what one argument may hold, read from a file or from standard input.
    let long: String = vocabulary_words(50_000).chunks(20).map(|c| c.join(" ") + "\n").collect();
    assert!(long.len() > 128 * 1024);
    std::fs::write(s.path("long.txt"), &long).unwrap();
    let long_file = s.path("long.txt");
    let b = generate(&[&["--prompt-file", long_file.to_str().unwrap()][..], &sampling].concat());
    let c = generate_from_stdin(&[&["--prompt-file", "-"][..], &sampling].concat(), long);
    assert_success(&b);
    assert_success(&c);
    assert_eq!(stdout(&b), stdout(&c));
    assert_eq!(stdout(&b).split("\n\n").count(), 2, "two samples");
}

#[test]
fn reading_a_prompt_without_the_decoder_gives_the_state_and_scores_of_a_full_forward_pass() {
    use ptb_lm::checkpoint::Checkpoint;
    use ptb_lm::generate::{read_ids, PROMPT_PIECE};
    use tch::{Device, Tensor};
    let ckpt = Checkpoint::load(&trained().join("best")).unwrap();
    let model = ckpt.model(Device::Cpu).unwrap();
    let v = ckpt.meta.vocab.len();
    let close = |a: &Tensor, b: &Tensor| a.allclose(b, 1e-4, 1e-5, false);
    for n in [1, 2, PROMPT_PIECE, PROMPT_PIECE + 1, 2 * PROMPT_PIECE + 37] {
        let ids: Vec<i64> = (0..n).map(|i| ((i * 7919 + 13) % v) as i64).collect();
        let (logits, state) = read_ids(&model, &ids).unwrap();
        let full = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).view([-1, 1]), &model.zero_state(1), false));
        assert!(close(&Tensor::from_slice(&logits), &full.logits.get(-1).get(0)), "{n} words: the scores differ");
        let (read, forward) = (state.h.iter().chain(&state.c), full.state.h.iter().chain(&full.state.c));
        for (l, (a, b)) in read.zip(forward).enumerate() {
            assert_eq!(a.size(), b.size());
            assert!(close(a, b), "{n} words: state tensor {l} differs");
        }
    }
}

#[test]
fn a_closed_or_full_stdout_is_a_one_line_error_naming_standard_output() {
    use std::os::unix::process::CommandExt;
    let best = trained().join("best");
    let best = best.to_str().unwrap();
    let commands: [&[&str]; 3] = [
        &["info"],
        &["eval", "--checkpoint", best, "--device", "cpu"],
        &["generate", "--checkpoint", best, "--words", "5"],
    ];
    for args in commands {
        let full = std::fs::File::options().write(true).open("/dev/full").unwrap();
        let o = command().args(args).stdout(full).output().unwrap();
        assert_one_line_error(&o, &["standard output: No space left on device"]);
        let mut closed = command();
        // SAFETY: close(2) only, in the child between fork and exec.
        unsafe {
            closed.args(args).pre_exec(|| {
                libc::close(1);
                Ok(())
            });
        }
        let o = closed.output().unwrap();
        assert_one_line_error(&o, &["standard output: Bad file descriptor"]);
    }
    // A prompt to read from a closed standard input is not an empty prompt.
    let mut closed = command();
    // SAFETY: as above, for descriptor 0.
    unsafe {
        closed.args(["generate", "--checkpoint", best, "--prompt-file", "-"]).pre_exec(|| {
            libc::close(0);
            Ok(())
        });
    }
    assert_one_line_error(&closed.output().unwrap(), &["standard input: closed"]);
}
