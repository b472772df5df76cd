//! The replicas a run trains on: the ranks of data-parallel training (one process each,
//! joined in a Gloo group by [`crate::dist`]), or this process alone. Everything training
//! does differently with ranks is here, each as one operation that the set of one performs
//! as a no-op: who writes the run ([`Replicas::leads`]), which streams a rank trains
//! ([`Replicas::shard`]), the gradient averaged over the ranks ([`Replicas::average`]), the
//! values every rank must take the same decision on ([`Replicas::agree`],
//! [`Replicas::leaders_value`]), and the carried state gathered for a checkpoint and taken
//! back from one ([`Replicas::gather_streams`], [`Replicas::own_streams`]). The trainer
//! calls these and has no branch of its own for either case.

use anyhow::{bail, Result};
use tch::{Device, Tensor};

use crate::config::Config;
use crate::dist::{self, Group, Launch};

/// This process alone, or its place in a process group.
pub struct Replicas {
    group: Option<Group>,
}

impl Replicas {
    /// This process alone.
    pub fn alone() -> Replicas {
        Replicas { group: None }
    }

    /// Joins the process group the launcher's environment describes, if any (see
    /// [`crate::dist`]); else this process alone.
    pub fn join(cfg: &Config, device: Device) -> Result<Replicas> {
        let Some(launch) = Launch::from_env()? else { return Ok(Replicas::alone()) };
        if !dist::available() {
            bail!("{}", dist::INSTALL_HINT);
        }
        if device.is_cuda() {
            bail!(
                "data-parallel training on CUDA needs the NCCL backend, which this ptb-lm does not build yet; \
                 use --device cpu (Gloo)"
            );
        }
        if cfg.train.batch_size % launch.world as i64 != 0 {
            bail!(
                "train.batch_size = {} is not divisible by the {} ranks (WORLD_SIZE): each rank trains an equal share of the streams",
                cfg.train.batch_size,
                launch.world
            );
        }
        Ok(Replicas { group: Some(Group::join(&launch)?) })
    }

    /// Whether this is one process alone (no group).
    pub fn is_alone(&self) -> bool {
        self.group.is_none()
    }

    /// Whether this process writes the run and speaks for it (the only one, or rank 0).
    pub fn leads(&self) -> bool {
        self.rank() == 0
    }

    /// This process's rank (0 alone).
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank)
    }

    /// The number of ranks (1 alone).
    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world)
    }

    /// The streams `[start, start + len)` of a batch of `batch` streams that this rank trains
    /// (all of them alone).
    pub fn shard(&self, batch: i64) -> (i64, i64) {
        match &self.group {
            None => (0, batch),
            Some(g) => g.shard(batch),
        }
    }

    /// Replaces every rank's gradients by their mean over the ranks, in one all-reduce of
    /// one flat buffer: with equal shards, the gradient of the whole batch's mean loss, so
    /// the clipping and the update see what one process would. Alone: nothing to do.
    pub fn average(&self, grads: &[Tensor]) -> Result<()> {
        let Some(g) = &self.group else { return Ok(()) };
        tch::no_grad(|| {
            let flat = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
            g.allreduce_sum(&flat)?;
            let flat = flat / g.world as f64;
            let mut offset = 0;
            for grad in grads {
                let n = grad.numel() as i64;
                grad.shallow_clone().copy_(&flat.narrow(0, offset, n).view_as(grad));
                offset += n;
            }
            Ok(())
        })
    }

    /// What every rank agrees on at a check: the mean of the ranks' loss sums, whether any
    /// of them is to stop, and rank 0's `fraction` of the time budget. Alone: its own.
    pub fn agree(&self, loss_sum: f64, stopping: bool, fraction: f64) -> Result<(f64, bool, f64)> {
        let Some(g) = &self.group else { return Ok((loss_sum, stopping, fraction)) };
        let fraction = if g.rank == 0 { fraction } else { 0.0 };
        let t = Tensor::from_slice(&[loss_sum, if stopping { 1.0 } else { 0.0 }, fraction]);
        g.allreduce_sum(&t)?;
        let v = Vec::<f64>::try_from(&t)?;
        Ok((v[0] / g.world as f64, v[1] > 0.0, v[2]))
    }

    /// Rank 0's value of `x`, on every rank (so every rank takes the same decisions).
    pub fn leaders_value(&self, x: f64) -> Result<f64> {
        let Some(g) = &self.group else { return Ok(x) };
        let t = Tensor::from_slice(&[if g.rank == 0 { x } else { 0.0 }]);
        g.allreduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t)?[0])
    }

    /// A carried state `t` (layers, this rank's streams, hidden) as one process holding
    /// every stream has it: each rank's streams in their place (every rank must call this).
    /// Alone: `t` itself.
    pub fn gather_streams(&self, t: &Tensor) -> Result<Tensor> {
        let Some(g) = &self.group else { return Ok(t.shallow_clone()) };
        tch::no_grad(|| {
            let s = t.size();
            let all = s[1] * g.world as i64;
            let full = Tensor::zeros([s[0], all, s[2]], (t.kind(), t.device()));
            let (start, len) = g.shard(all);
            full.narrow(1, start, len).copy_(t);
            g.allreduce_sum(&full)?;
            Ok(full)
        })
    }

    /// This rank's streams of a saved state `t` (layers, every stream, hidden) whose rank
    /// holds `local` streams: the inverse of [`Replicas::gather_streams`]. Alone, or where
    /// `t` has not every rank's streams (a shape the caller reports): `t` itself.
    pub fn own_streams(&self, t: &Tensor, local: i64) -> Tensor {
        match &self.group {
            Some(g) if t.size().get(1) == Some(&(local * g.world as i64)) => {
                let (start, len) = g.shard(local * g.world as i64);
                t.narrow(1, start, len)
            }
            _ => t.shallow_clone(),
        }
    }
}
