//! ptb-lm: recurrent (LSTM, GRU, plain RNN) language models of words, characters or subwords,
//! on the Penn Treebank or any text, trained with libtorch.
//!
//! * [`config`]: the TOML run configuration and its checks
//! * [`data`]: corpus files, splits and the book's stateful batching
//! * [`text`]: the tokenizers (word, character, byte-level BPE): text <-> token ids
//! * [`model`]: the recurrent language model
//! * [`xent`]: the decoder's loss (fused into one autograd node on the CPU)
//! * [`cell`]: the recurrent cell (LSTM, GRU, plain RNN) and all that differs between them
//! * [`step`]: one training step (eager or replayed from a CUDA graph), its snapshots and averaging
//! * [`optim`]: the step's update rule (SGD, or AdamW) and its state
//! * [`train`]: the epoch loop; set-up and resume, the divergence guard, reports, the end of a run
//! * [`schedule`]: the learning rate of every step, and the time budget
//! * [`eval`]: the one scoring loop (every perplexity) and the `eval` command
//! * [`gradflow`]: the gradient's norm through time (`train.log_grad_norm`, the book's §6.1 figure)
//! * [`dynamic`]: dynamic evaluation (Krause et al. 2018)
//! * [`generate`]: sampling text
//! * [`checkpoint`]: atomic, checked checkpoints
//! * [`run`]: the run directory and its overwrite rule
//! * [`fsutil`]: files written whole (temporary name, then rename)
//! * [`metrics`], [`plot`], [`progress`]: what a run reports
//! * [`device`], [`cuda`]: devices; CUDA graphs, precision knobs and memory statistics
//! * [`replicas`]: the ranks of data-parallel training, or one process alone: every rank rule
//! * [`dist`]: data-parallel training on torch.distributed (c10d, Gloo)
//! * [`interrupt`]: Ctrl-C, SIGTERM and what each phase does with them
//! * [`failpoint`]: test hooks that provoke faults (pauses, divergence) on any machine

pub mod cell;
pub mod checkpoint;
pub mod config;
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod dynamic;
pub mod eval;
pub mod failpoint;
pub mod fsutil;
pub mod generate;
pub mod gradflow;
pub mod interrupt;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod replicas;
pub mod run;
pub mod schedule;
pub mod step;
pub mod text;
pub mod train;
pub mod xent;
