"""Reading and writing models: Hugging Face directories and the project's own megatron checkpoints."""
