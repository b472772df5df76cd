//! Averaged SGD (the ASGD of Merity et al. 2018's NT-ASGD): the running means of the
//! weights after every step once averaging starts, and evaluation with them.

use super::*;

impl TrainStep {
    /// Starts averaged SGD from the current weights (`count` iterates already averaged,
    /// with `values` their mean, when resuming).
    pub fn start_averaging(&mut self, resumed: Option<(Vec<Tensor>, u64)>) {
        let device = self.model.device();
        let kind = self.model.kind();
        let (avg, n) = match resumed {
            Some((values, n)) => (values.iter().map(|v| v.to_device(device).to_kind(kind)).collect(), n),
            None => (self.params.iter().map(|p| p.detach().copy()).collect(), 1),
        };
        self.avg = Some((avg, Tensor::from(n as f64).to_kind(kind).to_device(device)));
        self.recapture();
    }

    pub fn averaging(&self) -> bool {
        self.avg.is_some()
    }

    /// Number of iterates in the running mean (0 when not averaging).
    pub fn averaged_count(&self) -> u64 {
        self.avg.as_ref().map_or(0, |(_, c)| f64::try_from(c).unwrap_or(0.0) as u64)
    }

    /// The averaged weights, named like the model's.
    pub fn averaged_named(&self) -> Option<Vec<(String, Tensor)>> {
        let (avg, _) = self.avg.as_ref()?;
        let names = self.model.named_parameters().into_iter().map(|(n, _)| n);
        Some(names.zip(avg.iter().map(Tensor::shallow_clone)).collect())
    }

    /// Runs `f` with the averaged weights in the model (when averaging), then puts the
    /// trained weights back.
    pub fn with_averaged<T>(&mut self, f: impl FnOnce(&LstmLm) -> T) -> T {
        let Some((avg, _)) = &self.avg else { return f(&self.model) };
        let saved: Vec<Tensor> = tch::no_grad(|| {
            self.params
                .iter()
                .zip(avg)
                .map(|(p, a)| {
                    let keep = p.detach().copy();
                    p.shallow_clone().copy_(a);
                    keep
                })
                .collect()
        });
        let out = f(&self.model);
        tch::no_grad(|| {
            for (p, s) in self.params.iter().zip(&saved) {
                p.shallow_clone().copy_(s);
            }
        });
        out
    }
}
