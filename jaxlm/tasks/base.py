"""What a task supplies to the one train loop: its model, its batches, its loss and its metrics.

A task is a small frozen object built from the config (`jaxlm.tasks.create`).
The loop and the train/eval steps use only this interface, so pretraining and
every fine-tuning recipe share one loop:

  build_model(model_config) -> flax module
  batches(source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count)
      -> grain dataset of host batches (dicts of int32 numpy arrays) of one stream (`pipeline.process_streams`)
  batch_shapes(rows) -> {key: shape} of a batch of `rows` rows (what the steps are compiled for)
  logits(model, params, batch, *, train, rng) -> [B, C] or [B, T, V]
  weights(batch) -> float weight of each prediction in `logits` (0 = not scored)
  loss_sums(logits, batch, *, train) -> (loss_sum, metric sums with at least `loss_sum` and `weight`;
      eval sums may add more, e.g. calibration bins)
  loss_and_metrics(model, params, batch, *, train, rng) -> loss_sums of logits
  summarize(sums) -> reported metrics (plain floats, `loss` among them)
  baselines(batches) -> scores of trivial predictors on those batches
  new_params -> regex of parameter paths the task adds on top of a pretrained backbone

Losses and metrics are sums, not means: the train step divides once by the
summed `weight`, gradient accumulation and multi-batch evaluation add exactly.
"""


class Task:
  """Defaults shared by the tasks; each subclass supplies the rest of the interface above."""

  # Regex over '/'-joined parameter paths of what the task adds to a pretrained backbone: `init_from`
  # initialises these instead of restoring them; `train.trainable = "head"` trains only these.
  new_params: str | None = None

  def logits(self, model, params, batch, *, train: bool, rng=None):
    return model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                       deterministic=not train, rngs={"dropout": rng} if train else {})

  def loss_and_metrics(self, model, params, batch, *, train: bool, rng=None):
    return self.loss_sums(self.logits(model, params, batch, train=train, rng=rng), batch, train=train)

  def baselines(self, batches: list[dict]) -> dict:
    del batches
    return {}
