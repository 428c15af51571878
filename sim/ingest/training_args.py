"""HF TrainingArguments as scenarios name them, and the sequence-length names other trainers use for the same
setting (TrainingArguments/tokenizer `model_max_length`, LLaMA-Factory `cutoff_len`, TRL/axolotl `max_seq_length`)."""

from sim.errors import ScenarioError

SEQ_LEN_ALIASES = ("model_max_length", "cutoff_len", "max_seq_length")
PER_DEVICE_TRAIN_BATCH_SIZE_DEFAULT = 8  # transformers training_args.py TrainingArguments.per_device_train_batch_size


def resolve_seq_len_alias(training: dict) -> None:
    """Rename an alias of `seq_len` in a raw `training:` mapping; an alias that disagrees with seq_len is an error."""
    for alias in SEQ_LEN_ALIASES:
        if alias in training:
            if "seq_len" in training and training["seq_len"] != training[alias]:
                raise ScenarioError(
                    f"training.{alias}: conflicts with training.seq_len "
                    f"({training[alias]!r} vs {training['seq_len']!r})"
                )
            training["seq_len"] = training.pop(alias)
