"""Fused trials: K configurations of one shape trained as one model on one device (issue 15).

    from trainables.fused import run_trials
    results = run_trials([config_a, config_b, config_c], on_epoch=None)

`run_trials` returns one result per configuration, shaped as `trainables.pipeline.run_trial`'s
(status, history of per-epoch metrics, val / test reports, diagnostics, config), plus
`fused: {members, position}`. The configurations must share data, model, batch sizes and phase
plan (`members.fusion_key`); everything else is per member: seed (initial weights are the unfused
trial's: `torch.manual_seed(seed)` before `create_model`), data order (member k's loader is seeded
as its unfused trial's, so each step trains it on the batch its trial trains on), lr, weight
decay, momentum, schedule, DRO lambda / combine / eps / radius variant (erm, shared, count,
learned) / temperature / centroid pass / CE weighting / frozen classifier, classifier loss (ce,
cb, cb_bce) and beta, MaxNorm mode and radius, cRT re-initialisation, an L2-normalised classifier
(cls_norm l2, its scale learned or fixed: `StackedModel.normalise_classifier`), tau-norm.

`on_epoch(member, metrics, snapshot)` sees every epoch of every live member; returning True
stops that member. A member whose loss goes non-finite (checked every step on the CPU, once per
epoch on CUDA, as `trainables.loop.train_epoch` does) keeps its last finite weights, as its
unfused trial does, and is finished with status "diverged"; stopped members get "stopped". Both
leave at the epoch boundary: every stacked tensor (weights, BN statistics, momentum, radii,
centroids) is re-sliced to the remaining members, so their compute is freed, not masked.

Mechanism: stacked weights under `torch.func.vmap` (`stack.StackedModel`: `stack_module_state`
and `functional_call` over a meta-device template), not hand-written grouped convolutions. Why:

- measured (benchmarks/fusion.py, benchmarks/results/fusion_cpu.md): on the project's 2-core
  CPU, quiet, ResNet-32 at batch 128, neither form keeps up with separate channels-last models
  (about 300 images/s). vmap reaches 0.65x of them at K = 1-2 and 0.31x at K = 8; hand-written
  grouped convolutions reach 0.81x and 0.50x. So on a CPU the grouped form would be 1.2-1.6x
  faster than vmap, but both lose to unfused trials. vmap's batching rule for a convolution with
  batched weights is itself a grouped convolution, so the gap is the layers around it. Fusion is
  meant to pay on a GPU, where one trial leaves the device idle; that comparison is the GPU
  proof's `fused` stage and is not measured yet (no GPU available). Until it is, vmap's
  generality decides:
- vmap fuses any registered backbone as it is (no second, grouped definition of each
  architecture to keep in step: option-A shortcuts, per-member classifier, torchvision models),
  and a member's parameters keep the unfused names: `StackedModel.state_dict(k)` loads into
  `create_model(...)`, which is what checkpoints and the equivalence tests use;
- BatchNorm needs nothing special: with the running statistics passed in stacked, vmapped along
  dim 0, train-mode BN updates each member's slice in place with that member's batch statistics
  (`replace_all_batch_norm_modules_` would drop the running statistics that evaluation needs).

Known cost: `F.adaptive_avg_pool2d` (the models' global pool) has no vmap batching rule for
`as_strided_` and falls back to a slower path (a UserWarning). Measured, it is not what makes the
fused step slow: `x.mean((2, 3))` in its place gave the same rate (fusion_cpu.md).

Optimiser: `sgd.StackedSGD`, torch.optim.SGD's update on stacked tensors with [K] lr, weight
decay and momentum, and per-member masks for parameters a member does not train (a frozen DRO
classifier, fixed radii). The DRO loss runs under vmap through
`trainables.losses.dro_loss_unchecked` (the temperature is a per-member tensor there).

Stage-1 cache (`run_trials(..., cache_dir=, stage1_threads=)`, as `run_trial` takes them): when
every member has the same `config.stage1_key()`, stage 1 is obtained through the unfused
pipeline's own `CachedStage1.obtain`: trained once into the cache with the plain model of the
first member's unfused trial (the same seed and key as every member's), or loaded on a hit; the
weights are loaded into every member's slot and every member reports the cached epochs
`replayed`, as an unfused trial does on a hit (the fused run's stage 1 is never reported live,
even when it trained the entry). Members with different stage-1 keys are not grouped by key:
they train their stage 1s fused, without the cache.

Resume (`run_trials(..., resume=[checkpoint or None per member])`): on_epoch's `snapshot()` is
a member's checkpoint (`FusedRunner._checkpoint`: weights and BN statistics, raw radii, its
momentum slices, its loader's generator state, the position (phase, epochs done), history,
diagnostics; tensors and plain values only). Members resumed together must be at one position;
they continue as if uninterrupted (tests/test_fused.py checks the end weights and metrics).

Not in the fused path (yet): methods with a stage-1 loss or a post-hoc step of their own (logit
adjustment), channels-last on CUDA. Every
TrialConfig read is in `members.py`. In a sweep (`--fuse K`), trainables.tune trains a fused
Tune trial's members with `on_epoch` (ASHA per member: search.rungs; checkpoints to each
member's ledger entry), `on_leave` (each member's end in the ledger the moment it leaves) and
the sweep's stage-1 cache.
"""

from trainables.fused.runner import FusedOnEpoch, FusedRunner, OnLeave, run_trials

__all__ = ["FusedOnEpoch", "FusedRunner", "OnLeave", "run_trials"]
