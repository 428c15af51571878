"""Readers of the formats users bring, one module each, turning them into the raw mappings of the one scenario
vocabulary (design.md §3) before sim/scenario.py validates them: HF config.json (hf_config), DeepSpeed JSON with the
HF Trainer's "auto" values (deepspeed), TrainingArguments and trainer names (training_args). Issue #14 adds
PEFT, LLaMA-Factory, axolotl and accelerate readers here."""
