//! The recurrent cell of the language model (`model.cell`): the LSTM, the GRU, or the plain
//! (Elman) RNN with tanh or ReLU. Everything that differs between cells lives here, so adding
//! one touches this file only (`model.cell` reads this enum; bench/load_checkpoint.py has its
//! own table): how many gate blocks its weights stack, whether it carries a cell state
//! besides h, the prefix of its parameter names, its cuDNN mode, and the libtorch call that
//! runs it.
//!
//! The weights of every cell have the form of PyTorch's modules (nn.LSTM, nn.GRU, nn.RNN):
//! per layer `weight_ih` (G·H, in), `weight_hh` (G·H, H), `bias_ih` (G·H), `bias_hh` (G·H),
//! with G gate blocks in PyTorch's order (LSTM: i, f, g, o; GRU: r, z, n; RNN: one), so a
//! checkpoint's tensors map one to one onto PyTorch's `weight_ih_l{l}` and so on.

use serde::{Deserialize, Serialize};
use std::fmt;
use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum Cell {
    /// Long short-term memory (Hochreiter & Schmidhuber 1997): gates i, f, g, o; state (h, c).
    #[default]
    Lstm,
    /// Gated recurrent unit (Cho et al. 2014), as PyTorch's nn.GRU: gates r, z, n; state h.
    Gru,
    /// The plain RNN of the book's chapter 5: h' = tanh(W_ih x + b_ih + W_hh h + b_hh).
    RnnTanh,
    /// The plain RNN with ReLU in place of tanh (PyTorch's RNN_RELU).
    RnnRelu,
}

/// Every cell, in the order the config's documentation lists them.
pub const ALL: [Cell; 4] = [Cell::Lstm, Cell::Gru, Cell::RnnTanh, Cell::RnnRelu];

impl Cell {
    /// The config's name of the cell (`model.cell`).
    pub fn key(self) -> &'static str {
        match self {
            Cell::Lstm => "lstm",
            Cell::Gru => "gru",
            Cell::RnnTanh => "rnn_tanh",
            Cell::RnnRelu => "rnn_relu",
        }
    }

    /// Number of gate blocks stacked in each weight matrix (rows = gates() · hidden size).
    pub fn gates(self) -> i64 {
        match self {
            Cell::Lstm => 4,
            Cell::Gru => 3,
            Cell::RnnTanh | Cell::RnnRelu => 1,
        }
    }

    /// Whether the cell carries a cell state c besides its hidden state h (the LSTM only).
    pub fn has_cell_state(self) -> bool {
        self == Cell::Lstm
    }

    /// The first part of the layers' parameter names: `{prefix}.{layer}.weight_ih` etc.
    /// (`lstm` as ever, `gru`, `rnn` for both plain RNNs: the config names the nonlinearity).
    pub fn prefix(self) -> &'static str {
        match self {
            Cell::Lstm => "lstm",
            Cell::Gru => "gru",
            Cell::RnnTanh | Cell::RnnRelu => "rnn",
        }
    }

    /// cuDNN's `cudnnRNNMode_t` for this cell (as PyTorch's `get_cudnn_mode`).
    pub fn cudnn_mode(self) -> i64 {
        match self {
            Cell::RnnRelu => 0,
            Cell::RnnTanh => 1,
            Cell::Lstm => 2,
            Cell::Gru => 3,
        }
    }

    /// Runs `layers` stacked layers of the cell over `input` (T, B, in), time-major, from
    /// `(h, c)`: the hidden state (layers, B, H) and, for the LSTM, the cell state (the same
    /// shape; ignored by the other cells). `weights` holds each layer's
    /// `[weight_ih, weight_hh, bias_ih, bias_hh]` in turn. `dropout` applies between layers
    /// (cuDNN draws it on CUDA). Returns the last layer's output (T, B, H) and the final h
    /// and c (None for cells without a cell state). One libtorch call: cuDNN's fused RNN on
    /// CUDA.
    pub fn run(
        self,
        input: &Tensor,
        (h, c): (&Tensor, Option<&Tensor>),
        weights: &[&Tensor],
        layers: i64,
        dropout: f64,
        train: bool,
    ) -> (Tensor, Tensor, Option<Tensor>) {
        match self {
            Cell::Lstm => {
                let c = c.expect("the LSTM carries a cell state");
                let (out, hn, cn) = input.lstm(&[h, c], weights, true, layers, dropout, train, false, false);
                (out, hn, Some(cn))
            }
            Cell::Gru => {
                let (out, hn) = input.gru(h, weights, true, layers, dropout, train, false, false);
                (out, hn, None)
            }
            Cell::RnnTanh => {
                let (out, hn) = input.rnn_tanh(h, weights, true, layers, dropout, train, false, false);
                (out, hn, None)
            }
            Cell::RnnRelu => {
                let (out, hn) = input.rnn_relu(h, weights, true, layers, dropout, train, false, false);
                (out, hn, None)
            }
        }
    }
}

impl TryFrom<String> for Cell {
    type Error = String;
    /// A config's `model.cell`; anything else is refused with the names it could be.
    fn try_from(s: String) -> Result<Cell, String> {
        ALL.into_iter().find(|c| c.key() == s).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|c| c.key()).collect();
            format!("unknown cell '{s}'; use one of {}", names.join(", "))
        })
    }
}

impl fmt::Display for Cell {
    /// How a person names the cell: "LSTM", "GRU", "RNN (tanh)", "RNN (ReLU)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cell::Lstm => "LSTM",
            Cell::Gru => "GRU",
            Cell::RnnTanh => "RNN (tanh)",
            Cell::RnnRelu => "RNN (ReLU)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cell_reads_back_from_its_config_name_and_a_typo_is_told_the_choices() {
        for cell in ALL {
            let v: Cell = toml::Value::String(cell.key().into()).try_into().unwrap();
            assert_eq!(v, cell);
            assert_eq!(toml::Value::try_from(cell).unwrap().as_str(), Some(cell.key()));
        }
        let err = toml::Value::String("lstmm".into()).try_into::<Cell>().unwrap_err().to_string();
        assert!(err.contains("unknown cell 'lstmm'; use one of lstm, gru, rnn_tanh, rnn_relu"), "{err}");
    }
}
