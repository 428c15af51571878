"""What a training step computes and keeps: the tensors of the Hugging Face modelling code, PEFT and the optimizer.

Knows transformers, knows nothing of time, streams or allocators.
"""
