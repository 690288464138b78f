"""Objectives: one module per task; `create(config, num_classes)` builds the task object the loop runs."""

TASKS = ("causal_lm", "classification", "seq2seq")


def create(config, num_classes: int = 0):
  """The `jaxlm.tasks.base.Task` of `config.task` with its data and loss options (distillation is added by the
  loop, which restores the teacher)."""
  from jaxlm.tasks import causal_lm, classification, seq2seq  # here: the task modules import the models
  data = config.data
  common = dict(text_field=data.text_field, seq_len=data.seq_len, dataset_name=data.name)
  if config.task == "causal_lm":
    return causal_lm.CausalLm(shuffle_window=data.shuffle_window, **common)
  if config.task == "seq2seq":
    return seq2seq.Seq2Seq(target_field=data.target_field, separator=data.separator, truncation=data.truncation,
                           **common)
  options = config.classification
  return classification.Classification(
      num_classes=num_classes, label_field=data.label_field, truncation=data.truncation, pooling=options.pooling,
      label_smoothing=options.label_smoothing, focal_gamma=options.focal_gamma,
      focal_adaptive=options.focal_adaptive, class_weights=tuple(options.class_weights), **common)
